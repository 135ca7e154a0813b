"""Azure cloud names → Key Vault and Entra ID endpoints (`cloudName`, `cloudEnvFileName`).

Mirrors go-autorest's environment table as the upstream provider uses it: names are
case-insensitive and "" means AzurePublicCloud. AzureStackCloud reads its endpoints from a JSON
file; unlike upstream (which sets AZURE_ENVIRONMENT_FILEPATH process-wide, so concurrent mounts with different files could race) the file is
read per mount and nothing global changes. Error texts keep upstream's
``cloudName <x> is not valid, error: ...`` prefix and then say how to fix the input.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from typing import Any

from kvfs.config.model import CloudConfig
from kvfs.errors import ConfigError

log = logging.getLogger(__name__)

_PUBLIC = CloudConfig(
    name="AzurePublicCloud",
    keyvault_dns_suffix="vault.azure.net",
    keyvault_resource="https://vault.azure.net",
    authority_host="https://login.microsoftonline.com",
)

# The named clouds, keyed by upper-case name (names are case-insensitive), in display order.
_CLOUDS: dict[str, CloudConfig] = {
    cloud.name.upper(): cloud
    for cloud in (
        _PUBLIC,
        CloudConfig(
            name="AzureUSGovernmentCloud",
            keyvault_dns_suffix="vault.usgovcloudapi.net",
            keyvault_resource="https://vault.usgovcloudapi.net",
            authority_host="https://login.microsoftonline.us",
        ),
        CloudConfig(
            name="AzureChinaCloud",
            keyvault_dns_suffix="vault.azure.cn",
            keyvault_resource="https://vault.azure.cn",
            authority_host="https://login.chinacloudapi.cn",
        ),
        CloudConfig(
            name="AzureGermanCloud",
            keyvault_dns_suffix="vault.microsoftazure.de",
            keyvault_resource="https://vault.microsoftazure.de",
            authority_host="https://login.microsoftonline.de",
        ),
    )
}
# AzureStackCloud has no fixed endpoints: they come from its cloudEnvFileName.
_STACK_NAME = "AzureStackCloud"
_STACK = _STACK_NAME.upper()

VALID_CLOUD_NAMES: tuple[str, ...] = (*(cloud.name for cloud in _CLOUDS.values()), _STACK_NAME)

# host[:port], the form a Key Vault DNS suffix takes in a vault URL
_DNS_SUFFIX = re.compile(
    r"^(?=.{1,253}(:|$))[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]{1,5})?$"
)
MAX_ENV_FILE = 64 * 1024
_STACK_FIELDS = ("activeDirectoryEndpoint", "keyVaultEndpoint", "keyVaultDNSSuffix")
_STACK_FIX = (
    "cloudEnvFileName must name a JSON file with activeDirectoryEndpoint, keyVaultEndpoint "
    "and keyVaultDNSSuffix, e.g. "
    '{"activeDirectoryEndpoint": "https://adfs.local.azurestack.external/adfs/", '
    '"keyVaultEndpoint": "https://vault.local.azurestack.external/", '
    '"keyVaultDNSSuffix": "vault.local.azurestack.external"}'
)


def _invalid(cloud_name: str, error: str, fix: str) -> ConfigError:
    text = f"cloudName {cloud_name} is not valid, error: {error}"
    return ConfigError("cloudName", cloud_name, text, fix, message=text)


class EnvFileRead:
    """The cloud env file some parameters name, read ahead of parsing them: its text or the read's error.

    The CSI daemon reads it while still root (the file may be root's only) and parses every
    tenant-written parameter only after dropping to its own uid; `resolve_cloud` then takes the
    text from here, opening nothing, and raises a failed read's error where parsing reaches it, so
    errors come in the same order as when the file is read in place. Nothing here parses the file.
    """

    def __init__(self, cloud_name: str, env_file: str, allowed_dir: str | None) -> None:
        self.key = (cloud_name.strip(), env_file.strip(), allowed_dir)
        self._text = ""
        self._error: ConfigError | None = None
        name, path, _ = self.key
        if name.upper() == _STACK and path:  # the only case resolve_cloud reads a file
            try:
                self._text = _read_env_file(*self.key)
            except ConfigError as exc:
                self._error = exc

    def text(self, name: str, path: str, allowed_dir: str | None) -> str:
        """What `_read_env_file(name, path, allowed_dir)` returned or raised, read ahead."""
        if (name, path, allowed_dir) != self.key:
            raise ValueError(f"cloudEnvFileName {path!r} was not the file read ahead")  # a caller's bug
        if self._error is not None:
            raise self._error
        return self._text


def resolve_cloud(
    cloud_name: str, env_file: str = "", allowed_dir: str | None = None, read_ahead: EnvFileRead | None = None
) -> CloudConfig:
    """Endpoints for `cloud_name`; `env_file` is only read for AzureStackCloud.

    `allowed_dir`: see `read_env_file` (None reads any path: `kvfs mount` on a workstation).
    `read_ahead`: the file as read earlier by a more privileged self; then nothing is opened here.
    """
    name = cloud_name.strip()
    key = name.upper()
    if key == "":
        cloud = _PUBLIC
    elif key in _CLOUDS:
        cloud = _CLOUDS[key]
    elif key == _STACK:
        return _load_stack(name, env_file.strip(), allowed_dir, read_ahead)
    else:
        raise _invalid(
            name,
            f'autorest/azure: There is no cloud environment matching the name "{key}"',
            "valid cloudName values (case-insensitive): " + ", ".join(VALID_CLOUD_NAMES),
        )
    if env_file.strip():
        log.warning("cloudEnvFileName is ignored: it only applies to cloudName AzureStackCloud")
    return cloud


def _inside(path: str, folder: str) -> bool:
    return path != folder and os.path.commonpath([path, folder]) == folder


def _read_env_file(name: str, path: str, allowed_dir: str | None) -> str:
    """The text of a cloud environment file, read without trusting the path.

    With `allowed_dir` (the CSI plugin's --cloud-env-dir) only files inside that folder are
    read: a path outside it, by its text or through a symlink, is refused before anything
    outside is touched, so the answer never tells whether a node file exists. Always: opened
    non-blocking without following a final symlink, a regular file, at most MAX_ENV_FILE bytes.
    Errors quote nothing from the file.
    """
    if "\0" in path:
        raise _invalid(name, f"cloudEnvFileName {path!r} holds a NUL character", "name the file by its plain path")
    if allowed_dir is not None:
        folder = os.path.normpath(allowed_dir)
        inside = os.path.isabs(path) and _inside(os.path.normpath(path), folder)
        if not inside or not _inside(os.path.realpath(path), os.path.realpath(folder)):
            raise _invalid(
                name,
                f"cloudEnvFileName {path!r} is not a file inside {allowed_dir}",
                f"this node reads cloud environment files only from {allowed_dir}: put the file there and"
                " name it by its absolute path (a cluster admin sets the folder with"
                " `kvfs csi node --cloud-env-dir DIR`)",
            )
    real = os.path.realpath(path)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _invalid(name, f"open {path}: no such file or directory", _STACK_FIX) from None
    except OSError as exc:
        raise _invalid(
            name, f"open {path}: {(exc.strerror or 'cannot open').lower()}", "make the file readable by kvfs"
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _invalid(name, f"cloudEnvFileName {path!r} is not a regular file", _STACK_FIX)
        data = b""
        while len(data) <= MAX_ENV_FILE:
            chunk = os.read(fd, MAX_ENV_FILE + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise _invalid(name, f"read {path}: {(exc.strerror or 'failed').lower()}", _STACK_FIX) from None
    finally:
        os.close(fd)
    if len(data) > MAX_ENV_FILE:
        raise _invalid(
            name,
            f"cloudEnvFileName {path!r} is larger than {MAX_ENV_FILE // 1024} KiB",
            "a cloud environment file is a small JSON document; " + _STACK_FIX,
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid(name, f"cloudEnvFileName {path} is not UTF-8 text", _STACK_FIX) from None


def _load_stack(name: str, env_file: str, allowed_dir: str | None, read_ahead: EnvFileRead | None) -> CloudConfig:
    """Read an Azure Stack environment file (go-autorest's JSON, keys matched like Go's json)."""
    if not env_file:
        raise _invalid(name, "cloudEnvFileName is not set", _STACK_FIX)
    if read_ahead is None:
        raw = _read_env_file(name, env_file, allowed_dir)
    else:
        raw = read_ahead.text(name, env_file, allowed_dir)
    try:
        doc: Any = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _invalid(
            name,
            f"cloudEnvFileName {env_file} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            _STACK_FIX,
        ) from None
    if not isinstance(doc, dict):
        raise _invalid(name, f"cloudEnvFileName {env_file} must hold a JSON object", _STACK_FIX)
    values: dict[str, str] = {}
    for field in _STACK_FIELDS:
        value = _json_field(doc, field)
        if not isinstance(value, str) or not value.strip():
            raise _invalid(
                name,
                f"cloudEnvFileName {env_file}: field {field} is missing or not a non-empty string",
                f'add "{field}" to {env_file}; {_STACK_FIX}',
            )
        values[field] = value.strip()

    authority = _https_endpoint(name, env_file, "activeDirectoryEndpoint", values)
    resource = _https_endpoint(name, env_file, "keyVaultEndpoint", values)
    suffix = values["keyVaultDNSSuffix"]
    if not _DNS_SUFFIX.match(suffix):
        raise _invalid(
            name,
            f"cloudEnvFileName {env_file}: keyVaultDNSSuffix is not a host name with an optional :port",
            'write it like "vault.local.azurestack.external" (no scheme, no leading dot, no path)',
        )
    return CloudConfig(
        name=_STACK_NAME,
        keyvault_dns_suffix=suffix,
        keyvault_resource=resource,
        authority_host=authority,
    )


def _json_field(doc: dict[str, Any], field: str) -> Any:
    """Go's encoding/json matches object keys case-insensitively; the exact spelling wins."""
    if field in doc:
        return doc[field]
    for key, value in doc.items():
        if str(key).lower() == field.lower():
            return value
    return None


def _https_endpoint(name: str, env_file: str, field: str, values: dict[str, str]) -> str:
    """An endpoint URL from the env file, without trailing slash; HTTPS only."""
    url = values[field]
    if not url.lower().startswith("https://") or len(url.rstrip("/")) <= len("https://"):
        raise _invalid(
            name,
            f"cloudEnvFileName {env_file}: {field} is not an https:// URL",
            f'write {field} like "https://host.example/" (kvfs only talks HTTPS)',
        )
    return url.rstrip("/")
