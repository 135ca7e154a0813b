"""`secretObjects` → Kubernetes Secrets (`kvfs csi node --sync-secrets`, upstream's `syncSecret.enabled`).

For a pod volume whose SecretProviderClass lists `secretObjects`, each named Secret in the pod's
namespace is created or updated with the bytes of the files it names (kvfs.csi.secretdata), its
`type`, `labels`, `annotations` and upstream's label `secrets-store.csi.k8s.io/managed=true`.

- When: once at publish, the only eager fetch kvfs makes: the plugin asks the volume's daemon for
  just those files (the control op `fetch`), which reads them through its cache with the pod's own
  identity. The bytes reach the plugin over the daemon's socket, never through a file, and are
  never logged. Again at each rotation of one of those files (the daemon's `rotated` events).
- Owners: as upstream, the Secret's ownerReferences list the SecretProviderClassPodStatus of every
  pod that mounts it (kvfs.csi.podstatus), each owned by its pod. Unpublish removes this pod's
  reference and deletes the Secret when none is left; when a pod goes without an unpublish (a lost
  node), the garbage collector does the same through the chain pod → status → Secret.
- A Secret kvfs did not create (no managed label) is never written or deleted: the sync is
  refused with a Warning event on the pod (`SecretSyncRefused`).
- Failures (an API error, a file that cannot be read, an entry that is not valid) are Warning
  events (`SecretSyncFailed`) and log lines; they never fail the volume or the publish. A sync that
  failed is tried again at the pod's next republish (kubelet's periodic call).
- A status object deleted while its pod runs (and with it, by the garbage collector, the Secrets
  only it owned) is made again by the sync of the next rotation a Secret shows, or by the
  republish check (kvfs.csi.podstatus), and then every Secret of the class is synced again.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal

from kvfs.config.model import SecretObject
from kvfs.config.spc import secret_objects
from kvfs.csi.events import EventRecorder, Reason
from kvfs.csi.kube import SECRETS, SPC_POD_STATUSES, KubeClient, KubeError, secret_body
from kvfs.csi.podstatus import OnceLog, PodStatuses, applies, pod_ref
from kvfs.csi.secretdata import SecretDataError, secret_data
from kvfs.csi.state import VolumeState
from kvfs.daemon import jsonline
from kvfs.daemon.control import MAX_FETCH_FILES, ControlClient, FileError

log = logging.getLogger(__name__)

MANAGED_LABEL = "secrets-store.csi.k8s.io/managed"  # upstream's label on the Secrets it syncs
_ATTEMPTS = 5  # read-modify-write rounds lost to other writers before giving up
Outcome = Literal["created", "updated", "unchanged", "refused"]


class SyncFailed(Exception):
    """One Secret could not be synced; the message is safe for a pod event (no value)."""


class SecretSync:
    """The `--sync-secrets` feature: a volume hook and a daemon event subscriber.

    `control(state)` is the client of the volume's daemon; `current(state)` holds the volume's
    lock and says whether the volume is still published (rotations arrive on the watcher's thread,
    so a Secret is never written for a volume being unpublished).
    """

    def __init__(
        self,
        kube: Callable[[], KubeClient],
        statuses: PodStatuses,
        recorder: EventRecorder,
        control: Callable[[VolumeState], ControlClient],
        current: Callable[[VolumeState], AbstractContextManager[bool]],
    ) -> None:
        self._kube = kube
        self.statuses = statuses
        self.recorder = recorder
        self._control = control
        self._current = current
        self._log = OnceLog(log)
        self._retry: set[str] = set()  # targets whose last sync failed: tried again at republish
        self._lock = threading.Lock()

    # ---- volume hooks (kvfs.csi.volumes) ---------------------------------------------------

    def published(self, state: VolumeState) -> None:
        self._sync(state, None)

    def republished(self, state: VolumeState) -> None:
        """Sync again after a failure, or when the pod's status object was made again (its Secrets
        went with the old one)."""
        with self._lock:
            again = state.target_path in self._retry
        if self.statuses.renewed(state) or again:
            self._sync(state, None)

    def unpublished(self, state: VolumeState) -> None:
        """Drop this pod's ownership of the Secrets its class names; delete those nobody else owns."""
        with self._lock:
            self._retry.discard(state.target_path)
        objects = self._secret_objects(state, report=False)
        owner = self.statuses.name(state)
        for obj in objects or ():
            try:
                self._release(state.pod_namespace, obj.secret_name, owner)
            except KubeError as exc:
                self._log.failed(
                    "release",
                    "Secret %s/%s: cannot drop pod %s's ownership: %s (the garbage collector will, once the pod"
                    " is gone)",
                    state.pod_namespace,
                    obj.secret_name,
                    state.pod,
                    exc,
                )

    # ---- daemon events (kvfs.csi.watch.EventSubscriber) -------------------------------------

    def on_events(self, volume: VolumeState, events: Sequence[Mapping[str, Any]]) -> None:
        rotated = {str(e.get("file")) for e in events if e.get("kind") == "rotated" and e.get("file")}
        if not rotated or not applies(volume):
            return
        with self._current(volume) as published:
            if published:
                self._sync(volume, rotated)

    # ---- syncing ---------------------------------------------------------------------------

    def _sync(self, state: VolumeState, rotated: set[str] | None) -> None:
        """Sync the Secrets of the volume's class (only those reading a file of `rotated`, if given)."""
        if not applies(state):
            return
        objects = self._secret_objects(state, report=True)
        if not objects:
            self._remember(state, failed=objects is None)  # a class that cannot be read: try again
            return
        if rotated is not None:
            touched = [o for o in objects if any(_shows(file, name) for file in o.files for name in rotated)]
            if not touched:
                return  # no API call for a rotation no Secret shows
        owner = self.statuses.owner_reference(state)  # made again if it went, and then
        if rotated is not None and not self.statuses.renewed(state):  # every Secret it owned went too
            objects = touched
        failed = False
        files, errors = self._fetch(state, sorted({f for o in objects for f in o.files})) if owner else ({}, {})
        for obj in objects:
            try:
                if owner is None:
                    raise SyncFailed(
                        f"Secret {obj.secret_name}: not synced: the pod's SecretProviderClassPodStatus, its owner,"
                        " could be neither read nor made (the plugin's log says why); kvfs tries again at the"
                        " next republish"
                    )
                unread = [f"{f} ({errors[f].get('message') or errors[f].get('code')})" for f in obj.files if f in errors]
                if unread:
                    raise SyncFailed(f"Secret {obj.secret_name}: not synced: cannot read {', '.join(unread)}")
                outcome = self._upsert(state, obj, secret_data(obj, files), owner)
            except (SyncFailed, SecretDataError) as exc:
                failed = True
                self._event(state, Reason.SECRET_SYNC_FAILED, str(exc), obj.secret_name)
            except KubeError as exc:
                failed = True
                hint = " (the plugin needs RBAC for Secrets: the sync-secrets component)" if exc.status == 403 else ""
                self._event(
                    state, Reason.SECRET_SYNC_FAILED, f"Secret {obj.secret_name}: not synced: {exc}{hint}", obj.secret_name
                )
            else:
                if outcome == "refused":
                    self._event(
                        state,
                        Reason.SECRET_SYNC_REFUSED,
                        f"Secret {obj.secret_name} exists and was not created by kvfs (it lacks the label"
                        f" {MANAGED_LABEL}=true): left untouched; delete it, or sync into another secretName",
                        obj.secret_name,
                    )
                elif outcome != "unchanged":
                    log.info(
                        "Secret %s/%s %s from the files of pod %s (%s)",
                        state.pod_namespace,
                        obj.secret_name,
                        outcome,
                        state.pod,
                        ", ".join(d.key for d in obj.data),
                        extra={"volume": state.volume_id, "pod": state.pod},
                    )
        self._remember(state, failed=failed)

    def _secret_objects(self, state: VolumeState, *, report: bool) -> list[SecretObject] | None:
        """The class's valid `secretObjects` (invalid ones reported), or None when the class is unreadable."""
        name = state.secret_provider_class
        try:
            spc = self._kube().get_secret_provider_class(state.pod_namespace, name)
        except KubeError as exc:
            if report:
                self._event(state, Reason.SECRET_SYNC_FAILED, f"SecretProviderClass {name}: cannot be read: {exc}", name)
            return None
        objects, errors = secret_objects(spc, source=f"{state.pod_namespace}/{name}")
        for error in errors if report else ():
            self._event(state, Reason.SECRET_SYNC_FAILED, f"not synced: {error}", str(error.field))
        return objects

    def _fetch(self, state: VolumeState, names: list[str]) -> tuple[dict[str, bytes], dict[str, FileError]]:
        """The files from the volume's daemon, in requests of at most MAX_FETCH_FILES names; a file
        too large to share a reply is asked for on its own."""
        files: dict[str, bytes] = {}
        errors: dict[str, FileError] = {}
        batches: list[list[str]] = [names[i : i + MAX_FETCH_FILES] for i in range(0, len(names), MAX_FETCH_FILES)]
        while batches:
            batch = batches.pop(0)
            try:
                got, failed = self._control(state).fetch(batch)
            except jsonline.ProtocolError as exc:
                errors.update({name: {"code": "DaemonUnreachable", "message": str(exc)} for name in batch})
                continue
            files.update(got)
            for name, error in failed.items():
                if error.get("code") == "ReplyTooLarge" and len(batch) > 1:
                    batches.append([name])
                else:
                    errors[name] = error
        return files, errors

    def _upsert(
        self, state: VolumeState, obj: SecretObject, data: dict[str, bytes], owner: dict[str, Any]
    ) -> Outcome:
        """Create the Secret, or update a managed one (data, labels, annotations, this pod as an owner)."""
        labels = {**dict(obj.labels), MANAGED_LABEL: "true"}
        wanted = secret_body(
            state.pod_namespace,
            obj.secret_name,
            data,
            secret_type=obj.type,
            labels=labels,
            annotations=dict(obj.annotations),
        )
        outcome: list[Outcome] = []

        def change(current: dict[str, Any] | None) -> dict[str, Any] | None:
            outcome[:] = []
            if current is None:
                outcome.append("created")
                wanted["metadata"]["ownerReferences"] = [owner]
                return wanted
            meta = current["metadata"]
            if (meta.get("labels") or {}).get(MANAGED_LABEL) != "true":
                outcome.append("refused")
                return None
            if current.get("type", "Opaque") != obj.type:
                raise SyncFailed(
                    f"Secret {obj.secret_name}: not synced: it has type {current.get('type')}, the class says"
                    f" {obj.type}, and a Secret's type cannot change: delete the Secret so kvfs creates it again"
                )
            updated = copy.deepcopy(current)
            updated["data"] = wanted["data"]
            updated["metadata"]["labels"] = {**(meta.get("labels") or {}), **labels}
            if obj.annotations:
                updated["metadata"]["annotations"] = {**(meta.get("annotations") or {}), **dict(obj.annotations)}
            refs = meta.get("ownerReferences") or []
            if not any(ref.get("uid") == owner["uid"] for ref in refs):
                updated["metadata"]["ownerReferences"] = [*refs, owner]
            outcome.append("unchanged" if updated == current else "updated")
            return None if updated == current else updated

        self._kube().read_modify_write(SECRETS, state.pod_namespace, obj.secret_name, change, attempts=_ATTEMPTS)
        return outcome[0]

    def _release(self, namespace: str, name: str, owner: str) -> None:
        """Remove the owner reference to status `owner`; delete the Secret when it was the last one."""
        kube = self._kube()
        for attempt in range(_ATTEMPTS):
            try:
                secret = kube.get_object(SECRETS, namespace, name)
            except KubeError as exc:
                if exc.status == 404:
                    return
                raise
            meta = secret["metadata"]
            refs = meta.get("ownerReferences") or []
            rest = [r for r in refs if not (r.get("kind") == SPC_POD_STATUSES.kind and r.get("name") == owner)]
            if (meta.get("labels") or {}).get(MANAGED_LABEL) != "true" or len(rest) == len(refs):
                return  # not ours, or not this pod's
            try:
                if rest:
                    meta["ownerReferences"] = rest
                    kube.replace_object(SECRETS, namespace, secret)
                else:
                    kube.delete_object(SECRETS, namespace, name, uid=meta["uid"], resource_version=meta["resourceVersion"])
                    log.info("Secret %s/%s deleted: the last pod syncing it went away", namespace, name)
                return
            except KubeError as exc:
                if exc.status == 404:
                    return
                if exc.status != 409 or attempt == _ATTEMPTS - 1:
                    raise

    def _event(self, state: VolumeState, reason: str, message: str, key: str) -> None:
        log.warning("pod %s: %s", state.pod, message, extra={"volume": state.volume_id, "pod": state.pod})
        self.recorder.record(pod_ref(state), reason, message, object_key=key)

    def _remember(self, state: VolumeState, *, failed: bool) -> None:
        with self._lock:
            if failed:
                self._retry.add(state.target_path)
            else:
                self._retry.discard(state.target_path)


def _shows(file: str, rotated: str) -> bool:
    """A rotation of the object at file name `rotated` changes `file`: itself, its split `.crt` /
    `.key`, or an entry `rotated/N` of its history folder."""
    return file in (rotated, rotated + ".crt", rotated + ".key") or file.startswith(rotated + "/")
