#!/usr/bin/env bash
# Install everything kvfs needs on Debian/Ubuntu: the FUSE 3 runtime and headers (pyfuse3 builds
# against them), then a virtualenv in .venv with kvfs, the emulator extra and the test
# dependencies. Idempotent, and quick when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v fusermount3 >/dev/null || need_apt+=(fuse3)
pkg-config --exists fuse3 2>/dev/null || need_apt+=(libfuse3-dev pkg-config)
command -v gcc >/dev/null || need_apt+=(gcc)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
[ -e /usr/include/python3*/Python.h ] 2>/dev/null || python3 -c 'import sysconfig,os,sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' || need_apt+=(python3-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "kvfs setup: please install as root: apt-get install ${need_apt[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
[ -e /dev/fuse ] || { echo "kvfs setup: /dev/fuse is missing (load the fuse module or run the container with --device /dev/fuse)" >&2; exit 1; }

# The install is skipped when nothing it depends on changed: the stamp holds a hash of
# pyproject.toml and of this script (what is installed, and how) and the Python version. Source
# changes need no reinstall: kvfs is installed editable, package data (stubs, py.typed) included.
python_version=$(python3 -c 'import sys; print(sys.version.split()[0])')
stamp="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) python-$python_version"
stamp_file=.venv/.kvfs-setup-stamp
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ] || ! .venv/bin/python -c 'import kvfs, pyfuse3' 2>/dev/null; then
    venv_version=$(.venv/bin/python -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || true)
    if [ "$venv_version" != "$python_version" ]; then
        python3 -m venv --clear .venv  # none yet, or made by another (or a removed) Python
    fi
    rm -f "$stamp_file"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/python -m pip install -q -e ".[test,emulator]" 2>&1 | grep -v -E '^(WARNING: Location|  )' || true
    .venv/bin/python -c 'import kvfs, pyfuse3' || { echo "kvfs setup: installation failed" >&2; exit 1; }
    echo "$stamp" > "$stamp_file"
fi
# Bytecode for the source tree, so every kvfs process starts as an installed one would (even
# where PYTHONDONTWRITEBYTECODE is set); only changed files are compiled.
.venv/bin/python -m compileall -q src/kvfs >/dev/null
