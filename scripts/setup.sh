#!/usr/bin/env bash
# Install everything kvfs needs on Debian/Ubuntu: the FUSE 3 runtime and headers (pyfuse3 builds
# against them), then a virtualenv in .venv with kvfs, the emulator extra and the test
# dependencies. Idempotent.
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

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e ".[test,emulator]" 2>&1 | grep -v -E '^(WARNING: Location|  )' || true
.venv/bin/python -c 'import kvfs, pyfuse3' || { echo "kvfs setup: installation failed" >&2; exit 1; }
