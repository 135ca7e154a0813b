"""Every azure-identity credential kvfs users have, reading a secret from the emulator over HTTPS."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import (
    ClientAssertionCredential,
    ClientSecretCredential,
    ManagedIdentityCredential,
    WorkloadIdentityCredential,
)
from azure.keyvault.secrets import SecretClient

from kvfs.emulator.server import Emulator, EmulatorThread


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    with EmulatorThread(tmp_path_factory.mktemp("emu")) as emu:
        emu.set_secret("demo", "who", "you")
        yield emu


@pytest.fixture(autouse=True)
def _env(emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(emu.ca_file))
    for var in ("AZURE_FEDERATED_TOKEN_FILE", "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_AUTHORITY_HOST",
                "IDENTITY_ENDPOINT", "MSI_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    emu.reset_counts()
    yield
    emu.faults.reset()


def read(emu: Emulator, credential: object) -> str | None:
    return SecretClient(emu.vault_url("demo"), credential).get_secret("who").value  # type: ignore[arg-type]


def test_workload_identity_credential_with_the_sa_token_file(emu: Emulator) -> None:
    info = emu.info
    cred = WorkloadIdentityCredential(
        tenant_id=info["tenant_id"], client_id=info["app"]["client_id"],
        token_file_path=info["sa_token_file"], authority=info["authority_host"],
    )
    assert read(emu, cred) == "you"
    assert emu.count(route="token", client_id=info["app"]["client_id"]) == 1
    assert emu.count(vault="demo", route="get_secret", client_id=info["app"]["client_id"]) == 1


def test_client_assertion_credential(emu: Emulator) -> None:
    token = Path(emu.info["sa_token_file"]).read_text()
    cred = ClientAssertionCredential(
        emu.tenant_id, emu.info["app"]["client_id"], lambda: token, authority=emu.authority_host
    )
    assert read(emu, cred) == "you"


def test_managed_identity_credential_via_imds(emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", emu.imds_url)
    assert read(emu, ManagedIdentityCredential()) == "you"
    assert emu.count(vault="demo", client_id=emu.info["managed_identity"]["client_id"]) >= 1


def test_token_for_another_tenant_is_refused(emu: Emulator) -> None:
    """A token whose issuer is not the vault's tenant gets 401 AKV10032 and no secret."""
    app = emu.info["app"]
    token = emu.identity.mint_access_token(app["client_id"], tenant_id="00000000-0000-0000-0000-000000000001")
    r = httpx.get(
        emu.vault_url("demo") + "secrets/who?api-version=7.6",
        headers={"Authorization": f"Bearer {token}"}, verify=ssl.create_default_context(cafile=emu.ca_file),
    )
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "Unauthorized"
    assert r.json()["error"]["message"].startswith("AKV10032: Invalid issuer.")
    assert r.headers["www-authenticate"] == (
        f'Bearer authorization="{emu.authority_host}/{emu.tenant_id}", resource="{emu.kv_resource}"'
    )
    assert token not in r.text


def test_entra_outage_fails_token_acquisition(emu: Emulator) -> None:
    app = emu.info["app"]
    emu.faults.entra_outage(True)
    cred = ClientSecretCredential(
        emu.tenant_id, app["client_id"], app["client_secret"], authority=emu.authority_host,
        disable_instance_discovery=True, retry_total=0,
    )
    with pytest.raises(ClientAuthenticationError):
        cred.get_token(emu.kv_resource + "/.default")
    emu.faults.entra_outage(False)
    # a fresh credential: MSAL remembers the 503 for a while on purpose
    fresh = ClientSecretCredential(
        emu.tenant_id, app["client_id"], app["client_secret"], authority=emu.authority_host,
        disable_instance_discovery=True,
    )
    assert fresh.get_token(emu.kv_resource + "/.default").token
