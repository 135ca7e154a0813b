#!/usr/bin/env bash
# The quick-start demo: emulator → workload identity → mount → read → rotate → unmount.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
