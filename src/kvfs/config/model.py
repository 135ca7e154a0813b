"""The validated configuration of one volume: what every lower layer consumes.

Produced by `kvfs.config.parameters.parse_parameters` from SecretProviderClass parameters
(plus --param overlays / volumeAttributes and node-publish secrets). Immutable; safe to pickle
and hand to a forked daemon. Holds credentials material only in `AuthConfig.client_secret`
and `AuthConfig.sa_token` (never logged: their repr is redacted).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

DEFAULT_REFRESH_INTERVAL = 120.0  # seconds
# Bytes of rendered versions one volume's cache keeps (kvfs.cache.store): far more than the
# objects of a typical volume (a secret is at most 25 KiB), little next to a container's memory.
DEFAULT_CACHE_LIMIT = 64 * 1024 * 1024
ObjectType = Literal["secret", "key", "cert"]
AuthMode = Literal[
    "workload_identity",  # clientID set: SA token exchanged at Entra ID
    "service_principal",  # clientid/clientsecret from node-publish secrets / --secrets
    "vm_managed_identity",  # IMDS, useVMManagedIdentity
    "pod_identity",  # NMI, usePodIdentity (deprecated upstream)
    "default_chain",  # workstation only: azure-identity DefaultAzureCredential
]


@dataclass(frozen=True)
class CloudConfig:
    """Endpoints of one Azure cloud."""

    name: str  # canonical, e.g. "AzurePublicCloud", "AzureStackCloud"
    keyvault_dns_suffix: str  # e.g. "vault.azure.net" (may carry ":port" for private clouds)
    keyvault_resource: str  # token resource, no trailing slash: "https://vault.azure.net"
    authority_host: str  # Entra ID, no trailing slash: "https://login.microsoftonline.com"

    @property
    def scope(self) -> str:
        return self.keyvault_resource + "/.default"

    @property
    def is_public_azure(self) -> bool:
        """True for the clouds of the cloud table: Microsoft-run authorities (MSAL instance discovery ok)."""
        from kvfs.config.clouds import _CLOUDS  # the one cloud table; clouds.py imports this module

        return self.name.upper() in _CLOUDS

    def vault_url(self, vault_name: str) -> str:
        return f"https://{vault_name}.{self.keyvault_dns_suffix}/"


@dataclass(frozen=True)
class ObjectSpec:
    """One entry of `objects.array`, validated and normalised (strings trimmed)."""

    name: str  # Key Vault object name
    type: ObjectType
    alias: str = ""  # file path relative to the mount root; may contain "/"
    version: str = ""  # "" = latest; else a 32-hex version (or "latest" with history)
    version_history: int = 0  # >= 2: folder with files 0..N-1
    format: Literal["", "pem", "pfx"] = ""  # lower-cased
    encoding: Literal["", "utf-8", "base64", "hex"] = ""  # lower-cased
    file_mode: int = 0o644

    @property
    def file_name(self) -> str:
        """Path of the file (or history folder) relative to the mount root."""
        return self.alias or self.name

    @property
    def object_id(self) -> str:
        """Upstream's object id, e.g. ``secret/db-password`` (the alias never appears)."""
        return f"{self.type}/{self.name}"

    @property
    def pinned(self) -> bool:
        """A fixed version never changes, so it is never refreshed."""
        return bool(self.version) and self.version.lower() != "latest"


def _redacted(value: str) -> str:
    return "<redacted>" if value else ""


@dataclass(frozen=True)
class AuthConfig:
    """How this volume gets Key Vault tokens."""

    mode: AuthMode
    tenant_id: str = ""
    client_id: str = ""  # workload identity / service principal client id
    user_assigned_identity_id: str = ""  # VM MI: a client id; "" = system-assigned
    client_secret: str = field(default="", repr=False)  # service principal only
    # Workload identity: the SA token given inline (CSI request); when empty, read from
    # `sa_token_file` (AZURE_FEDERATED_TOKEN_FILE), re-read when it changes.
    sa_token: str = field(default="", repr=False)
    sa_token_file: str = ""
    pod_name: str = ""  # pod identity (NMI) headers
    pod_namespace: str = ""

    def __repr__(self) -> str:  # belt and braces: never show secrets
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["client_secret"] = _redacted(self.client_secret)
        fields["sa_token"] = _redacted(self.sa_token)
        inner = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        return f"AuthConfig({inner})"


@dataclass(frozen=True)
class SecretObjectData:
    """One `secretObjects[].data` entry: the Secret's `key` holds the bytes of the file `object_name`."""

    object_name: str  # the file as the mount shows it: objectAlias or objectName, `.crt`/`.key`, `NAME/N`
    key: str


@dataclass(frozen=True)
class SecretObject:
    """One `secretObjects` entry of a SecretProviderClass: a Kubernetes Secret filled from files."""

    secret_name: str
    type: str  # e.g. Opaque, kubernetes.io/tls
    data: tuple[SecretObjectData, ...]
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()

    @property
    def files(self) -> tuple[str, ...]:
        """The file names its data reads, each once."""
        return tuple(dict.fromkeys(d.object_name for d in self.data))


@dataclass(frozen=True)
class RenderDefaults:
    """What upstream's node-wide provider flags set for every volume; a volume's own parameters
    (writeCertAndKeyInSeparateFiles, constructPEMChain) override them. `kvfs csi node` takes them
    as flags and hands them to each daemon with its spawn."""

    split_cert_key: bool = False  # --write-cert-and-key-in-separate-files
    construct_pem_chain: bool = True  # --construct-pem-chain

    def to_json(self) -> dict[str, bool]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: object) -> RenderDefaults:
        """As a spawn request carries them; what is missing (an older plugin sent none) is upstream's."""
        given = value if isinstance(value, dict) else {}
        return cls(**{f.name: bool(given[f.name]) for f in dataclasses.fields(cls) if f.name in given})


@dataclass(frozen=True)
class MountConfig:
    """Everything one volume needs; the output of parameter parsing."""

    vault_name: str
    cloud: CloudConfig
    auth: AuthConfig
    objects: tuple[ObjectSpec, ...]
    split_cert_key: bool = False  # upstream --write-cert-and-key-in-separate-files
    construct_pem_chain: bool = True  # upstream --construct-pem-chain
    refresh_interval: float = DEFAULT_REFRESH_INTERVAL  # seconds; 0 disables background refresh
    max_staleness: float = 0.0  # seconds; 0 = serve last good bytes without bound
    cache_limit: int = DEFAULT_CACHE_LIMIT  # bytes of rendered versions the cache keeps
    file_group: int | None = None  # gid of files and folders: the pod's fsGroup (CSI volume_mount_group)
    pod_name: str = ""
    pod_namespace: str = ""
    pod_uid: str = ""
    service_account_name: str = ""
    secret_provider_class: str = ""

    @property
    def vault_url(self) -> str:
        return self.cloud.vault_url(self.vault_name)

    def summary(self) -> str:
        """One log line describing the mount; contains no secret material."""
        return (
            f"vault={self.vault_url} cloud={self.cloud.name} auth={self.auth.mode}"
            f" tenant={self.auth.tenant_id or '-'} client_id={self.auth.client_id or '-'}"
            f" objects={len(self.objects)} refresh={self.refresh_interval:g}s"
            + (f" pod={self.pod_namespace}/{self.pod_name}" if self.pod_name else "")
        )
