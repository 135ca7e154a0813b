"""Mounter generations: every mounter of a node registers in the state folder, the plugin finds them there.

    <state-dir>/mounters/<id>/mounter.sock   the mounter's socket (kvfs.csi.mounter)
    <state-dir>/mounters/<id>/info.json      {"id", "pid", "pid_start", "version", "started", "entry"}

A mounter (`kvfs csi mounter --state-dir DIR`) picks a fresh id, listens on its socket, then
writes its info file (atomically), so a registered mounter already accepts connections. Any number
may serve one state folder at once: an upgrade starts the new version's mounter beside the old
one. New volumes go to the most recently started mounter that is alive and answers (`started`,
the wall clock when its process started; ties broken by id); each volume's state records the id
of the mounter that started its daemon, for `kvfs csi status`. Nothing else needs the owning
mounter: republish and unpublish talk to the daemon and the mount directly.

Only the mounter writes its folder; only the plugin removes it, once the mounter is dead and no
volume names it (`prune`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from kvfs.csi.state import SUN_PATH_MAX, process_alive

log = logging.getLogger(__name__)

SOCKET_NAME = "mounter.sock"
INFO_NAME = "info.json"
ORPHAN_AGE = 600.0  # a folder without an info file this old is a mounter that died starting up


@dataclass(frozen=True)
class MounterInfo:
    id: str
    pid: int
    pid_start: int  # /proc/PID/stat starttime: a reused pid is not this mounter
    version: str
    started: float  # wall clock when its process started
    entry: str = ""  # its --daemon-entry

    @property
    def alive(self) -> bool:
        return process_alive(self.pid, self.pid_start)


def new_id() -> str:
    """`<pid>-<6 hex>`: readable in `kvfs csi status`, unique even when a pid comes back."""
    return f"{os.getpid()}-{secrets.token_hex(3)}"


class MounterRegistry:
    """The `mounters/` folder of one state folder."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.root = Path(state_dir) / "mounters"

    def socket_path(self, mounter_id: str) -> str:
        path = str(self.root / mounter_id / SOCKET_NAME)
        if len(os.fsencode(path)) > SUN_PATH_MAX:
            raise ValueError(
                f"state directory {self.root.parent} is too long for unix socket paths "
                f"({len(path)} > {SUN_PATH_MAX} bytes): pass a shorter --state-dir"
            )
        return path

    def prepare(self, mounter_id: str) -> str:
        """Make the mounter's folder (root-only); its socket path."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.root / mounter_id).mkdir(mode=0o700)
        return self.socket_path(mounter_id)

    def register(self, info: MounterInfo) -> None:
        """Write the info file, atomically: the mounter is announced only once it listens."""
        folder = self.root / info.id
        tmp = folder / (INFO_NAME + ".tmp")
        tmp.write_text(json.dumps(asdict(info), sort_keys=True))
        os.replace(tmp, folder / INFO_NAME)

    def all(self) -> list[MounterInfo]:
        """Every registered mounter, alive or not, the most recently started first."""
        found = [info for folder, info in self._folders() if info is not None and info.id == folder.name]
        return sorted(found, key=lambda m: (m.started, m.id), reverse=True)

    def live(self) -> list[MounterInfo]:
        """The mounters whose process runs, the most recently started first."""
        return [m for m in self.all() if m.alive]

    def prune(self, in_use: set[str], *, now: float | None = None) -> list[str]:
        """Remove the folders of dead mounters that no volume names, and of mounters that died
        before registering; the ids removed."""
        now = time.time() if now is None else now
        removed = []
        for folder, info in self._folders():
            if info is None:
                try:
                    stale = now - folder.stat().st_mtime > ORPHAN_AGE
                except OSError:
                    continue
            else:  # a live mounter whose pid this process cannot see (no shared pid namespace) still listens
                stale = not info.alive and folder.name not in in_use and not _listening(folder / SOCKET_NAME)
            if stale:
                log.info("removing the folder of mounter %s (%s)", folder.name, "gone" if info else "never registered")
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        return removed

    def _folders(self) -> list[tuple[Path, MounterInfo | None]]:
        try:
            folders = sorted(self.root.iterdir())
        except FileNotFoundError:
            return []
        return [(folder, _read(folder / INFO_NAME)) for folder in folders]


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _read(path: Path) -> MounterInfo | None:
    try:
        raw = json.loads(path.read_text())
        known = {f.name for f in fields(MounterInfo)}
        return MounterInfo(**{k: v for k, v in raw.items() if k in known})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable mounter info %s: %s", path, exc)
        return None
