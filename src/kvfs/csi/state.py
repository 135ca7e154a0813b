"""What the plugin must remember across its own restarts, on disk, per volume.

One folder per target path under `<state-dir>/volumes/`, holding `state.json` and the daemon's
control socket. It records only identifiers (volume id, target, daemon pid and start time, the
daemon's own uid/gid) — never a token, a secret or the volume parameters — so a crashed or
upgraded plugin can republish and unpublish volumes it did not publish itself, and the uids of
living volumes stay taken.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Phase = Literal["starting", "ready"]
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the terminating NUL


@dataclass(frozen=True)
class VolumeState:
    volume_id: str
    target_path: str
    phase: Phase = "starting"
    pid: int = 0  # the daemon, in the mounter's pid namespace (0 = not forked yet)
    pid_start: int = 0  # /proc/PID/stat starttime: guards against pid reuse
    uid: int = 0  # the daemon's own uid, from --daemon-uid-range (0 = none allocated)
    gid: int = 0
    created: float = 0.0  # wall clock, for humans
    # kubelet's pod info: whose volume this is, for pod events, status objects and `kvfs csi status`
    pod_namespace: str = ""
    pod_name: str = ""
    pod_uid: str = ""
    secret_provider_class: str = ""  # "" when the parameters came inline
    mounter: str = ""  # the id of the mounter generation that started the daemon (kvfs.csi.mounters)

    @property
    def pod(self) -> str:
        """`namespace/name`, or "" when kubelet gave no pod info."""
        return "/".join(filter(None, (self.pod_namespace, self.pod_name)))


def volume_key(target_path: str) -> str:
    return hashlib.sha256(os.path.normpath(target_path).encode()).hexdigest()[:16]


def control_socket_of(state_dir: str | os.PathLike[str], target_path: str) -> Path:
    """Where a volume's control socket is; touches nothing (`kvfs status` on a node)."""
    return Path(state_dir) / "volumes" / volume_key(target_path) / "control.sock"


class StateStore:
    """`<root>/volumes/<sha256(target)[:16]>/{state.json,control.sock}`, root-only (0700)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.volumes = self.root / "volumes"
        self.volumes.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        os.chmod(self.volumes, 0o700)

    def volume_dir(self, target_path: str) -> Path:
        return self.volumes / volume_key(target_path)

    def control_socket(self, target_path: str) -> Path:
        path = control_socket_of(self.root, target_path)
        if len(os.fsencode(str(path))) > SUN_PATH_MAX:
            raise ValueError(
                f"state directory {self.root} is too long for unix socket paths "
                f"({len(str(path))} > {SUN_PATH_MAX} bytes): pass a shorter --state-dir"
            )
        return path

    def load(self, target_path: str) -> VolumeState | None:
        return self._read(self.volume_dir(target_path) / "state.json")

    def save(self, state: VolumeState) -> None:
        """Atomic replace, so a crash mid-write leaves the old or the new state, never half."""
        folder = self.volume_dir(state.target_path)
        folder.mkdir(mode=0o700, exist_ok=True)
        tmp = folder / "state.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(dataclasses.asdict(state), f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / "state.json")

    def remove(self, target_path: str) -> None:
        shutil.rmtree(self.volume_dir(target_path), ignore_errors=True)

    def all(self) -> list[VolumeState]:
        """Every readable state; read-only, so it never races a publish creating its folder."""
        states = []
        for folder in sorted(self.volumes.iterdir()):
            state = self._read(folder / "state.json")
            if state is not None:
                states.append(state)
        return states

    def prune(self) -> None:
        """Remove folders a crash left without a state file (call before serving)."""
        for folder in sorted(self.volumes.iterdir()):
            if folder.is_dir() and not (folder / "state.json").exists():
                log.info("removing state folder %s without a state file", folder)
                shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def _read(path: Path) -> VolumeState | None:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable state file %s: %s", path, exc)
            return None
        known = {f.name for f in dataclasses.fields(VolumeState)}
        try:
            return VolumeState(**{k: v for k, v in raw.items() if k in known})
        except TypeError as exc:
            log.warning("ignoring state file %s with missing fields: %s", path, exc)
            return None


def new_state(volume_id: str, target_path: str, uid: int, gid: int, **pod: str) -> VolumeState:
    """A volume being published; `pod` holds the pod_* and secret_provider_class fields."""
    return VolumeState(volume_id, os.path.normpath(target_path), "starting", 0, 0, uid, gid, time.time(), **pod)


def process_start_time(pid: int) -> int | None:
    """starttime of a live (non-zombie) process, or None when it is gone or not visible here."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after its last ')'
    rest = raw[raw.rindex(b")") + 2 :].split()
    if rest[0] in (b"Z", b"X"):
        return None
    return int(rest[19])


def process_alive(pid: int, start: int) -> bool:
    """`pid` is alive and still the process that started at `start` (0 never matches: no guessing)."""
    started = process_start_time(pid)
    return started is not None and start > 0 and started == start
