"""Cloud table and Azure Stack env files: upstream's cloud names (case-insensitive, "" = public) and
suffixes, and a per-mount cloud env file (upstream sets a process-wide environment variable)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kvfs.config.clouds import VALID_CLOUD_NAMES, resolve_cloud
from kvfs.errors import ConfigError

CLOUDS = {
    "AzurePublicCloud": (
        "vault.azure.net",
        "https://vault.azure.net",
        "https://login.microsoftonline.com",
    ),
    "AzureUSGovernmentCloud": (
        "vault.usgovcloudapi.net",
        "https://vault.usgovcloudapi.net",
        "https://login.microsoftonline.us",
    ),
    "AzureChinaCloud": (
        "vault.azure.cn",
        "https://vault.azure.cn",
        "https://login.chinacloudapi.cn",
    ),
    "AzureGermanCloud": (
        "vault.microsoftazure.de",
        "https://vault.microsoftazure.de",
        "https://login.microsoftonline.de",
    ),
}


@pytest.mark.parametrize("name", sorted(CLOUDS))
@pytest.mark.parametrize("spelling", [str, str.upper, str.lower])
def test_known_clouds_case_insensitive(name: str, spelling) -> None:
    cloud = resolve_cloud(spelling(name))
    suffix, resource, authority = CLOUDS[name]
    assert cloud.name == name
    assert cloud.keyvault_dns_suffix == suffix
    assert cloud.keyvault_resource == resource
    assert cloud.authority_host == authority
    assert cloud.scope == resource + "/.default"
    assert cloud.is_public_azure


def test_empty_name_is_public() -> None:
    assert resolve_cloud("").name == "AzurePublicCloud"
    assert resolve_cloud("  ").name == "AzurePublicCloud"


@pytest.mark.parametrize(
    ("name", "suffix"),
    [
        ("", "vault.azure.net"),
        ("AZUREPUBLICCLOUD", "vault.azure.net"),
        ("AZURECHINACLOUD", "vault.azure.cn"),
        ("AZUREGERMANCLOUD", "vault.microsoftazure.de"),
        ("AZUREUSGOVERNMENTCLOUD", "vault.usgovcloudapi.net"),
    ],
)
def test_vault_url_conformance(name: str, suffix: str) -> None:
    assert resolve_cloud(name).vault_url("testkv") == f"https://testkv.{suffix}/"


@pytest.mark.parametrize("name", ["AZUREWRONGCLOUD", "AzureCloud1"])
def test_unknown_cloud_keeps_upstream_prefix_and_lists_names(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_cloud(name)
    msg = str(info.value)
    assert msg.startswith(
        f"cloudName {name} is not valid, error: autorest/azure: There is no cloud environment"
        f' matching the name "{name.upper()}"'
    )
    assert msg.endswith("(valid cloudName values (case-insensitive): " + ", ".join(VALID_CLOUD_NAMES) + ")")


def test_valid_cloud_names_are_the_cloud_tables_in_display_order_and_azure_stack() -> None:
    assert VALID_CLOUD_NAMES == (*CLOUDS, "AzureStackCloud")
    assert [resolve_cloud(name).name for name in CLOUDS] == list(CLOUDS)


def _stack_file(tmp_path: Path, doc: object, name: str = "env.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


STACK = {
    "name": "AZURESTACKCLOUD",
    "activeDirectoryEndpoint": "https://adfs.local.azurestack.external/adfs/",
    "keyVaultEndpoint": "https://vault.local.azurestack.external/",
    "keyVaultDNSSuffix": "vault.local.azurestack.external",
    "resourceManagerEndpoint": "https://management.local.azurestack.external/",
}


def test_stack_needs_env_file() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_cloud("AZURESTACKCLOUD")
    msg = str(info.value)
    assert msg.startswith("cloudName AZURESTACKCLOUD is not valid, error: ")
    assert "cloudEnvFileName" in msg and "keyVaultDNSSuffix" in msg


def test_stack_env_file(tmp_path: Path) -> None:
    cloud = resolve_cloud("AzureStackCloud", _stack_file(tmp_path, STACK))
    assert cloud.name == "AzureStackCloud"
    assert cloud.authority_host == "https://adfs.local.azurestack.external/adfs"
    assert cloud.keyvault_resource == "https://vault.local.azurestack.external"
    assert cloud.scope == "https://vault.local.azurestack.external/.default"
    assert cloud.keyvault_dns_suffix == "vault.local.azurestack.external"
    assert cloud.vault_url("kv1") == "https://kv1.vault.local.azurestack.external/"
    assert not cloud.is_public_azure


def test_stack_name_optional_port_allowed_keys_case_insensitive(tmp_path: Path) -> None:
    doc = {
        "activedirectoryendpoint": "https://localhost:8443",
        "KEYVAULTENDPOINT": "https://vault.localhost:8443",
        "keyVaultDNSSuffix": "vault.localhost:8443",
    }
    cloud = resolve_cloud("azurestackcloud", _stack_file(tmp_path, doc))
    assert cloud.authority_host == "https://localhost:8443"
    assert cloud.vault_url("kv1") == "https://kv1.vault.localhost:8443/"


def test_stack_file_name_field_cannot_turn_on_public_azure(tmp_path: Path) -> None:
    # The file's "name" must not make kvfs treat a private authority as Microsoft-run.
    cloud = resolve_cloud(
        "AzureStackCloud", _stack_file(tmp_path, {**STACK, "name": "AzurePublicCloud"})
    )
    assert cloud.name == "AzureStackCloud"
    assert not cloud.is_public_azure


def test_stack_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError) as info:
        resolve_cloud("AzureStackCloud", missing)
    assert str(info.value).startswith(
        f"cloudName AzureStackCloud is not valid, error: open {missing}: no such file or directory"
    )


@pytest.mark.parametrize(
    "field", ["activeDirectoryEndpoint", "keyVaultEndpoint", "keyVaultDNSSuffix"]
)
def test_stack_missing_field_is_named(tmp_path: Path, field: str) -> None:
    doc = {k: v for k, v in STACK.items() if k != field}
    with pytest.raises(ConfigError) as info:
        resolve_cloud("AzureStackCloud", _stack_file(tmp_path, doc))
    assert f"field {field} is missing" in str(info.value)
    assert f'add "{field}"' in str(info.value)


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({**STACK, "keyVaultEndpoint": "http://vault.local/"}, "keyVaultEndpoint"),
        ({**STACK, "activeDirectoryEndpoint": "adfs.local"}, "activeDirectoryEndpoint"),
        ({**STACK, "keyVaultDNSSuffix": "https://vault.local"}, "keyVaultDNSSuffix"),
        ({**STACK, "keyVaultDNSSuffix": ".vault.local"}, "keyVaultDNSSuffix"),
        ({**STACK, "keyVaultDNSSuffix": 5}, "keyVaultDNSSuffix"),
        ([STACK], "JSON object"),
    ],
)
def test_stack_bad_values(tmp_path: Path, doc: object, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_cloud("AzureStackCloud", _stack_file(tmp_path, doc))
    assert str(info.value).startswith("cloudName AzureStackCloud is not valid, error: ")
    assert needle in str(info.value)


def test_stack_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "env.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        resolve_cloud("AzureStackCloud", str(path))


def test_stack_is_per_mount_and_leaves_environment_alone(tmp_path: Path) -> None:
    before = dict(os.environ)
    a = resolve_cloud("AzureStackCloud", _stack_file(tmp_path, STACK, "a.json"))
    other = {
        **STACK,
        "keyVaultDNSSuffix": "vault.other.example",
        "keyVaultEndpoint": "https://vault.other.example/",
    }
    b = resolve_cloud("AzureStackCloud", _stack_file(tmp_path, other, "b.json"))
    again = resolve_cloud("AzureStackCloud", _stack_file(tmp_path, STACK, "a.json"))
    assert a.keyvault_dns_suffix == again.keyvault_dns_suffix == "vault.local.azurestack.external"
    assert b.keyvault_dns_suffix == "vault.other.example"
    assert dict(os.environ) == before


def test_env_file_ignored_for_non_stack_clouds(tmp_path: Path) -> None:
    cloud = resolve_cloud("AzureChinaCloud", _stack_file(tmp_path, STACK))
    assert cloud.keyvault_dns_suffix == "vault.azure.cn"


# --- reading the env file safely (issue 9: the CSI plugin reads it as root) ------------------


def test_stack_env_file_must_be_a_small_regular_file(tmp_path: Path) -> None:
    """/dev/zero, a FIFO without a writer, a folder and 10 MiB fail at once (no hang, no OOM)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.json"
    big.write_bytes(b"{" + b" " * (10 * 1024 * 1024) + b"}")
    for path, problem in [
        ("/dev/zero", "is not a regular file"),
        (str(fifo), "is not a regular file"),
        (str(tmp_path), "is not a regular file"),
        (str(big), "is larger than 64 KiB"),
    ]:
        with pytest.raises(ConfigError) as info:
            resolve_cloud("AzureStackCloud", path)
        assert problem in str(info.value), path


def test_stack_env_file_errors_quote_nothing_from_the_file(tmp_path: Path) -> None:
    doc = {**STACK, "keyVaultDNSSuffix": "NODE-SECRET_4711", "keyVaultEndpoint": "http://NODE-SECRET-0815/"}
    for bad in ({**doc, "keyVaultEndpoint": STACK["keyVaultEndpoint"]}, doc):
        with pytest.raises(ConfigError) as info:
            resolve_cloud("AzureStackCloud", _stack_file(tmp_path, bad))
        assert "NODE-SECRET" not in str(info.value)
    (tmp_path / "text.json").write_text("NODE-SECRET-1234 is not json")
    with pytest.raises(ConfigError) as info:
        resolve_cloud("AzureStackCloud", str(tmp_path / "text.json"))
    assert "NODE-SECRET" not in str(info.value) and "is not valid JSON" in str(info.value)


def test_workstation_follows_a_symlink_the_user_names(tmp_path: Path) -> None:
    (tmp_path / "link.json").symlink_to(_stack_file(tmp_path, STACK))
    assert resolve_cloud("AzureStackCloud", str(tmp_path / "link.json")).name == "AzureStackCloud"


def test_cluster_reads_env_files_only_inside_the_admin_folder(tmp_path: Path) -> None:
    admin = tmp_path / "admin"
    admin.mkdir()
    inside = _stack_file(admin, STACK)
    assert resolve_cloud("AzureStackCloud", inside, str(admin)).name == "AzureStackCloud"
    outside = _stack_file(tmp_path, STACK, "outside.json")
    (admin / "escape.json").symlink_to(outside)
    (admin / "shadow").symlink_to("/etc/shadow")
    refused = [
        outside,
        str(tmp_path / "missing.json"),  # same answer: existence outside is never told
        "/etc/shadow",
        str(admin / "escape.json"),
        str(admin / "shadow"),
        f"{admin}/../outside.json",
        "env.json",  # relative
        str(admin),
    ]
    for path in refused:
        with pytest.raises(ConfigError) as info:
            resolve_cloud("AzureStackCloud", path, str(admin))
        text = str(info.value)
        assert f"is not a file inside {admin}" in text and "--cloud-env-dir" in text, path
        assert "no such file" not in text


@pytest.mark.parametrize("allowed_dir", [None, "/etc/kvfs/clouds"])
def test_a_nul_in_the_env_file_name_is_a_config_error_not_a_traceback(allowed_dir: str | None) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_cloud("AzureStackCloud", "/etc/kvfs/clouds/a\0b.json", allowed_dir)
    assert "holds a NUL character" in str(info.value)
