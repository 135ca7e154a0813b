"""Dead volumes: found by the health sweep, recorded, reported once, and healed if the admin wants.

A volume fails when its daemon exits, its mount stops answering a bounded `statfs`, or the mount
disappears (kvfs.csi.mountinfo). A daemon cannot come back to a FUSE connection (FUSE_INIT is sent
once), so the pod's reads fail (ENOTCONN) until the pod gets a fresh mount; a hung daemon's (one
stopped or stuck) wait in the kernel until it answers again. What the plugin does:

- records the failure beside the volume's state (`failure.json`: health, cause, since), which
  `kvfs csi status` shows; a later plugin process finds it, so a restart does not report it again;
- logs it once, naming the pod (namespace/name) and the cause;
- posts a `VolumeFailed` Warning event on the pod (kvfs.csi.events: rate-limited, off-thread);
- with `--restart-pods-with-failed-volumes`, deletes the pod (with its uid as precondition) so its
  controller makes a fresh one (a hung volume only once one statfs has gone unanswered for a whole
  health interval): never a pod without a controller (an ownerReference with
  `controller: true`), never the same pod (namespace/name) twice within RESTART_INTERVAL. The
  deletions are remembered in `<state-dir>/restarted-pods.json`, so the limit holds across plugin
  restarts. Deleting talks to the API, so it runs in the plugin's sweep loop, never in kubelet's
  Probe call.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from kvfs.csi.events import EventRecorder, Reason
from kvfs.csi.kube import KubeClient, KubeError, PodRef
from kvfs.csi.mountinfo import Health, Probe, Prober
from kvfs.csi.state import StateStore, VolumeState, process_alive

log = logging.getLogger(__name__)

RESTART_INTERVAL = 300.0  # seconds: at most one deletion per pod (namespace/name) within this
FAILURE_FILE = "failure.json"
RESTARTS_FILE = "restarted-pods.json"


def probe_volumes(states: Iterable[VolumeState], prober: Prober, timeout: float) -> dict[str, Probe]:
    """Each volume's health by target: the mount table, a statfs bounded by `timeout`, and the
    daemon's pid (a daemon that exited is named as the cause, even when statfs would hang)."""
    states = list(states)
    probes = prober.probe_many([s.target_path for s in states], timeout)
    for state in states:
        probe = probes[state.target_path]
        if probe.health is not Health.UNMOUNTED and state.pid and not process_alive(state.pid, state.pid_start):
            probes[state.target_path] = Probe(Health.DEAD, f"its daemon (pid {state.pid}) exited")
    return probes


@dataclass(frozen=True)
class Failure:
    """What `failure.json` holds: the health the sweep found, why, and since when (wall clock)."""

    health: str
    cause: str
    since: float


def read_failure(store: StateStore, target: str) -> Failure | None:
    try:
        raw = json.loads((store.volume_dir(target) / FAILURE_FILE).read_text())
        return Failure(str(raw["health"]), str(raw["cause"]), float(raw["since"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring an unreadable failure record of %s: %s", target, exc)
        return None


def pod_ref(state: VolumeState) -> PodRef | None:
    """The volume's pod, when kubelet named it (podInfoOnMount) with its uid."""
    if state.pod_namespace and state.pod_name and state.pod_uid:
        return PodRef(state.pod_namespace, state.pod_name, state.pod_uid)
    return None


class FailedVolumes:
    """Reports failed volumes (record, log, event) and, with `restart_pods`, deletes their pods."""

    def __init__(
        self,
        store: StateStore,
        recorder: EventRecorder,
        kube: Callable[[], KubeClient],
        *,
        restart_pods: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.recorder = recorder
        self.kube = kube
        self.restart_pods = restart_pods
        self.clock = clock
        self._restarts_guard = threading.Lock()
        self._told: set[tuple[str, str]] = set()  # (volume id, why not restarted): logged once each

    # ---- reporting (any thread; the caller holds the volume's lock) ----

    def report(self, state: VolumeState, probe: Probe) -> None:
        """A sweep's finding for one ready volume: a new failure is recorded, logged and posted once."""
        recorded = read_failure(self.store, state.target_path)
        if probe.health is Health.HEALTHY:
            if recorded is not None:
                _remove(self.store.volume_dir(state.target_path) / FAILURE_FILE)
                log.info("volume %s at %s is healthy again", state.volume_id, state.target_path)
            return
        if recorded is not None and recorded.health == probe.health.value:
            return  # reported already, perhaps by an earlier plugin process
        failure = Failure(probe.health.value, probe.detail, self.clock())
        if not _write(self.store.volume_dir(state.target_path), FAILURE_FILE, asdict(failure)):
            return  # unpublished meanwhile
        who = f"pod {state.pod}" if state.pod else "a pod kubelet did not name"
        fields = {"volume": state.volume_id, "pod": state.pod, "health": failure.health}
        log.error(
            "volume %s of %s at %s is %s: %s; %s (%s)",
            state.volume_id,
            who,
            state.target_path,
            failure.health,
            failure.cause,
            _reads(failure.health),
            "kvfs deletes the pod so its controller recreates it"
            if self.restart_pods
            else "recreate the pod, or run the plugin with --restart-pods-with-failed-volumes",
            extra=fields,
        )
        pod = pod_ref(state)
        if pod is not None:
            # keyed by health too: a hung volume whose daemon then dies is told again, a flapping one is not
            self.recorder.record(
                pod, Reason.VOLUME_FAILED, self._message(state, failure), object_key=f"{state.volume_id}/{failure.health}"
            )

    def _message(self, state: VolumeState, failure: Failure) -> str:
        fix = (
            "kvfs deletes this pod so that its controller makes a fresh one with a fresh mount"
            if self.restart_pods
            else "delete the pod so that its controller makes a fresh one with a fresh mount (a cluster admin can"
            " have kvfs do it: kvfs csi node --restart-pods-with-failed-volumes)"
        )
        return (
            f"kvfs volume {state.volume_id} at {state.target_path} is {failure.health}: {failure.cause}."
            f" {_reads(failure.health).capitalize()}; {fix}"
        )

    # ---- healing (the plugin's sweep loop: it waits on the API) ----

    def restart(self, failed: Iterable[VolumeState]) -> list[str]:
        """Delete the pods of these failed volumes where allowed; the pods deleted (`namespace/name`)."""
        if not self.restart_pods:
            return []
        return [f"{pod.namespace}/{pod.name}" for state in failed if (pod := self._restart(state)) is not None]

    def _restart(self, state: VolumeState) -> PodRef | None:
        pod = pod_ref(state)
        if pod is None:
            self._tell_once(state, "no pod", "kubelet gave no pod name and uid (CSIDriver podInfoOnMount)")
            return None
        key = f"{pod.namespace}/{pod.name}"
        last = self._restarts().get(key)
        if last is not None and self.clock() - last < RESTART_INTERVAL:
            log.debug("pod %s: deleted %.0f s ago; not again within %.0f s", key, self.clock() - last, RESTART_INTERVAL)
            return None
        try:
            current = self.kube().get_pod(pod.namespace, pod.name)
            meta = current.get("metadata") or {}
            if meta.get("uid") != pod.uid or meta.get("deletionTimestamp"):
                return None  # that pod is gone or going; a pod of the same name is another pod
            owners = [o for o in meta.get("ownerReferences") or [] if isinstance(o, dict) and o.get("controller") is True]
            if not owners:
                self._tell_once(state, "no controller", "it has no controller that would make a new one; recreate it yourself")
                return None
            self.kube().delete_pod(pod.namespace, pod.name, uid=pod.uid)
        except KubeError as exc:
            if exc.status not in (404, 409):  # gone, or replaced under the same name
                hint = " (the csi/components/restart-failed-pods component grants delete on pods)" if exc.status == 403 else ""
                log.warning("cannot restart pod %s with failed volume %s: %s%s", key, state.volume_id, exc, hint)
            return None
        self._remember(key)
        owner = owners[0]
        log.warning(
            "deleted pod %s (uid %s) whose kvfs volume %s failed; its %s %s makes a fresh one",
            key,
            pod.uid,
            state.volume_id,
            owner.get("kind"),
            owner.get("name"),
            extra={"volume": state.volume_id, "pod": key},
        )
        return pod

    def _tell_once(self, state: VolumeState, why: str, text: str) -> None:
        if (state.volume_id, why) not in self._told:
            self._told.add((state.volume_id, why))
            log.warning("not restarting the pod of failed volume %s (%s): %s", state.volume_id, state.pod or "?", text)

    def _restarts(self) -> dict[str, float]:
        """Pod → when kvfs last deleted it, within RESTART_INTERVAL."""
        path = self.store.root / RESTARTS_FILE
        try:
            raw = json.loads(path.read_text())
            entries = {str(k): float(v) for k, v in raw.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return {}
        now = self.clock()
        return {k: v for k, v in entries.items() if now - v < RESTART_INTERVAL}

    def _remember(self, key: str) -> None:
        with self._restarts_guard:
            _write(self.store.root, RESTARTS_FILE, {**self._restarts(), key: self.clock()})


def _reads(health: str) -> str:
    """What the pod's reads do: the kernel queues them for a hung daemon, fails them without one."""
    if health == Health.HUNG.value:
        return "reads of its files wait (they do not fail) until its daemon answers again or the pod gets a fresh mount"
    return "reads of its files fail until the pod gets a fresh mount"


def _write(folder: Path, name: str, content: object) -> bool:
    """Atomically replace `folder/name`; False when the folder is gone (never recreated here)."""
    tmp = folder / (name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except FileNotFoundError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(content, f, sort_keys=True)
    os.replace(tmp, folder / name)
    return True


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
