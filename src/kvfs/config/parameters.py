"""SecretProviderClass parameters (+ node-publish secrets) → a validated `MountConfig`.

Parsing follows the upstream Azure provider: keys are case-sensitive, values are trimmed,
unknown keys are ignored, and checks run in upstream's order so users see the same first error:
pod name → pod namespace → usePodIdentity / useVMManagedIdentity / useAzureTokenProxy →
mutual exclusion → keyvaultName → tenant → cloudEnvFileName / cloudName → credentials →
objects → each object → vault name. Upstream's error texts stay as message prefixes; kvfs
appends the fix. Where upstream is wrong, kvfs does better:

- the tenant is required only where the flow needs it (workload identity, service principal),
  not for VM managed identity or pod identity, where upstream demands one it never uses;
- the vault name follows Key Vault's rules (3-24 of 0-9a-zA-Z-, starts with a letter, no "--",
  no trailing "-") instead of upstream's length + charset check only;
- VM managed identity is a node-wide identity: in the CSI plugin it is refused unless the
  cluster admin started the plugin with --allow-node-identity;
- error messages never echo a client secret or a service account token (upstream prints the
  whole secrets map when clientid/clientsecret is missing).

Contexts: "csi" (the CSI plugin; pod info is required, the workload identity token comes with the
request) and "cli" (`kvfs mount`; no pod info, the token comes from the file named by
AZURE_FEDERATED_TOKEN_FILE, and without any credential settings azure-identity's default chain
is used).

kvfs extensions (not read by upstream, so manifests stay portable):

- ``writeCertAndKeyInSeparateFiles``: ParseBool; per-volume form of upstream's
  ``--write-cert-and-key-in-separate-files`` flag (default: the node's, else false).
- ``constructPEMChain``: ParseBool; per-volume form of ``--construct-pem-chain`` (default: the
  node's, else true). The node's defaults are `RenderDefaults` (`kvfs csi node` flags).
- ``refreshInterval``: how often read objects are refreshed in the background, as seconds or a
  duration ("90", "30s", "2m", "1h", "1m30s", "500ms"); default 120 s, 0 disables.
- ``maxStaleness``: how long the last good bytes may be served while Key Vault or Entra ID is
  unreachable; same syntax; default 0 = without bound.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Literal

from kvfs.config.clouds import EnvFileRead, resolve_cloud
from kvfs.config.model import DEFAULT_REFRESH_INTERVAL, AuthConfig, AuthMode, MountConfig, RenderDefaults
from kvfs.config.objects import parse_objects
from kvfs.errors import ConfigError

log = logging.getLogger(__name__)

KUBELET_PREFIX = "csi.storage.k8s.io/"  # the pod-info keys kubelet adds to a volume's attributes
POD_NAME_KEY = "csi.storage.k8s.io/pod.name"
POD_NAMESPACE_KEY = "csi.storage.k8s.io/pod.namespace"
POD_UID_KEY = "csi.storage.k8s.io/pod.uid"
SERVICE_ACCOUNT_NAME_KEY = "csi.storage.k8s.io/serviceAccount.name"
SA_TOKENS_KEY = "csi.storage.k8s.io/serviceAccount.tokens"
# Set by the kvfs CSI plugin from NodePublishVolume's volume_mount_group (the pod's fsGroup).
VOLUME_MOUNT_GROUP_KEY = "kvfs.io/volumeMountGroup"
WORKLOAD_IDENTITY_AUDIENCE = "api://AzureADTokenExchange"
FEDERATED_TOKEN_FILE_ENV = "AZURE_FEDERATED_TOKEN_FILE"

# The CSI plugin reads cloudEnvFileName only inside this folder (`kvfs csi node --cloud-env-dir`).
DEFAULT_CLOUD_ENV_DIR = "/etc/kubernetes"
GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})  # Go's strconv.ParseBool
GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_VAULT_CHARS = re.compile(r"^[-A-Za-z0-9]+$")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# a tenant's GUID, "adfs" (Azure Stack Hub with AD FS), or a verified domain such as contoso.onmicrosoft.com
_TENANT_DOMAIN = re.compile(r"^(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$")
_DURATION = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# Every parameter name kvfs reads, as written (names are case-sensitive, as upstream's are).
# What a SecretProviderClass author sets (an unknown `--param` name is answered with this list).
USER_PARAMETERS = (
    "keyvaultName", "tenantID", "clientID", "cloudName", "cloudEnvFileName", "objects",
    "usePodIdentity", "useVMManagedIdentity", "userAssignedIdentityID",
    "writeCertAndKeyInSeparateFiles", "constructPEMChain", "refreshInterval", "maxStaleness",
)  # fmt: skip
KNOWN_PARAMETERS = frozenset(
    {
        *USER_PARAMETERS, "tenantId", "useAzureTokenProxy",
        "secretProviderClass", POD_NAME_KEY, POD_NAMESPACE_KEY, POD_UID_KEY, SERVICE_ACCOUNT_NAME_KEY,
        SA_TOKENS_KEY, VOLUME_MOUNT_GROUP_KEY,
    }
)  # fmt: skip
_TOKEN_REQUESTS_FIX = (
    "the CSIDriver object must request service account tokens: set spec.tokenRequests with"
    f" audience {WORKLOAD_IDENTITY_AUDIENCE} (and requiresRepublish: true)"
)


def _upstream(field: str, text: str, fix: str = "", value: object = None) -> ConfigError:
    """A ConfigError whose message starts with upstream's exact text."""
    return ConfigError(field, value, text, fix, message=text)


def _go_quote(value: str) -> str:
    """Approximates Go's %q, for ParseBool's error text."""
    return json.dumps(value, ensure_ascii=False)


class _Params:
    """Case-sensitive, trimmed access to the parameter map, with hints for near-miss keys."""

    def __init__(self, params: Mapping[str, str]) -> None:
        self._params = params

    def get(self, key: str) -> str:
        assert key in KNOWN_PARAMETERS, key  # --param checks names against that list
        value = self._params.get(key, "")
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(
                key, None, "parameter values must be strings", f'quote the value: {key}: "..."'
            )
        return value.strip()

    def case_hint(self, key: str) -> str:
        """A fix hint when the user wrote `key` with different letter case."""
        for other in self._params:
            if other != key and other.lower() == key.lower():
                return f"parameter names are case-sensitive: rename {other} to {key}"
        return ""


def parse_bool(text: str, field: str, default: bool = False) -> bool:
    """Go's strconv.ParseBool; "" gives `default` (as upstream treats an unset flag)."""
    if text == "":
        return default
    if text in GO_TRUE:
        return True
    if text in GO_FALSE:
        return False
    raise _upstream(
        field,
        f"failed to parse {field} flag, error: strconv.ParseBool: parsing {_go_quote(text)}:"
        " invalid syntax",
        f"{field} takes true or false",
        value=text,
    )


def parse_duration(text: str, field: str) -> float:
    """Seconds from "90", "1.5", "30s", "2m", "1h", "1m30s" or "500ms"; never negative."""
    value = text.strip()
    fix = f'write {field} as seconds or a duration, e.g. "90", "30s", "2m", "1h", "1m30s", "500ms"'
    seconds: float
    if re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", value):
        seconds = float(value)
    elif _DURATION.fullmatch(value):
        seconds = sum(
            float(num) * _UNIT_SECONDS[unit] for num, unit in _DURATION_PART.findall(value)
        )
    elif value.startswith("-"):
        raise ConfigError(field, text, "must not be negative", fix)
    else:
        raise ConfigError(field, text, "is not a duration", fix)
    if not math.isfinite(seconds):
        raise ConfigError(field, text, "is too large", fix)
    return seconds


def validate_vault_name(name: str) -> None:
    """Key Vault's naming rules, with upstream's `Invalid vault name: "<n>"` prefix."""
    problem = ""
    if not 3 <= len(name) <= 24:
        problem = "must be between 3 and 24 chars"
    elif not _VAULT_CHARS.match(name):
        problem = "must match [-a-zA-Z0-9]{3,24}"
    elif not name[0].isalpha():
        problem = "must start with a letter"
    elif "--" in name:
        problem = "must not contain consecutive hyphens"
    elif name.endswith("-"):
        problem = "must not end with a hyphen"
    if problem:
        fix = (
            "Key Vault names are 3-24 characters of 0-9, a-z, A-Z and -, start with a letter,"
            " end with a letter or digit and have no consecutive hyphens"
        )
        if "." in name or "/" in name:
            host = name.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0].lower()  # never raises, unlike urlparse
            label = host.split(".")[0]
            fix = (
                f"keyvaultName is the vault's name, not its URL: write keyvaultName: {label}"
                if ".vault." in host and _VAULT_CHARS.match(label) and 3 <= len(label) <= 24
                else "keyvaultName is the vault's name, not its URL: for https://myvault.vault.azure.net/ write myvault"
            )
        raise _upstream("keyvaultName", f'Invalid vault name: "{name}", {problem}', fix, name)


def parse_parameters(
    params: Mapping[str, str],
    secrets: Mapping[str, str] | None,
    *,
    context: Literal["csi", "cli"],
    allow_node_identity: bool = False,
    environ: Mapping[str, str] | None = None,
    default_cloud: str = "AzurePublicCloud",
    cloud_env_dir: str | None = None,
    defaults: RenderDefaults = RenderDefaults(),
    cloud_env: EnvFileRead | None = None,
) -> MountConfig:
    """Validate everything a mount needs before any network call.

    `secrets` is the node-publish secret (CSI) or the --secrets file (CLI); None when absent.
    `environ` defaults to os.environ and is only read for AZURE_FEDERATED_TOKEN_FILE.
    `cloud_env_dir`: cloudEnvFileName must lie inside it; None means DEFAULT_CLOUD_ENV_DIR for
    "csi" and any path for "cli" (a workstation user names their own files).
    `defaults`: the node-wide defaults of the two rendering switches (empty parameters take them).
    `cloud_env`: the cloud env file as `read_cloud_env_file` read it for these parameters before a
    privilege drop; None reads it here.
    """
    if context not in ("csi", "cli"):
        raise ValueError(f"context must be 'csi' or 'cli', not {context!r}")
    p = _Params(params)
    pod_name = p.get(POD_NAME_KEY)
    pod_namespace = p.get(POD_NAMESPACE_KEY)
    if context == "csi":
        pod_info_fix = (
            "the kubelet passes pod info when the CSIDriver object has podInfoOnMount: true"
        )
        if not pod_name:
            raise _upstream(POD_NAME_KEY, "pod name is not provided", pod_info_fix)
        if not pod_namespace:
            raise _upstream(POD_NAMESPACE_KEY, "pod namespace is not provided", pod_info_fix)

    use_pod_identity = parse_bool(p.get("usePodIdentity"), "usePodIdentity")
    use_vm_identity = parse_bool(p.get("useVMManagedIdentity"), "useVMManagedIdentity")
    use_token_proxy = parse_bool(p.get("useAzureTokenProxy"), "useAzureTokenProxy")
    if use_pod_identity + use_vm_identity + use_token_proxy > 1:
        raise _upstream(
            "usePodIdentity",
            "only one identity mode can be enabled at a time: usePodIdentity,"
            " useVMManagedIdentity, or useAzureTokenProxy",
            "set at most one of them to true",
        )
    if use_token_proxy:
        raise ConfigError(
            "useAzureTokenProxy",
            "true",
            "identity binding (useAzureTokenProxy) is not supported by kvfs yet",
            "use workload identity instead: remove useAzureTokenProxy and set clientID and"
            " tenantID, with a federated credential for the pod's service account",
        )

    vault_name = p.get("keyvaultName")
    if not vault_name:
        raise _upstream(
            "keyvaultName",
            "keyvaultName is not provided",
            p.case_hint("keyvaultName") or "set keyvaultName to the name of the Key Vault",
        )

    client_id = p.get("clientID")
    sp_secrets = _service_principal_secrets(secrets)
    mode = _select_mode(use_pod_identity, use_vm_identity, client_id, secrets, sp_secrets, context)
    tenant_id = p.get("tenantID") or p.get("tenantId")
    if mode in ("workload_identity", "service_principal") and not tenant_id:
        raise _upstream(
            "tenantID",
            "tenantId is not provided",
            p.case_hint("tenantID")
            or "set tenantID to the directory (tenant) ID of the identity's Entra ID tenant",
        )
    if tenant_id:
        check_tenant_id(tenant_id)
    if client_id and mode == "workload_identity":
        check_guid("clientID", client_id, "the client id of the app registration or managed identity")

    cloud = resolve_cloud(*_cloud_inputs(p, context, default_cloud, cloud_env_dir), read_ahead=cloud_env)

    auth = _build_auth(
        mode,
        p,
        secrets,
        sp_secrets,
        tenant_id=tenant_id,
        client_id=client_id,
        pod_name=pod_name,
        pod_namespace=pod_namespace,
        context=context,
        allow_node_identity=allow_node_identity,
        environ=os.environ if environ is None else environ,
    )

    objects_text = p.get("objects")
    if not objects_text:
        raise _upstream(
            "objects",
            "objects is not set",
            p.case_hint("objects")
            or "list the objects to mount: objects is a YAML mapping whose key `array` lists"
            " one `- |` text block per object (objectName, objectType, ...)",
        )
    objects = parse_objects(objects_text)
    validate_vault_name(vault_name)

    refresh_text = p.get("refreshInterval")
    staleness_text = p.get("maxStaleness")
    return MountConfig(
        vault_name=vault_name,
        cloud=cloud,
        auth=auth,
        objects=objects,
        split_cert_key=parse_bool(
            p.get("writeCertAndKeyInSeparateFiles"), "writeCertAndKeyInSeparateFiles", defaults.split_cert_key
        ),
        construct_pem_chain=parse_bool(
            p.get("constructPEMChain"), "constructPEMChain", defaults.construct_pem_chain
        ),
        refresh_interval=(
            parse_duration(refresh_text, "refreshInterval")
            if refresh_text
            else DEFAULT_REFRESH_INTERVAL
        ),
        max_staleness=parse_duration(staleness_text, "maxStaleness") if staleness_text else 0.0,
        pod_name=pod_name,
        pod_namespace=pod_namespace,
        pod_uid=p.get(POD_UID_KEY),
        service_account_name=p.get(SERVICE_ACCOUNT_NAME_KEY),
        secret_provider_class=p.get("secretProviderClass"),
        file_group=_group_id(p.get(VOLUME_MOUNT_GROUP_KEY)),
    )


def read_cloud_env_file(
    params: Mapping[str, str], *, cloud_env_dir: str | None = None, default_cloud: str = "AzurePublicCloud"
) -> EnvFileRead:
    """The cloud env file CSI parameters name, read now for a `parse_parameters` after a privilege drop.

    The CSI daemon runs this as root: it looks up two parameters as plain strings and reads that
    one file inside `cloud_env_dir` (bounded, as `parse_parameters` would); it parses nothing a
    tenant wrote, not even the file. A failed read is kept for the parse to report in its order.
    """
    return EnvFileRead(*_cloud_inputs(_Params(params), "csi", default_cloud, cloud_env_dir))


def _cloud_inputs(
    p: _Params, context: str, default_cloud: str, cloud_env_dir: str | None
) -> tuple[str, str, str | None]:
    """`resolve_cloud`'s arguments: cloud name, cloudEnvFileName and the folder it must lie in."""
    if cloud_env_dir is None and context == "csi":
        cloud_env_dir = DEFAULT_CLOUD_ENV_DIR
    return p.get("cloudName") or default_cloud, p.get("cloudEnvFileName"), cloud_env_dir


def check_guid(field: str, value: str, what: str) -> None:
    """Ids that end up in URLs and in the `az` commands error messages suggest must be GUIDs."""
    if not _GUID.match(value):
        raise ConfigError(
            field,
            value,
            "is not a GUID",
            f"set {field} to {what}, e.g. 00000000-0000-0000-0000-000000000000",
        )


def check_tenant_id(value: str) -> None:
    if not (_GUID.match(value) or value == "adfs" or _TENANT_DOMAIN.match(value)):
        raise ConfigError(
            "tenantID",
            value,
            "is not a tenant ID",
            "use the tenant's GUID or domain name (e.g. contoso.onmicrosoft.com), or adfs",
        )


def _group_id(text: str) -> int | None:
    """The volume's group: a decimal gid, or None when kubelet sent none."""
    if not text:
        return None
    if not text.isdigit() or int(text) > 0xFFFFFFFE:
        raise ConfigError(
            "volume_mount_group", text, "is not a group id", "kubelet sends the pod's fsGroup, a number"
        )
    return int(text)


def _service_principal_secrets(secrets: Mapping[str, str] | None) -> dict[str, str]:
    """The node-publish secret without the SA token entry K8s >= 1.35 may put there."""
    if not secrets:
        return {}
    return {k: v for k, v in secrets.items() if k != SA_TOKENS_KEY}


def _select_mode(
    use_pod_identity: bool,
    use_vm_identity: bool,
    client_id: str,
    secrets: Mapping[str, str] | None,
    sp_secrets: Mapping[str, str],
    context: str,
) -> AuthMode:
    """Upstream's mode selection; the CLI falls back to azure-identity's default chain."""
    if use_pod_identity:
        mode: AuthMode = "pod_identity"
    elif use_vm_identity:
        mode = "vm_managed_identity"
    elif client_id:
        return "workload_identity"
    elif sp_secrets or context == "csi" or secrets is not None:
        return "service_principal"
    else:
        return "default_chain"
    if client_id:
        log.warning("clientID is ignored: %s is enabled and uses its own identity", mode)
    return mode


def _build_auth(
    mode: AuthMode,
    p: _Params,
    secrets: Mapping[str, str] | None,
    sp_secrets: Mapping[str, str],
    *,
    tenant_id: str,
    client_id: str,
    pod_name: str,
    pod_namespace: str,
    context: str,
    allow_node_identity: bool,
    environ: Mapping[str, str],
) -> AuthConfig:
    if mode == "workload_identity":
        if context == "csi":
            token = _workload_identity_token(p, secrets)
            return AuthConfig(mode=mode, tenant_id=tenant_id, client_id=client_id, sa_token=token)
        token_file = (environ.get(FEDERATED_TOKEN_FILE_ENV) or "").strip()
        if not token_file:
            raise ConfigError(
                FEDERATED_TOKEN_FILE_ENV,
                None,
                "is not set: workload identity (clientID) needs a service account token file",
                f"export {FEDERATED_TOKEN_FILE_ENV}=/path/to/token, a token federated to"
                f" clientID with audience {WORKLOAD_IDENTITY_AUDIENCE}; or remove clientID to"
                " use a service principal (--secrets) or your Azure CLI login",
            )
        return AuthConfig(
            mode=mode, tenant_id=tenant_id, client_id=client_id, sa_token_file=token_file
        )

    if mode == "service_principal":
        return _service_principal(sp_secrets, secrets, tenant_id, context)

    if mode == "vm_managed_identity":
        if context == "csi" and not allow_node_identity:
            raise ConfigError(
                "useVMManagedIdentity",
                "true",
                "VM managed identity is refused: it belongs to the node, so every pod on the node"
                " could read this vault with it",
                "use workload identity (set clientID and tenantID, with a federated credential"
                " for the pod's service account); a cluster admin who accepts the risk can start"
                " the plugin with --allow-node-identity",
            )
        identity_id = p.get("userAssignedIdentityID")
        if identity_id:
            check_guid(
                "userAssignedIdentityID",
                identity_id,
                "the client id of a user-assigned identity of the node (or remove it for the system-assigned one)",
            )
        return AuthConfig(mode=mode, tenant_id=tenant_id, user_assigned_identity_id=identity_id)

    if mode == "pod_identity":
        if not pod_name or not pod_namespace:
            fix = (
                "deploy a CSIDriver object with podInfoOnMount: true"
                if context == "csi"
                else f"pass --param {POD_NAME_KEY}=NAME --param {POD_NAMESPACE_KEY}=NAMESPACE"
            )
            raise _upstream(
                "usePodIdentity",
                "pod information is not available. deploy a CSIDriver object to set"
                " podInfoOnMount: true",
                fix,
            )
        return AuthConfig(
            mode=mode, tenant_id=tenant_id, pod_name=pod_name, pod_namespace=pod_namespace
        )

    return AuthConfig(mode="default_chain", tenant_id=tenant_id)


def _service_principal(
    sp_secrets: Mapping[str, str],
    secrets: Mapping[str, str] | None,
    tenant_id: str,
    context: str,
) -> AuthConfig:
    """clientid / clientsecret, keys matched case-insensitively; values are never echoed."""
    wrapper = "failed to build auth config for mode None: "
    where = "the nodePublishSecretRef secret" if context == "csi" else "the --secrets file"
    if context == "csi" and not sp_secrets:
        raise _upstream(
            "nodePublishSecretRef",
            wrapper + "failed to get credentials, nodePublishSecretRef secret is not set",
            "choose an identity: set clientID (workload identity, recommended), or reference a"
            " secret with clientid and clientsecret in nodePublishSecretRef",
        )
    found: dict[str, str] = {}
    for key, value in sp_secrets.items():
        lowered = str(key).lower()
        if lowered in ("clientid", "clientsecret") and isinstance(value, str):
            found[lowered] = value.strip()
    keys = ", ".join(sorted(str(k) for k in sp_secrets)) or "none"
    for needed in ("clientid", "clientsecret"):
        if not found.get(needed):
            fix = f"add a non-empty {needed} entry to {where}; keys present: {keys}"
            near = [str(k) for k in sp_secrets if _squash(str(k)) == needed and str(k).lower() != needed]
            if near:
                fix += f"; rename {near[0]} to {needed}"
            raise _upstream(needed, f"{wrapper}could not find {needed} in secrets", fix)
    if not _GUID.match(found["clientid"]):
        raise ConfigError(
            "clientid",
            None,  # never echo a value from the secret
            f"in {where} is not a GUID",
            "set clientid to the service principal's application (client) id",
        )
    return AuthConfig(
        mode="service_principal",
        tenant_id=tenant_id,
        client_id=found["clientid"],
        client_secret=found["clientsecret"],
    )


def _squash(key: str) -> str:
    """`client_secret`, `Client-Secret` → `clientsecret`: spots near-miss secret keys."""
    return "".join(ch for ch in key.lower() if ch.isalnum())


def _workload_identity_token(p: _Params, secrets: Mapping[str, str] | None) -> str:
    """The SA token for api://AzureADTokenExchange from the CSI request; never echoed."""
    raw = ""
    if secrets and isinstance(secrets.get(SA_TOKENS_KEY), str):
        raw = secrets[SA_TOKENS_KEY].strip()
    if not raw:
        raw = p.get(SA_TOKENS_KEY)
    wrapper = "failed to parse workload identity tokens, error: "
    if not raw:
        raise _upstream(
            SA_TOKENS_KEY, wrapper + "service account tokens not found", _TOKEN_REQUESTS_FIX
        )
    try:
        tokens = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _upstream(
            SA_TOKENS_KEY,
            f"{wrapper}failed to unmarshal service account tokens, error: {exc.msg}"
            f" at line {exc.lineno} column {exc.colno}",
            "the kubelet sends this JSON; check what passes it to kvfs",
        ) from None
    if not isinstance(tokens, dict):
        raise _upstream(
            SA_TOKENS_KEY,
            f"{wrapper}failed to unmarshal service account tokens, error: json: cannot unmarshal"
            f" {type(tokens).__name__} into an object keyed by audience",
            "the kubelet sends this JSON; check what passes it to kvfs",
        )
    entry = tokens.get(WORKLOAD_IDENTITY_AUDIENCE)
    token = entry.get("token") if isinstance(entry, dict) else None
    if not isinstance(token, str) or not token.strip():
        audiences = ", ".join(sorted(_safe_audience(str(a)) for a in tokens)) or "none"
        raise _upstream(
            SA_TOKENS_KEY,
            f"{wrapper}token for audience {WORKLOAD_IDENTITY_AUDIENCE} not found",
            f"{_TOKEN_REQUESTS_FIX}; audiences received: {audiences}",
        )
    return token.strip()


def token_for_audience(tokens_json: str, audience: str = WORKLOAD_IDENTITY_AUDIENCE) -> str:
    """The JWT kubelet minted for `audience`, or "" (malformed input is parse_parameters' to report)."""
    if not tokens_json:
        return ""
    try:
        entry = json.loads(tokens_json).get(audience)
    except (ValueError, AttributeError):
        return ""
    token = entry.get("token") if isinstance(entry, dict) else None
    return token if isinstance(token, str) else ""


def _safe_audience(audience: str) -> str:
    """Audience names are not secret, but never let a misplaced JWT through."""
    if audience.startswith("eyJ") or len(audience) > 100:
        return "<hidden>"
    return audience


__all__ = [
    "DEFAULT_REFRESH_INTERVAL",
    "FEDERATED_TOKEN_FILE_ENV",
    "GO_FALSE",
    "GO_TRUE",
    "SA_TOKENS_KEY",
    "WORKLOAD_IDENTITY_AUDIENCE",
    "parse_bool",
    "parse_duration",
    "parse_parameters",
    "read_cloud_env_file",
    "token_for_audience",
    "validate_vault_name",
]
