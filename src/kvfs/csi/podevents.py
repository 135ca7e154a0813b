"""Read failures as Warning events on the pod: `read_failed` from a daemon → `EventRecorder.record`.

A read that fails because Key Vault or Entra ID said no, or could not be reached, shows where
operators look (`kubectl describe pod`), not only in a daemon's log. The daemon reports an
object's first failure and each change of its error code (kvfs.daemon.status); the plugin's
watcher (kvfs.csi.watch) hands those here; the recorder (kvfs.csi.events) posts at most one event
per pod, object and reason per 10 minutes, however often a daemon reports again (after its error
cooldown, after a success in between, or all of them again after a plugin restart).

`reason_for` is the one table from a daemon's error code and errno to the event's reason. The
message names the file and the object, the service's code and message (a KvfsError message: no
value, no token; redacted again on the way out) and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from kvfs.csi.events import EventRecorder, Reason
from kvfs.csi.kube import PodRef
from kvfs.csi.state import VolumeState

log = logging.getLogger(__name__)

# Code prefixes of identity failures (kvfs.auth: Entra ID's AADSTS codes, IMDS, NMI, the service
# account token, the workstation chain).
_IDENTITY = ("AADSTS", "entra_", "imds_", "nmi_", "sa_token_", "token_file_", "default_chain_")
_THROTTLED = frozenset({"Throttled", "TooManyRequests", "HTTP429"})
# Failures of the object's content, not of a service: the daemon's log has them, no event.
_NOT_A_SERVICE = frozenset({"RenderError"})

_FIX = {
    Reason.OBJECT_NOT_FOUND: "create the object in the vault, or fix objectName, objectType or objectVersion in"
    " the SecretProviderClass",
    Reason.FORBIDDEN: "grant the pod's identity read access on the vault (an RBAC role such as Key Vault Secrets"
    " User, or get in the access policy), or enable the object; later reads retry",
    Reason.THROTTLED: "Key Vault is throttling this vault: kvfs backs off and retries, and serves cached files"
    " meanwhile; spread the load or ask for a higher limit",
    Reason.UNREACHABLE: "check the node's network path to the vault and the vault's firewall; files read before"
    " keep their last bytes, others fail until the vault is reachable",
    Reason.TOKEN_EXCHANGE_FAILED: "check the identity (clientID, tenantID, its federated credential or"
    " assignment) as the message says; later reads retry",
}


def reason_for(code: str, errno_name: str) -> Reason | None:
    """The pod event's reason for a daemon's read failure; None for failures that are no service's."""
    if code in _NOT_A_SERVICE:
        return None
    if code.startswith(_IDENTITY):
        return Reason.TOKEN_EXCHANGE_FAILED
    if code in _THROTTLED:
        return Reason.THROTTLED
    if errno_name == "ENOENT":
        return Reason.OBJECT_NOT_FOUND
    if errno_name in ("EACCES", "EPERM"):
        return Reason.FORBIDDEN
    return Reason.UNREACHABLE


def message_for(event: Mapping[str, Any], reason: Reason, target: str) -> str:
    """The event's text: file, object, code, the daemon's message, the fix, where to look next."""
    return (
        f"reading {event.get('file')} (Key Vault {event.get('object')}) failed with {event.get('errno')}"
        f" ({event.get('code')}): {event.get('message')}. Fix: {_FIX[reason]}. Every object's state:"
        f" `kvfs status {target}` on the node"
    )


class ReadFailureEvents:
    """A kvfs.csi.watch.EventSubscriber: one Warning event per read failure, rate-limited by the recorder."""

    def __init__(self, recorder: EventRecorder) -> None:
        self.recorder = recorder

    def on_events(self, volume: VolumeState, events: Sequence[Mapping[str, Any]]) -> None:
        if not (volume.pod_namespace and volume.pod_name):
            return  # no pod info from kubelet: nobody to tell
        pod = PodRef(volume.pod_namespace, volume.pod_name, volume.pod_uid)
        for event in events:
            if event.get("kind") != "read_failed":
                continue
            reason = reason_for(str(event.get("code", "")), str(event.get("errno", "")))
            if reason is None:
                continue
            message = message_for(event, reason, volume.target_path)
            self.recorder.record(pod, reason, message, object_key=str(event.get("object", "")))
