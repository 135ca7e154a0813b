"""`kvfs status`: find a mount's daemon from its folder, ask it, show what it serves.

A `kvfs mount` advertises its control socket as the root's extended attribute `user.kvfs.control`
(its place is also `kvfs.daemon.control.socket_path_for`); a CSI volume's is in the plugin's
state folder, which the caller passes as a candidate. Nothing here may hang on a dead or hung
mount: the extended attribute is read in a thread with a deadline, and the control client has
its own timeout. What is shown comes from the daemon's live state (`status`), never its logs.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kvfs.daemon import jsonline
from kvfs.daemon.control import CONTROL_XATTR, ControlClient, ControlError, socket_path_for

XATTR_TIMEOUT = 2.0  # seconds to wait for the mount's root to give its control socket's path


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def advertised_socket(mountpoint: str, timeout: float = XATTR_TIMEOUT) -> str | None:
    """The root's `user.kvfs.control`, read in a thread: a hung mount makes it None, not a hang."""
    found: list[str] = []

    def read() -> None:
        try:
            found.append(os.getxattr(mountpoint, CONTROL_XATTR).decode())
        except OSError:
            pass

    thread = threading.Thread(target=read, name="getxattr", daemon=True)
    thread.start()
    thread.join(timeout)
    return found[0] if found and os.path.isabs(found[0]) else None


def find_control_socket(mountpoint: str, candidates: Iterable[str] = ()) -> str | None:
    """The control socket of the kvfs mount at `mountpoint`: advertised, one of `candidates`
    (a CSI volume's, in the plugin's state folder), or where `kvfs mount` puts it; None if none."""
    for path in (advertised_socket(mountpoint), *candidates, socket_path_for(mountpoint)):
        if path and _is_socket(path):
            return path
    return None


def daemon_status(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """The daemon's `status` reply; jsonline.ProtocolError (ControlError too) if it cannot be had."""
    return ControlClient(path, timeout=timeout).status()


def serving_pid(mountpoint: str) -> int | None:
    """The pid of the kvfs process serving `mountpoint`, if its daemon answers."""
    path = find_control_socket(mountpoint)
    if path is None:
        return None
    try:
        pid = daemon_status(path, timeout=2.0).get("pid")
    except (jsonline.ProtocolError, ControlError):
        return None
    return pid if isinstance(pid, int) and pid > 0 else None


# ---- the human view ---------------------------------------------------------------------------------


def _cell(value: object) -> str:
    return "-" if value in (None, "") else str(value)


def _error_cell(error: object) -> str:
    return f"{_cell(error.get('errno'))} {_cell(error.get('code'))}" if isinstance(error, Mapping) else "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]


def render(status: Mapping[str, Any]) -> str:
    """The status reply as a few lines and a table: identity, then each object, then its errors."""
    where = status.get("mountpoint") or f"CSI volume {_cell(status.get('volume_id'))}"
    lines = [f"{where}: served by pid {_cell(status.get('pid'))} from {_cell(status.get('vault_url'))}"]
    pod = status.get("pod")
    if isinstance(pod, Mapping):
        lines.append(f"pod:      {_cell(pod.get('namespace'))}/{_cell(pod.get('name'))}")
    identity = status.get("identity")
    if isinstance(identity, Mapping):
        lines.append(
            f"identity: {_cell(identity.get('mode'))}, client id {_cell(identity.get('client_id'))},"
            f" tenant {_cell(identity.get('tenant_id'))}"
        )
        expires = identity.get("token_expires_at")
        lines.append(f"token:    {f'valid until {expires}' if expires else 'none yet'}")
    objects = [o for o in status.get("objects") or [] if isinstance(o, Mapping)]
    rows = [
        [_cell(o.get("file")), _cell(o.get("object")), _cell(o.get("version")), _cell(o.get("fetched_at")),
         _cell(o.get("refreshed_at")), _error_cell(o.get("error"))]
        for o in objects
    ]  # fmt: skip
    lines += ["", *_table(["FILE", "OBJECT", "VERSION", "FETCHED", "REFRESHED", "LAST ERROR"], rows)]
    failing = [o for o in objects if isinstance(o.get("error"), Mapping)]
    if failing:
        lines += ["", "last errors:"]
        for o in failing:
            error = o["error"]
            lines.append(
                f"  {_cell(o.get('file'))}: {_cell(error.get('at'))} {_cell(error.get('errno'))}"
                f" {_cell(error.get('code'))}: {_cell(error.get('message'))}"
            )
    failed_reads = status.get("errors")
    if isinstance(failed_reads, Mapping) and failed_reads:
        counted = ", ".join(f"{name} {count}" for name, count in sorted(failed_reads.items()))
        lines += ["", f"failed reads since mounted: {counted}"]
    return "\n".join(lines)
