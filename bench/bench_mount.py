"""kvfs mount benchmark: one table of ratios against baselines measured in the same run.

    .venv/bin/python bench/bench_mount.py [--latency 0.02] [--seconds 3]

- mount-to-first-read: `kvfs mount` of N configured objects until the first file's bytes are read,
  vs the eager baseline (bench/eager_baseline.py: fetch all N sequentially into tmpfs, then read),
  both as fresh processes against the emulator with the same injected per-request latency; each
  the better of two runs.
- cached open+read+close ops/s on a kvfs file vs the same bytes on tmpfs: rounds of each in
  turn, medians, so load from other processes weighs on both sides alike.
- Key Vault requests per read when many readers read a few objects repeatedly.
- the daemon's memory (RSS and PSS) after reading every one of 1000 objects.
Needs root and /dev/fuse. Timings vary between machines; compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from e2e.conftest import Mount, Mounter, is_mounted, spc_manifest, workload_parameters  # noqa: E402

import kvfs  # noqa: E402
from kvfs.emulator.server import EmulatorThread  # noqa: E402

HERE = Path(__file__).resolve().parent


def ops_per_second(path: Path, seconds: float) -> float:
    start = time.perf_counter()
    count = 0
    while time.perf_counter() < start + seconds:
        for _ in range(100):
            fd = os.open(path, os.O_RDONLY)
            os.read(fd, 65536)
            os.close(fd)
        count += 100
    return count / (time.perf_counter() - start)


def interleaved_ops(path: Path, baseline: Path, seconds: float, rounds: int = 6) -> tuple[float, float, float]:
    """Median ops/s of `path` and of `baseline`, and the median of the per-round ratios."""
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(ops_per_second(path, seconds / rounds))
        theirs.append(ops_per_second(baseline, seconds / rounds))
    ratio = statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
    return statistics.median(ours), statistics.median(theirs), ratio


def memory_kib(pid: int) -> tuple[int, int]:
    rss = pss = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


def time_first_read(tmp: Path, emu, names: list[str], env: dict[str, str]) -> float:  # type: ignore[no-untyped-def]
    """`kvfs mount` from process start until the first file's bytes are read (manifest written before)."""
    folder = Path(tempfile.mkdtemp(dir=tmp))
    spc, path, log_file = folder / "spc.yaml", folder / "mnt", folder / "mount.log"
    spc.write_text(spc_manifest(workload_parameters(emu, *({"objectName": n, "objectType": "secret"} for n in names))))
    path.mkdir()
    with open(log_file, "wb") as log:
        start = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "kvfs", "mount", "--spc", str(spc), str(path)], stdout=log, stderr=log, env=env
        )
    mount = Mount(path, process, log_file, env)
    try:
        while True:
            try:
                if is_mounted(path):
                    (path / names[0]).read_bytes()
                    return time.perf_counter() - start
            except OSError:
                pass
            if process.poll() is not None:
                raise SystemExit(mount.log())
            time.sleep(0.001)
    finally:
        mount.stop()


def time_eager(emu, names: list[str], env: dict[str, str]) -> float:  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory(dir="/dev/shm") as out:
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, str(HERE / "eager_baseline.py"), str(emu.dir / "emulator.json"), "demo", out, *names],
            check=True,
            env=env,
        )
        return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.02, help="injected Key Vault latency per request (s)")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each ops/s measurement")
    parser.add_argument("--start-only", action="store_true", help="only the mount-to-first-read rows")
    args = parser.parse_args()

    # as from an installed kvfs: its modules load from bytecode (here PYTHONDONTWRITEBYTECODE may be set)
    compileall.compile_dir(str(Path(kvfs.__file__).parent), quiet=1)
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp, EmulatorThread(Path(tmp) / "emulator") as emu:
        for i in range(1000):
            emu.set_secret("demo", f"secret-{i:04d}", f"value-{i:04d}-" + "x" * 64)
        mounter = Mounter(emu, Path(tmp))
        env = mounter.env(KVFS_LOG_LEVEL="WARNING")
        emu.faults.latency(args.latency)
        try:
            for count in (1, 100, 1000):
                names = [f"secret-{i:04d}" for i in range(count)]
                kvfs_s = min(time_first_read(Path(tmp), emu, names, env) for _ in range(2))
                eager_s = min(time_eager(emu, names, env) for _ in range(2))
                speedup = eager_s / kvfs_s
                verdict = f"{speedup:.1f}x faster" if speedup >= 1 else f"{1 / speedup:.1f}x slower"
                rows.append(
                    (f"mount-to-first-read, {count} objects", f"{kvfs_s * 1000:.0f} ms",
                     f"eager {eager_s * 1000:.0f} ms", verdict)
                )
            emu.faults.latency(0)
            if not args.start_only:
                measure_mounted(mounter, emu, args.seconds, rows)
        finally:
            mounter.close()
    print_table(rows, args.latency)
    return 0


def measure_mounted(mounter: Mounter, emu, seconds: float, rows: list[tuple[str, str, str, str]]) -> None:  # type: ignore[no-untyped-def]
    """Cached reads against tmpfs, Key Vault GETs per read, memory: one mount of 1000 objects."""
    names = [f"secret-{i:04d}" for i in range(1000)]
    mount = mounter.start(workload_parameters(emu, *({"objectName": n, "objectType": "secret"} for n in names)))
    path = mount.path / names[0]
    payload = path.read_bytes()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        tmpfs_file = Path(shm) / "file"
        tmpfs_file.write_bytes(payload)
        kvfs_ops, tmpfs_ops, ratio = interleaved_ops(path, tmpfs_file, seconds)
    rows.append(("cached open+read+close", f"{kvfs_ops:,.0f} ops/s", f"tmpfs {tmpfs_ops:,.0f} ops/s",
                 f"{ratio:.3f}x tmpfs"))

    emu.reset_counts()
    reads = 0
    for _ in range(20):
        for name in names[:50]:
            (mount.path / name).read_bytes()
            reads += 1
    gets = emu.count(route="get_secret")
    rows.append(("Key Vault GETs per read (50 objects x 20 reads)", f"{gets / reads:.3f}",
                 f"eager: {1.0:.3f} per object per mount", f"{reads} reads, {gets} GETs"))

    for name in names:
        (mount.path / name).read_bytes()
    rss, pss = memory_kib(mount.process.pid)
    rows.append(("daemon memory after reading 1000 objects", f"RSS {rss / 1024:.1f} MiB",
                 f"PSS {pss / 1024:.1f} MiB", ""))


def print_table(rows: list[tuple[str, str, str, str]], latency: float) -> None:
    header = ("what", "kvfs", "baseline", "ratio")
    widths = [max(len(row[i]) for row in [*rows, header]) for i in range(4)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print(f"\n(injected Key Vault latency {latency * 1000:.0f} ms per request; {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    sys.exit(main())
