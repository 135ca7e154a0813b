"""The emulator's identity routes proven with azure-identity's own (sync) credentials.

azure-identity insists on an https authority, so instead of TLS the SDK gets a requests adapter
that hands each request to the ASGI app in-process; the SDK's own request building, MSAL tenant
discovery and response parsing all run unchanged. SDK-over-real-HTTPS belongs to test_sdk_*.py.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import trio
import urllib3
from azure.core.exceptions import ClientAuthenticationError
from azure.core.pipeline.transport import RequestsTransport
from azure.identity import (
    ClientAssertionCredential,
    ClientSecretCredential,
    CredentialUnavailableError,
    ManagedIdentityCredential,
    WorkloadIdentityCredential,
)
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict
from starlette.applications import Starlette
from starlette.types import ASGIApp

from idp import AUTH, KV, SCOPE, TENANT, make_provider
from kvfs.emulator.identity import IdentityProvider

IMDS_HOST = "http://169.254.169.254"


class ASGIAdapter(BaseAdapter):
    """A requests transport adapter that answers from an ASGI app instead of the network."""

    def __init__(self, app: ASGIApp) -> None:
        super().__init__()
        self.app = app
        self.urls: list[str] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport) as client:
                body = request.body.encode() if isinstance(request.body, str) else request.body
                return await client.request(
                    request.method or "GET", request.url or "", headers=dict(request.headers), content=body
                )

        self.urls.append(request.url or "")
        r = trio.run(call)
        headers = {
            k: v for k, v in r.headers.items() if k.lower() not in ("content-encoding", "transfer-encoding")
        }
        resp = requests.Response()
        resp.status_code = r.status_code
        resp.headers = CaseInsensitiveDict(headers)
        resp.raw = urllib3.HTTPResponse(
            body=io.BytesIO(r.content), headers=headers, status=r.status_code, preload_content=False
        )
        resp.url = request.url or ""
        resp.request = request
        resp.reason = r.reason_phrase
        resp.encoding = "utf-8"
        return resp

    def close(self) -> None:
        pass


def transport(adapter: ASGIAdapter) -> RequestsTransport:
    session = requests.Session()
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return RequestsTransport(session=session, session_owner=False)


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[IdentityProvider]:
    for name in list(os.environ):
        if name.startswith(("AZURE_", "IDENTITY_", "MSI_", "IMDS_")):
            monkeypatch.delenv(name)
    yield make_provider(monkeypatch)


@pytest.fixture
def entra(provider: IdentityProvider) -> ASGIAdapter:
    return ASGIAdapter(Starlette(routes=provider.https_routes()))


@pytest.fixture
def imds(provider: IdentityProvider, monkeypatch: pytest.MonkeyPatch) -> ASGIAdapter:
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", IMDS_HOST)
    return ASGIAdapter(Starlette(routes=provider.http_routes()))


def test_client_secret_credential_via_msal(provider: IdentityProvider, entra: ASGIAdapter) -> None:
    app = provider.default_app
    cred = ClientSecretCredential(
        TENANT,
        app.client_id,
        app.client_secret or "",
        authority=AUTH,
        transport=transport(entra),
        disable_instance_discovery=True,
    )
    token = cred.get_token(SCOPE)
    assert provider.verify_access_token(token.token, audience=KV).client_id == app.client_id
    assert any(u.endswith(f"/{TENANT}/v2.0/.well-known/openid-configuration") for u in entra.urls)
    assert all(u.startswith(AUTH) for u in entra.urls)  # nothing reached for public Azure


def test_client_secret_credential_wrong_secret(provider: IdentityProvider, entra: ASGIAdapter) -> None:
    cred = ClientSecretCredential(
        TENANT,
        provider.default_app.client_id,
        "wrong",
        authority=AUTH,
        transport=transport(entra),
        disable_instance_discovery=True,
    )
    with pytest.raises(ClientAuthenticationError, match="AADSTS7000215"):
        cred.get_token(SCOPE)


def test_client_assertion_credential(provider: IdentityProvider, entra: ASGIAdapter) -> None:
    sa = provider.mint_sa_token("default", "workload")
    cred = ClientAssertionCredential(
        TENANT, provider.default_app.client_id, lambda: sa, authority=AUTH, transport=transport(entra)
    )
    token = cred.get_token(SCOPE)
    assert provider.verify_access_token(token.token, audience=KV).client_id == provider.default_app.client_id


def test_workload_identity_credential_reads_token_file(
    provider: IdentityProvider, entra: ASGIAdapter, tmp_path: Path
) -> None:
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text(provider.mint_sa_token("default", "workload") + "\n")  # kubelet-style newline
    cred = WorkloadIdentityCredential(
        tenant_id=TENANT,
        client_id=provider.default_app.client_id,
        token_file_path=str(token_file),
        authority=AUTH,
        transport=transport(entra),
    )
    token = cred.get_token(SCOPE)
    assert provider.verify_access_token(token.token, audience=KV).client_id == provider.default_app.client_id


def test_workload_identity_subject_mismatch(
    provider: IdentityProvider, entra: ASGIAdapter, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(provider.mint_sa_token("default", "other"))
    cred = WorkloadIdentityCredential(
        tenant_id=TENANT,
        client_id=provider.default_app.client_id,
        token_file_path=str(token_file),
        authority=AUTH,
        transport=transport(entra),
    )
    with pytest.raises(ClientAuthenticationError, match="AADSTS70021"):
        cred.get_token(SCOPE)


def test_managed_identity_credential_over_imds(provider: IdentityProvider, imds: ASGIAdapter) -> None:
    default = provider.default_managed_identity
    token = ManagedIdentityCredential(transport=transport(imds)).get_token(SCOPE)
    assert provider.verify_access_token(token.token, audience=KV).client_id == default.client_id
    assert imds.urls and all(u.startswith(IMDS_HOST + "/metadata/identity/oauth2/token") for u in imds.urls)

    second = provider.add_managed_identity()
    token = ManagedIdentityCredential(client_id=second.client_id, transport=transport(imds)).get_token(SCOPE)
    assert provider.verify_access_token(token.token, audience=KV).client_id == second.client_id
    with pytest.raises(CredentialUnavailableError, match="Multiple user assigned identities exist"):
        ManagedIdentityCredential(transport=transport(imds)).get_token(SCOPE)
