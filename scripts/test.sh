#!/usr/bin/env bash
# The whole test suite: installs what it needs, then runs every layer from unit tests to real
# FUSE mounts against the emulator (real mounts need root and /dev/fuse).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
