"""SecretProviderClassPodStatus objects: which pod mounts which class, and the versions it was served.

Upstream's driver writes one per mounted pod volume that names a SecretProviderClass, and tools and
runbooks read them (`kubectl get secretproviderclasspodstatuses`); so does kvfs, with upstream's
name (`<pod>-<namespace>-<class>`), node label and fields (kvfs.csi.kube.spc_pod_status_body):

- created at publish: `mounted: true`, `targetPath`, no objects yet (kvfs fetches on first read);
- updated from the daemon's events (kvfs.csi.watch): an object's first read (`served`) and each
  rotation (`rotated`) set its `{id, version}`; ids are upstream's, `<type>/<name>`, and
  `<type>/<name>/<index>` for each entry of a history folder;
- deleted at unpublish. It is owned by its pod, so the garbage collector removes it with the pod
  when kvfs cannot (the node went away);
- made again when it goes while its volume stays mounted (an admin deleted it, or the CRD was
  removed and applied again during a switch-over): found at a republish (kubelet's periodic call,
  at most once per CHECK_INTERVAL) or at once by the Secret sync of a rotation a Secret shows, and
  written with the versions the daemon's event ring still holds. Synced Secrets the garbage collector took with it
  are then synced again (kvfs.csi.sync).

Always on: the base RBAC grants it, and Secret sync (kvfs.csi.sync) hangs its Secrets on these
objects. An API failure never fails a volume: it is logged once (again after a success), and a
status that could not be created at publish is created at the pod's next republish.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kvfs.csi.kube import (
    SPC_POD_STATUSES,
    KubeClient,
    KubeError,
    PodRef,
    spc_pod_status_body,
    spc_pod_status_name,
)
from kvfs.csi.state import VolumeState

log = logging.getLogger(__name__)

# seconds between a republish's checks that a volume's status object still exists: one GET per volume
# at most this often (kubelet republishes every minute or two), as upstream's Secret sync requeues
CHECK_INTERVAL = 300.0


class OnceLog:
    """Logs the first failure of each kind at WARNING and repeats at DEBUG, until one succeeds again."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._failing: set[str] = set()
        self._lock = threading.Lock()

    def failed(self, kind: str, message: str, *args: object) -> None:
        with self._lock:
            first = kind not in self._failing
            self._failing.add(kind)
        self._log.log(logging.WARNING if first else logging.DEBUG, message, *args)

    def succeeded(self, kind: str) -> None:
        with self._lock:
            self._failing.discard(kind)


def pod_ref(state: VolumeState) -> PodRef:
    return PodRef(state.pod_namespace, state.pod_name, state.pod_uid)


def applies(state: VolumeState) -> bool:
    """Only volumes that name a SecretProviderClass, with kubelet's pod info, have a status object."""
    return bool(state.secret_provider_class and state.pod_namespace and state.pod_name and state.pod_uid)


def served_versions(known: Mapping[str, str], events: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """`known` ({id: version}) after a daemon's `served` and `rotated` events, in their order. A
    `served` event only adds an id: it is an object's first load, so for an id already known it is
    an old event read again (a restarted plugin reads every daemon's events again)."""
    versions = dict(known)
    for event in events:
        kind = event.get("kind")
        if kind not in ("served", "rotated"):
            continue
        object_id = str(event.get("object") or "")
        if "versions" in event:  # a history folder: one id per entry, as upstream numbers them
            found = {f"{object_id}/{i}": str(v) for i, v in enumerate(event.get("versions") or [])}
        else:
            version = event.get("version") if kind == "served" else event.get("new_version")
            found = {object_id: str(version)} if object_id and version else {}
        for key, version in found.items():
            if kind == "rotated" or key not in versions:
                versions[key] = version
    return versions


class PodStatuses:
    """Writes the SecretProviderClassPodStatus of each volume; a volume hook and an event subscriber."""

    def __init__(
        self,
        kube: Callable[[], KubeClient],
        node_id: str,
        *,
        history: Callable[[VolumeState], Sequence[Mapping[str, Any]]] = lambda state: (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`history(state)` is every event the volume's daemon still holds (empty when it cannot
        tell): what a status made again lists as served."""
        self._kube = kube
        self.node_id = node_id
        self._history = history
        self.clock = clock
        self._log = OnceLog(log)
        self._missing: set[str] = set()  # targets whose status could not be created yet
        self._checked: dict[str, float] = {}  # target → when its status was last seen or written
        self._renewed: set[str] = set()  # targets whose status was made again: their Secrets are synced again
        self._lock = threading.Lock()

    def name(self, state: VolumeState) -> str:
        return spc_pod_status_name(pod_ref(state), state.secret_provider_class)

    def owner_reference(self, state: VolumeState) -> dict[str, Any] | None:
        """The status object as an owner (of synced Secrets), made again if it went; None when it can
        be neither read nor made. Only for a volume that is published (its lock held)."""
        obj = self._existing(state)
        if obj is None:
            return None
        return {
            "apiVersion": SPC_POD_STATUSES.group_version,
            "kind": SPC_POD_STATUSES.kind,
            "name": obj["metadata"].get("name"),
            "uid": obj["metadata"].get("uid"),
        }

    # ---- volume hooks (kvfs.csi.volumes) ---------------------------------------------------

    def published(self, state: VolumeState) -> None:
        """A new mount: its status starts over (mounted, no object served yet)."""
        if not applies(state):
            return
        body = spc_pod_status_body(
            pod_ref(state), state.secret_provider_class, node_id=self.node_id, target_path=state.target_path
        )
        written = self._write(state, "create", lambda current: body)
        with self._lock:
            if written:
                self._missing.discard(state.target_path)
                self._checked[state.target_path] = self.clock()
            else:
                self._missing.add(state.target_path)

    def republished(self, state: VolumeState) -> None:
        """kubelet's periodic call: creates a status that the publish could not, and checks, at most
        once per CHECK_INTERVAL (whether the last check worked or not), that the status still exists
        (no API call otherwise)."""
        if not applies(state):
            return
        with self._lock:
            missing = state.target_path in self._missing
            due = self.clock() - self._checked.get(state.target_path, float("-inf")) >= CHECK_INTERVAL
            if due and not missing:
                self._checked[state.target_path] = self.clock()  # an API that is down is not asked per republish
        if missing or due:
            self._existing(state)

    def renewed(self, state: VolumeState) -> bool:
        """Whether the status was made again since the last call: the Secrets it owned are gone."""
        with self._lock:
            renewed = state.target_path in self._renewed
            self._renewed.discard(state.target_path)
        return renewed

    def unpublished(self, state: VolumeState) -> None:
        with self._lock:
            self._missing.discard(state.target_path)
            self._checked.pop(state.target_path, None)
            self._renewed.discard(state.target_path)
        if not applies(state):
            return
        try:
            self._kube().delete_object(SPC_POD_STATUSES, state.pod_namespace, self.name(state))
        except KubeError as exc:
            if exc.status != 404:
                self._failed("delete", state, exc)
                return
        self._log.succeeded("delete")

    # ---- daemon events (kvfs.csi.watch.EventSubscriber) -------------------------------------

    def on_events(self, volume: VolumeState, events: Sequence[Mapping[str, Any]]) -> None:
        """Record the versions served; an id the status holds is updated, never removed."""
        if not applies(volume) or not served_versions({}, events):
            return

        def merge(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if current is None:
                # not created (yet, or any more): the volume is being published or unpublished, or
                # someone deleted it, and the next republish check or rotation's sync makes it again
                return None
            status = current.setdefault("status", {})
            known = {str(o.get("id")): str(o.get("version")) for o in status.get("objects") or [] if isinstance(o, dict)}
            versions = served_versions(known, events)
            if versions == known:
                return None
            status["objects"] = [{"id": key, "version": value} for key, value in sorted(versions.items())]
            return current

        self._write(volume, "update", merge)

    def _existing(self, state: VolumeState) -> dict[str, Any] | None:
        """The volume's status object, made again when it is gone; None when it can be neither read nor made."""
        name = self.name(state)
        try:
            obj: dict[str, Any] | None = self._kube().get_object(SPC_POD_STATUSES, state.pod_namespace, name)
        except KubeError as exc:
            if exc.status != 404:
                self._failed("read", state, exc)
                return None
            obj = self._recreate(state)
        else:
            self._log.succeeded("read")
        if obj is not None:
            with self._lock:
                self._missing.discard(state.target_path)
                self._checked[state.target_path] = self.clock()
        return obj

    def _recreate(self, state: VolumeState) -> dict[str, Any] | None:
        """Write the status of a mounted volume again, with the versions its daemon served."""
        versions = served_versions({}, self._history(state))
        body = spc_pod_status_body(
            pod_ref(state),
            state.secret_provider_class,
            node_id=self.node_id,
            target_path=state.target_path,
            objects=versions,
        )
        made: list[bool] = []

        def create(current: dict[str, Any] | None) -> dict[str, Any] | None:
            made[:] = [current is None]
            return body if current is None else None  # another writer made it meanwhile: leave theirs

        try:
            obj = self._kube().read_modify_write(SPC_POD_STATUSES, state.pod_namespace, self.name(state), create)
        except KubeError as exc:
            self._failed("create", state, exc)
            return None
        self._log.succeeded("create")
        with self._lock:
            late = state.target_path in self._missing  # the publish's own create had failed: nothing was lost
        if made == [True] and late:
            log.info(
                "SecretProviderClassPodStatus %s/%s made (its create at publish had failed)",
                state.pod_namespace,
                self.name(state),
            )
        elif made == [True]:
            log.warning(
                "SecretProviderClassPodStatus %s/%s was deleted while pod %s still mounts the volume: made it again"
                " (listing %d object version(s) its daemon served)",
                state.pod_namespace,
                self.name(state),
                state.pod,
                len(versions),
                extra={"volume": state.volume_id, "pod": state.pod},
            )
            with self._lock:
                self._renewed.add(state.target_path)
        return obj

    def _write(
        self, state: VolumeState, what: str, change: Callable[[dict[str, Any] | None], dict[str, Any] | None]
    ) -> bool:
        try:
            self._kube().read_modify_write(SPC_POD_STATUSES, state.pod_namespace, self.name(state), change)
        except KubeError as exc:
            self._failed(what, state, exc)
            return False
        self._log.succeeded(what)
        return True

    def _failed(self, what: str, state: VolumeState, exc: KubeError) -> None:
        hint = " (the plugin's service account needs secretproviderclasspodstatuses rights)" if exc.status == 403 else ""
        if exc.status == 404 and what == "create":
            hint = " (is the SecretProviderClassPodStatus CRD installed? kubectl apply -k csi/crds)"
        self._log.failed(
            what,
            "cannot %s SecretProviderClassPodStatus %s/%s: %s%s; the volume is not affected",
            what,
            state.pod_namespace,
            self.name(state),
            exc,
            hint,
        )
