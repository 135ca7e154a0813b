"""From a NodePublishVolume request to the parameters a daemon parses, as upstream builds them.

Upstream's attribute map: SecretProviderClass `spec.parameters`, overlaid by the volume's own
attributes (they win), which carry kubelet's pod info; plus the service account tokens, read from
`secrets` first (serviceAccountTokenInSecrets, K8s >= 1.35), then from `volume_context`.
The rest of `secrets` is the nodePublishSecretRef data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from kvfs.config.parameters import POD_NAMESPACE_KEY
from kvfs.config.parameters import SA_TOKENS_KEY as TOKENS_KEY
from kvfs.config.parameters import WORKLOAD_IDENTITY_AUDIENCE as AUDIENCE

SPC_KEY = "secretProviderClass"
NODE_IDENTITY_KEYS = ("useVMManagedIdentity", "usePodIdentity")
_GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}


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


def token_for_audience(tokens_json: str, audience: str = AUDIENCE) -> str:
    """The JWT kubelet minted for `audience`, or "" (malformed input is the daemon's to report)."""
    if not tokens_json:
        return ""
    try:
        entry = json.loads(tokens_json).get(audience)
    except (ValueError, AttributeError):
        return ""
    token = entry.get("token") if isinstance(entry, dict) else None
    return token if isinstance(token, str) else ""


def daemon_params(spc_params: dict[str, str], inputs: VolumeInputs) -> dict[str, str]:
    """SPC parameters < volume attributes (pod info included) < tokens."""
    params = {**spc_params, **inputs.attributes}
    if inputs.tokens_json:
        params[TOKENS_KEY] = inputs.tokens_json
    return params


def check_node_identity(params: dict[str, str], allowed: bool) -> None:
    """Refuse identities that let every pod on the node read the vault, unless the admin allowed them."""
    if allowed:
        return
    for key in NODE_IDENTITY_KEYS:
        value = params.get(key, "").strip()
        if value in _GO_TRUE:
            raise RequestError(
                "FAILED_PRECONDITION",
                f"{key} {value!r}: node-wide identities let every pod on this node read the vault, so this "
                "node refuses them (use workload identity with clientID, or a nodePublishSecretRef; a cluster "
                "admin can allow node identities with `kvfs csi node --allow-node-identity`)",
            )
