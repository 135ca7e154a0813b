"""Import time of what `kvfs mount` loads before FUSE_INIT: the README's figure.

    .venv/bin/python bench/import_time.py [--runs 12]

Runs `python -X importtime -c 'import kvfs.cli, kvfs.config.spc, kvfs.daemon.volume'` RUNS
times, each a fresh interpreter, with kvfs compiled to bytecode first (as an installed kvfs is),
and prints the median, minimum and maximum of each run's sum of the "self" column: every
module's own import time, the interpreter's start-up imports (about 5 ms) included. A busy
machine inflates it: run it when nothing else runs, more than once.
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
from pathlib import Path

STATEMENT = "import kvfs.cli, kvfs.config.spc, kvfs.daemon.volume"


def self_seconds(importtime_output: str) -> float:
    """The sum of the `self [us]` column of `-X importtime` output, in seconds."""
    total = 0
    for line in importtime_output.splitlines():
        if not line.startswith("import time:"):
            continue
        self_us = line.removeprefix("import time:").split("|", 1)[0].strip()
        if self_us.isdigit():  # the header line says "self [us]"
            total += int(self_us)
    return total / 1e6


def one_run() -> float:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", STATEMENT],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPROFILEIMPORTTIME"},
    )
    return self_seconds(result.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=12, help="fresh interpreters to time (default %(default)s)")
    args = parser.parse_args()
    import kvfs

    compileall.compile_dir(str(Path(kvfs.__file__).parent), quiet=1)
    one_run()  # warms the page cache; not counted
    times = sorted(one_run() for _ in range(args.runs))
    print(
        f"python -X importtime -c '{STATEMENT}': self times sum to {statistics.median(times):.2f} s"
        f" (median of {args.runs} runs; min {times[0]:.3f} s, max {times[-1]:.3f} s; {os.cpu_count()} CPUs)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
