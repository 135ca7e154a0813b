"""From a NodePublishVolume request to the parameters a daemon parses, as upstream builds them.

As upstream: a volume names a SecretProviderClass, and from the volume's attributes only
kubelet's own keys (pod info, ephemeral, service account tokens) are taken; they win over the
class's parameters. Pod authors write the other attributes, so they are ignored: admission
policies on SecretProviderClasses must not be bypassed by writing the same keys into a pod.
A cluster admin may restore the overlay (`--allow-inline-parameters`, development and tests):
then every attribute overlays the class's parameters, and a volume may carry all its
parameters inline without a class. The service account tokens come from `secrets` first
(serviceAccountTokenInSecrets, K8s >= 1.35), then from `volume_context`; the rest of `secrets`
is the nodePublishSecretRef data.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from kvfs.config.parameters import (
    GO_TRUE,
    POD_NAME_KEY,
    POD_NAMESPACE_KEY,
    POD_UID_KEY,
    SERVICE_ACCOUNT_NAME_KEY,
    VOLUME_MOUNT_GROUP_KEY,
)
from kvfs.config.parameters import SA_TOKENS_KEY as TOKENS_KEY

log = logging.getLogger(__name__)

SPC_KEY = "secretProviderClass"
EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"
# what kubelet itself writes into volume_context (podInfoOnMount, tokenRequests)
KUBELET_KEYS = frozenset(
    {POD_NAME_KEY, POD_NAMESPACE_KEY, POD_UID_KEY, SERVICE_ACCOUNT_NAME_KEY, EPHEMERAL_KEY, TOKENS_KEY}
)
NODE_IDENTITY_KEYS = ("useVMManagedIdentity", "usePodIdentity")

_DNS1123_LABEL = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*$")
_SHOWN = 80  # at most this much of a rejected name is quoted back


class RequestError(Exception):
    """A request the plugin refuses; `code` is a gRPC status code name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class VolumeInputs:
    """The volume's attributes and node-publish secrets with the tokens split out."""

    attributes: dict[str, str]
    secrets: dict[str, str] = field(repr=False)
    tokens_json: str = field(default="", repr=False)

    @property
    def spc_name(self) -> str:
        return self.attributes.get(SPC_KEY, "").strip()

    @property
    def namespace(self) -> str:
        return self.attributes.get(POD_NAMESPACE_KEY, "").strip()


def split_inputs(volume_context: dict[str, str], secrets: dict[str, str]) -> VolumeInputs:
    attributes = dict(volume_context)
    rest = dict(secrets)
    tokens = rest.pop(TOKENS_KEY, "") or attributes.get(TOKENS_KEY, "")
    attributes.pop(TOKENS_KEY, None)
    return VolumeInputs(attributes, rest, tokens)


def pod_fields(params: dict[str, str], spc: str) -> dict[str, str]:
    """The pod info a volume's state keeps (kvfs.csi.state.VolumeState's pod_* fields)."""
    return {
        "pod_namespace": params.get(POD_NAMESPACE_KEY, ""),
        "pod_name": params.get(POD_NAME_KEY, ""),
        "pod_uid": params.get(POD_UID_KEY, ""),
        "secret_provider_class": spc,
    }


def pod_of(params: dict[str, str]) -> str:
    """`namespace/name` of the pod a volume's parameters are for (logs name it; "" if unknown)."""
    return "/".join(filter(None, (params.get(POD_NAMESPACE_KEY, ""), params.get(POD_NAME_KEY, ""))))


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


def check_spc_reference(namespace: str, name: str) -> None:
    """Both end up in an API path: only names Kubernetes itself could have created pass."""
    if not _DNS1123_SUBDOMAIN.match(name):
        raise RequestError(
            "INVALID_ARGUMENT",
            f"secretProviderClass {_shown(name)} is not a valid object name (a DNS-1123 subdomain: lower-case"
            " letters, digits, '-' and '.', at most 253 characters); name a SecretProviderClass in the pod's"
            " namespace",
        )
    if not _DNS1123_LABEL.match(namespace):
        raise RequestError(
            "INVALID_ARGUMENT",
            f"{POD_NAMESPACE_KEY} {_shown(namespace)} is not a valid namespace name (a DNS-1123 label)",
        )


def daemon_params(spc_params: dict[str, str], inputs: VolumeInputs, *, allow_inline: bool) -> dict[str, str]:
    """The class's parameters < kubelet's attributes (< every attribute, with allow_inline) < tokens.

    Kubelet's keys and the internal volume-mount-group key never come from a class; the latter
    never from a pod either (only kubelet's volume_mount_group sets it, see Volumes.publish).
    """
    reserved = KUBELET_KEYS | {VOLUME_MOUNT_GROUP_KEY}
    params = {k: v for k, v in spc_params.items() if k not in reserved}
    if allow_inline:
        params.update(inputs.attributes)
    else:
        params.update({k: v for k, v in inputs.attributes.items() if k in KUBELET_KEYS})
        ignored = sorted(set(inputs.attributes) - KUBELET_KEYS - {SPC_KEY})
        if ignored:
            shown = ", ".join(_shown(k) for k in ignored[:10]) + (", ..." if len(ignored) > 10 else "")
            log.warning(
                "pod %s/%s: volume attributes other than kubelet's are ignored (%s); put parameters into the"
                " SecretProviderClass (a cluster admin may allow inline parameters with"
                " `kvfs csi node --allow-inline-parameters`)",
                inputs.namespace,
                inputs.attributes.get(POD_NAME_KEY, ""),
                shown,
            )
    params.pop(VOLUME_MOUNT_GROUP_KEY, None)
    if inputs.tokens_json:
        params[TOKENS_KEY] = inputs.tokens_json
    return params


def check_node_identity(params: dict[str, str], allowed: bool) -> None:
    """Refuse identities that let every pod on the node read the vault, unless the admin allowed them."""
    if allowed:
        return
    for key in NODE_IDENTITY_KEYS:
        value = params.get(key, "").strip()
        if value in GO_TRUE:
            raise RequestError(
                "FAILED_PRECONDITION",
                f"{key} {value!r}: node-wide identities let every pod on this node read the vault, so this "
                "node refuses them (use workload identity with clientID, or a nodePublishSecretRef; a cluster "
                "admin can allow node identities with `kvfs csi node --allow-node-identity`)",
            )
