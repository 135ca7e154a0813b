"""DefaultChainCredential: azure-identity's sync chain in a worker thread, mapped to AuthError."""

from __future__ import annotations

import errno
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
from azure.core.credentials import AccessToken as AzureAccessToken
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError
from azure.identity import CredentialUnavailableError

from kvfs.auth.default_chain import DefaultChainCredential, summarize_chain_error
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


class _NoIdentityImds(BaseHTTPRequestHandler):
    """IMDS of a VM without a managed identity: every token request answers 400."""

    def do_GET(self) -> None:
        body = json.dumps({"error": "invalid_request", "error_description": "Identity not found"}).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def no_identity_imds() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoIdentityImds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_real_chain_says_in_one_line_what_each_credential_lacked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_identity_imds: str
) -> None:
    """The real DefaultAzureCredential, whole chain, on a machine with nothing to sign in with: no
    environment credentials, no az/azd/pwsh on PATH, an empty HOME, an IMDS with no identity."""
    for name in ("AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID", "AZURE_USERNAME",
                 "AZURE_FEDERATED_TOKEN_FILE", "AZURE_AUTHORITY_HOST", "AZURE_CLIENT_CERTIFICATE_PATH",
                 "AZURE_TOKEN_CREDENTIALS", "IDENTITY_ENDPOINT", "MSI_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", no_identity_imds)
    cred = DefaultChainCredential(STACK, TENANT)
    with pytest.raises(AuthError) as caught:
        await cred.get_token(SCOPE)
    await cred.aclose()
    message = str(caught.value)
    assert caught.value.code == "default_chain_unavailable"
    assert message.startswith(f"workstation sign-in failed (DefaultAzureCredential, authority https://localhost:8443,"
                              f" tenant {TENANT}): tried EnvironmentCredential: ")
    tried = message.split("): tried ", 1)[1].split(". Fix: ")[0]
    clauses = dict(entry.split(": ", 1) for entry in tried.split("; "))
    assert clauses["EnvironmentCredential"] == "Environment variables are not fully configured"
    assert clauses["AzureCliCredential"] == "Azure CLI not found on path"
    assert {"WorkloadIdentityCredential", "ManagedIdentityCredential", "SharedTokenCacheCredential",
            "AzureDeveloperCliCredential"} <= set(clauses)
    assert all(0 < len(why) <= 90 and "Credential" not in why for why in clauses.values())
    assert "\n" not in message
    for noise in ("http", "To mitigate", "Visit", "troubleshoot"):
        assert noise not in tried
    assert message.endswith(f"Fix: sign in with `az login --tenant {TENANT}`, or set AZURE_CLIENT_ID/AZURE_TENANT_ID/"
                            "AZURE_CLIENT_SECRET, or pass --secrets with clientid/clientsecret.")


CHAIN_FAILED = (
    "DefaultAzureCredential failed to retrieve a token from the included credentials.\n"
    "Attempted credentials:\n"
    "\tEnvironmentCredential: EnvironmentCredential authentication unavailable. Environment variables are not"
    " fully configured.\nVisit https://aka.ms/azsdk/python/identity/environmentcredential/troubleshoot to"
    " troubleshoot this issue.\n"
    "\tManagedIdentityCredential: ManagedIdentityCredential authentication unavailable, no response from the IMDS"
    " endpoint.\n"
    "\tSharedTokenCacheCredential\n"
    "\tAzureCliCredential: ERROR: AADSTS700082: The refresh token has expired due to inactivity. The token was"
    " issued on 2026-01-01.\nTrace ID: 0000 Correlation ID: 1111\nTo re-authenticate, please run:\naz login\n"
    "To mitigate this issue, please refer to the troubleshooting guidelines here at"
    " https://aka.ms/azsdk/python/identity/defaultazurecredential/troubleshoot."
)


def test_chain_message_becomes_one_clause_per_credential() -> None:
    assert summarize_chain_error(CHAIN_FAILED) == (
        "tried EnvironmentCredential: Environment variables are not fully configured;"
        " ManagedIdentityCredential: no response from the IMDS endpoint;"
        " SharedTokenCacheCredential: unavailable;"
        " AzureCliCredential: AADSTS700082: The refresh token has expired due to inactivity"
    )


@pytest.mark.parametrize(
    "text",
    ["Azure CLI not found on path", "Attempted credentials:\n\t: nameless", "x" * 500 + "\nsecond line"],
    ids=["not-the-chain", "unparsable-chain", "long"],
)
def test_other_messages_are_one_bounded_line(text: str) -> None:
    summary = summarize_chain_error(text)
    assert "\n" not in summary and len(summary) <= 303
    assert summary.startswith(text.splitlines()[0][:300].strip())


async def test_chain_failure_code_and_message(monkeypatch: pytest.MonkeyPatch) -> None:
    cred = make(PUBLIC, FakeSync(ClientAuthenticationError(CHAIN_FAILED)), [])
    with pytest.raises(AuthError) as caught:
        await cred.get_token(SCOPE)
    assert caught.value.code == "AADSTS700082"
    assert "tried EnvironmentCredential: " in str(caught.value) and "Trace ID" not in str(caught.value)
