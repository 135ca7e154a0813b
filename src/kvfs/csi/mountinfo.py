"""Is a path mounted, and is that mount alive? Without ever blocking on a dead FUSE mount.

Mountedness comes from the mount table (`/proc/self/mountinfo`), which never touches the
filesystem. Liveness is a `statfs` run in a worker thread with a deadline: a dead FUSE connection
answers ENOTCONN at once, a hung one does not answer, and a bare `stat` could hang the caller.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import re
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

KVFS_FSTYPE = "fuse.kvfs"
_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/PID/mountinfo (proc(5))."""

    mount_id: int
    parent_id: int
    major_minor: str
    root: str
    mount_point: str
    mount_options: str
    optional_fields: tuple[str, ...]
    fstype: str
    source: str
    super_options: str


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse mountinfo text; malformed lines are skipped (the kernel never writes them)."""
    entries: list[MountEntry] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            entries.append(
                MountEntry(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    major_minor=fields[2],
                    root=_unescape(fields[3]),
                    mount_point=_unescape(fields[4]),
                    mount_options=fields[5],
                    optional_fields=tuple(fields[6:sep]),
                    fstype=fields[sep + 1],
                    source=_unescape(fields[sep + 2]),
                    super_options=fields[sep + 3] if len(fields) > sep + 3 else "",
                )
            )
        except (ValueError, IndexError):
            log.debug("skipping malformed mountinfo line %r", line)
    return entries


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def find_mount(target: str, entries: list[MountEntry] | None = None) -> MountEntry | None:
    """The mount visible at `target` (the last one stacked there), or None."""
    if entries is None:
        entries = read_mountinfo()
    target = os.path.normpath(target)
    found = None
    for entry in entries:
        if entry.mount_point == target:
            found = entry
    return found


def is_kvfs_mount(target: str, entries: list[MountEntry] | None = None) -> bool:
    entry = find_mount(target, entries)
    return entry is not None and entry.fstype == KVFS_FSTYPE


class Health(enum.Enum):
    HEALTHY = "healthy"
    DEAD = "dead"  # ENOTCONN / ECONNABORTED / ESTALE / EIO: nobody serves the connection
    HUNG = "hung"  # statfs did not answer within the deadline
    UNMOUNTED = "unmounted"  # no kvfs mount at the target any more


@dataclass(frozen=True)
class Probe:
    health: Health
    detail: str = ""
    # HUNG only: when (time.monotonic) the statfs of an earlier check, still unanswered, started;
    # None when this check's own statfs timed out (one slow answer on a busy node may be that)
    unanswered_since: float | None = None


_DEAD_ERRNOS = {errno.ENOTCONN, errno.ECONNABORTED, errno.ESTALE, errno.EIO, errno.ENODEV}


class Prober:
    """Bounded statfs probes; at most one thread per target stays stuck on a hung mount."""

    def __init__(self) -> None:
        self._inflight: dict[str, tuple[threading.Thread, float]] = {}  # target → statfs thread, its start
        self._lock = threading.Lock()

    def probe_many(self, targets: list[str], timeout: float = 1.0) -> dict[str, Probe]:
        """Probe all targets in parallel under one shared deadline."""
        entries = read_mountinfo()
        results: dict[str, Probe] = {}
        outcomes: dict[str, list[OSError | None]] = {}
        threads: dict[str, threading.Thread] = {}
        for target in targets:
            if not is_kvfs_mount(target, entries):
                results[target] = Probe(Health.UNMOUNTED, "no fuse.kvfs mount at the target")
                continue
            with self._lock:
                stuck = self._inflight.get(target)
                if stuck is not None and stuck[0].is_alive():
                    results[target] = Probe(Health.HUNG, "an earlier statfs has not answered yet", unanswered_since=stuck[1])
                    continue
                box: list[OSError | None] = []
                thread = threading.Thread(target=_statfs, args=(target, box), name="statfs", daemon=True)
                self._inflight[target] = (thread, time.monotonic())
            outcomes[target] = box
            threads[target] = thread
            thread.start()
        deadline = time.monotonic() + timeout
        for target, thread in threads.items():
            thread.join(max(0.0, deadline - time.monotonic()))
            box = outcomes[target]
            if not box:
                results[target] = Probe(Health.HUNG, f"statfs did not answer within {timeout:g}s")
                continue
            with self._lock:
                self._inflight.pop(target, None)
            exc = box[0]
            if exc is not None and exc.errno in _DEAD_ERRNOS:
                results[target] = Probe(Health.DEAD, f"statfs: {os.strerror(exc.errno or 0)}")
            else:
                # any answer, even ENOSYS, proves a daemon serves the connection
                results[target] = Probe(Health.HEALTHY)
        return results


def _statfs(target: str, box: list[OSError | None]) -> None:
    try:
        os.statvfs(target)
        box.append(None)
    except OSError as exc:
        box.append(exc)


def probe_mount(target: str, timeout: float = 1.0) -> Probe:
    """One bounded probe: mount table first, then statfs in a thread."""
    return Prober().probe_many([target], timeout)[target]
