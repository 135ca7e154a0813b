"""DefaultChainCredential: azure-identity's sync chain in a worker thread, mapped to AuthError."""

from __future__ import annotations

import errno
import time
from typing import Any

import pytest
import trio
from azure.core.credentials import AccessToken as AzureAccessToken
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError
from azure.identity import CredentialUnavailableError

from kvfs.auth.default_chain import DefaultChainCredential
from kvfs.config.model import CloudConfig
from kvfs.errors import AuthError

PUBLIC = CloudConfig("AzurePublicCloud", "vault.azure.net", "https://vault.azure.net",
                     "https://login.microsoftonline.com")
STACK = CloudConfig("AzureStackCloud", "vault.localhost:8443", "https://vault.localhost:8443",
                    "https://localhost:8443")
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
SCOPE = "https://vault.azure.net/.default"


class FakeSync:
    """Stands in for azure.identity.DefaultAzureCredential (sync API); records calls."""

    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome
        self.calls: list[tuple[tuple[str, ...], dict[str, Any]]] = []
        self.closed = False

    def get_token(self, *scopes: str, **kwargs: Any) -> AzureAccessToken:
        self.calls.append((scopes, kwargs))
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def close(self) -> None:
        self.closed = True


def make(cloud: CloudConfig, fake: FakeSync, made: list[dict[str, Any]]) -> DefaultChainCredential:
    def factory(**kwargs: Any) -> FakeSync:
        made.append(kwargs)
        return fake

    return DefaultChainCredential(cloud, TENANT, credential_factory=factory)


async def test_public_cloud_kwargs_and_expiry(monkeypatch) -> None:
    monkeypatch.delenv("AZURE_AUTHORITY_HOST", raising=False)
    fake = FakeSync(AzureAccessToken("tok-abc", int(time.time()) + 1800))
    made: list[dict[str, Any]] = []
    cred = make(PUBLIC, fake, made)
    token = await cred.get_token(SCOPE)
    assert token.token == "tok-abc"
    assert token.expires_at == pytest.approx(trio.current_time() + 1800, abs=2)
    assert made == [{
        "exclude_interactive_browser_credential": True,
        "additionally_allowed_tenants": ["*"],
        "authority": "https://login.microsoftonline.com",
    }]
    assert fake.calls == [((SCOPE,), {"tenant_id": TENANT})]
    await cred.get_token(SCOPE)
    assert len(made) == 1  # one chain per credential, reused
    await cred.aclose()
    assert fake.closed


async def test_non_public_cloud_disables_instance_discovery(monkeypatch) -> None:
    monkeypatch.delenv("AZURE_AUTHORITY_HOST", raising=False)
    made: list[dict[str, Any]] = []
    await make(STACK, FakeSync(AzureAccessToken("t", int(time.time()) + 60)), made).get_token(SCOPE)
    assert made[0]["authority"] == "https://localhost:8443"
    assert made[0]["disable_instance_discovery"] is True


async def test_azure_authority_host_env_wins(monkeypatch) -> None:
    monkeypatch.setenv("AZURE_AUTHORITY_HOST", "https://localhost:9443/")
    made: list[dict[str, Any]] = []
    cred = make(PUBLIC, FakeSync(AzureAccessToken("t", int(time.time()) + 60)), made)
    await cred.get_token(SCOPE)
    assert "authority" not in made[0]  # azure-identity reads AZURE_AUTHORITY_HOST itself
    assert made[0]["disable_instance_discovery"] is True
    assert cred.authority == "https://localhost:9443/"


@pytest.mark.parametrize(
    ("exc", "code", "err_no"),
    [
        (CredentialUnavailableError("AzureCliCredential: Azure CLI not found on path"),
         "default_chain_unavailable", errno.EACCES),
        (ClientAuthenticationError("AADSTS700082: The refresh token has expired"), "AADSTS700082",
         errno.EACCES),
        (ServiceRequestError("cannot connect"), "default_chain_error", errno.EIO),
    ],
)
async def test_exceptions_mapped(exc: Exception, code: str, err_no: int) -> None:
    cred = make(PUBLIC, FakeSync(exc), [])
    with pytest.raises(AuthError) as caught:
        await cred.get_token(SCOPE)
    assert caught.value.code == code and caught.value.errno == err_no
    assert str(exc).split(":")[0] in str(caught.value)
    assert "az login" in str(caught.value)


async def test_real_chain_explains_what_it_tried(monkeypatch, tmp_path) -> None:
    """The real DefaultAzureCredential, limited to the environment credential (no network)."""
    for name in ("AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID", "AZURE_USERNAME",
                 "AZURE_FEDERATED_TOKEN_FILE", "AZURE_AUTHORITY_HOST", "AZURE_CLIENT_CERTIFICATE_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_TOKEN_CREDENTIALS", "EnvironmentCredential")
    monkeypatch.setenv("HOME", str(tmp_path))
    cred = DefaultChainCredential(STACK, TENANT)
    with pytest.raises(AuthError) as caught:
        await cred.get_token(SCOPE)
    assert "EnvironmentCredential" in str(caught.value)
    assert caught.value.code == "default_chain_unavailable"
    assert f"az login --tenant {TENANT}" in str(caught.value)
    assert "https://localhost:8443" in str(caught.value)
    assert "\n" not in str(caught.value)
    await cred.aclose()
