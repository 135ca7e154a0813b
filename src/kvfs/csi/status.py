"""`kvfs csi status`: the node's mounter generations and volumes, from the state folder alone.

Run inside the plugin container (README "Upgrading"): it reads `<state-dir>/mounters/` and
`<state-dir>/volumes/`, pings each live mounter and probes each volume (mount table, a statfs
bounded by a deadline, the daemon's pid), and never talks gRPC or to the Kubernetes API. An old
mounter generation has drained when its row shows no volume.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from kvfs.csi.health import probe_volumes, read_failure
from kvfs.csi.mountinfo import Prober
from kvfs.csi.mounter import MounterClient
from kvfs.csi.mounters import MounterInfo, MounterRegistry
from kvfs.csi.state import StateStore, VolumeState
from kvfs.daemon.events import wall_time

HINT = "what one volume serves, object by object: kvfs status TARGET"
PROBE_TIMEOUT = 1.0


def collect(state_dir: str, *, timeout: float = PROBE_TIMEOUT) -> dict[str, Any]:
    """Everything `kvfs csi status --json` prints."""
    registry = MounterRegistry(state_dir)
    store = StateStore(state_dir) if os.path.isdir(os.path.join(state_dir, "volumes")) else None
    states = store.all() if store else []
    ready = [s for s in states if s.phase == "ready"]
    probes = probe_volumes(ready, Prober(), timeout)
    volumes = []
    for state in states:
        probe = probes.get(state.target_path)
        failure = read_failure(store, state.target_path) if store and probe else None
        volumes.append(
            {
                "pod": {"namespace": state.pod_namespace, "name": state.pod_name, "uid": state.pod_uid}
                if state.pod
                else None,
                "volume_id": state.volume_id,
                "target": state.target_path,
                "secret_provider_class": state.secret_provider_class or None,
                "mounter": state.mounter or None,
                "daemon_pid": state.pid or None,
                "uid": state.uid,
                "health": probe.health.value if probe else state.phase,
                "detail": probe.detail if probe else "",
                "failed_since": wall_time(failure.since) if failure else None,
            }
        )
    mounters = [_mounter(registry, m, states, timeout) for m in registry.all()]
    return {"state_dir": os.path.abspath(state_dir), "mounters": mounters, "volumes": volumes, "hint": HINT}


def _mounter(registry: MounterRegistry, info: MounterInfo, states: list[VolumeState], timeout: float) -> dict[str, Any]:
    alive = info.alive
    answering = alive and MounterClient(registry.socket_path(info.id)).ping(timeout) is not None
    return {
        "id": info.id,
        "pid": info.pid,
        "version": info.version,
        "started": wall_time(info.started),
        "alive": alive,
        "answering": answering,
        "volumes": sum(1 for s in states if s.mounter == info.id),
    }


def render(report: dict[str, Any]) -> str:
    """The human view: one table of mounters (newest first), one of volumes."""
    lines = [f"state folder {report['state_dir']}", ""]
    mounters = [
        [m["id"], str(m["pid"]), m["version"], m["started"], _alive(m), str(m["volumes"])] for m in report["mounters"]
    ]
    lines += _table(["MOUNTER", "PID", "VERSION", "STARTED", "ALIVE", "VOLUMES"], mounters) or ["no mounter registered"]
    lines.append("")
    volumes = []
    for v in report["volumes"]:
        pod = f"{v['pod']['namespace']}/{v['pod']['name']}" if v["pod"] else "-"
        health = v["health"] + (f": {v['detail']}" if v["detail"] else "")
        health += f" (since {v['failed_since']})" if v["failed_since"] else ""
        daemon = str(v["daemon_pid"] or "-")
        volumes.append([pod, v["volume_id"], v["mounter"] or "-", daemon, str(v["uid"]), health, v["target"]])
    header = ["POD", "VOLUME", "MOUNTER", "DAEMON", "UID", "HEALTH", "TARGET"]
    lines += _table(header, volumes) or ["no volume"]
    lines += ["", HINT]
    return "\n".join(lines)


def _alive(mounter: dict[str, Any]) -> str:
    if not mounter["alive"]:
        return "no"
    return "yes" if mounter["answering"] else "yes (not answering)"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned columns; [] for no rows."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]


def main(state_dir: str, *, as_json: bool) -> int:
    """`kvfs csi status`; 2 when the folder holds no plugin state or cannot be read."""
    if os.path.isdir(state_dir) and not os.access(state_dir, os.R_OK | os.X_OK):
        print(f"kvfs csi status: --state-dir {state_dir}: permission denied (it is root's: run as root)", file=sys.stderr)
        return 2
    if not any(os.path.isdir(os.path.join(state_dir, sub)) for sub in ("volumes", "mounters")):
        print(
            f"kvfs csi status: --state-dir {state_dir}: no kvfs CSI state there (pass the plugin's --state-dir;"
            " run it in the plugin container, where /var/lib/kvfs/csi is mounted)",
            file=sys.stderr,
        )
        return 2
    report = collect(state_dir)
    print(json.dumps(report, indent=2) if as_json else render(report))
    return 0
