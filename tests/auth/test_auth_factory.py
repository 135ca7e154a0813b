"""build_credential: each auth mode gets the right flow behind one token cache."""

from __future__ import annotations

import time
from urllib.parse import parse_qs

import httpx
import pytest

from kvfs.auth.cache import CachingCredential
from kvfs.auth.default_chain import DefaultChainCredential
from kvfs.auth.factory import build_credential
from kvfs.auth.flows import AssertionCredential, ClientSecretCredential, ImdsCredential, NmiCredential
from kvfs.auth.tokensource import FileTokenSource, PushedTokenSource
from kvfs.config.model import AuthConfig, CloudConfig, MountConfig
from kvfs.errors import AuthError

CLOUD = CloudConfig("AzurePublicCloud", "vault.azure.net", "https://vault.azure.net",
                    "https://login.microsoftonline.com")
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
APP_ID = "11111111-2222-3333-4444-555555555555"
UAMI_ID = "99999999-8888-7777-6666-555555555555"


def mount(auth: AuthConfig) -> MountConfig:
    return MountConfig(vault_name="kv-demo", cloud=CLOUD, auth=auth, objects=())


class Recorder:
    """An Entra/IMDS/NMI stand-in that records requests and answers with a one-hour token."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path.startswith("/host/token"):
            return httpx.Response(200, json={"token": {"access_token": "at", "expires_on":
                                                       str(int(time.time()) + 3600)}, "clientid": "x"})
        return httpx.Response(200, json={"access_token": "at", "expires_in": "3600"})


@pytest.mark.parametrize("client_id", [APP_ID, UAMI_ID])
async def test_workload_identity_from_file_app_and_managed_identity(tmp_path, autojump_clock, sa_token,
                                                                    client_id: str) -> None:
    token_file = tmp_path / "azure-identity-token"
    assertion = sa_token()
    token_file.write_text(assertion + "\n")
    rec = Recorder()
    async with httpx.AsyncClient(transport=httpx.MockTransport(rec)) as http:
        cred = build_credential(mount(AuthConfig("workload_identity", tenant_id=TENANT, client_id=client_id,
                                                 sa_token_file=str(token_file))), http)
        assert isinstance(cred, CachingCredential)
        assert isinstance(cred.inner, AssertionCredential)
        assert isinstance(cred.inner.token_source, FileTokenSource)
        for _ in range(3):
            await cred.get_token(CLOUD.scope)
    assert len(rec.requests) == 1  # cached
    form = {k: v[0] for k, v in parse_qs(rec.requests[0].content.decode()).items()}
    assert form["client_id"] == client_id and form["client_assertion"] == assertion
    assert str(rec.requests[0].url) == f"https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token"


async def test_workload_identity_inline_and_explicit_source(sa_token) -> None:
    http = httpx.AsyncClient()
    auth = AuthConfig("workload_identity", tenant_id=TENANT, client_id=APP_ID, sa_token=sa_token())
    cred = build_credential(mount(auth), http)
    assert isinstance(cred.inner.token_source, PushedTokenSource)  # type: ignore[attr-defined]
    mine = PushedTokenSource(sa_token())
    cred = build_credential(mount(auth), http, token_source=mine)
    assert cred.inner.token_source is mine  # type: ignore[attr-defined]
    # Neither a token nor a file (parse_parameters never produces that): the first token
    # request says what is missing, before anything is sent.
    cred = build_credential(mount(AuthConfig("workload_identity", tenant_id=TENANT, client_id=APP_ID)), http)
    with pytest.raises(AuthError, match="AZURE_FEDERATED_TOKEN_FILE") as exc:
        await cred.get_token(CLOUD.scope)
    assert exc.value.code == "token_file_missing"
    await http.aclose()


async def test_service_principal(autojump_clock) -> None:
    rec = Recorder()
    async with httpx.AsyncClient(transport=httpx.MockTransport(rec)) as http:
        cred = build_credential(mount(AuthConfig("service_principal", tenant_id=TENANT, client_id=APP_ID,
                                                 client_secret="s3cr3t")), http)
        assert isinstance(cred.inner, ClientSecretCredential)  # type: ignore[attr-defined]
        await cred.get_token(CLOUD.scope)
    assert "client_secret=s3cr3t" in rec.requests[0].content.decode()


async def test_vm_managed_identity_uses_local_http(autojump_clock, monkeypatch) -> None:
    monkeypatch.delenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", raising=False)
    entra, local = Recorder(), Recorder()
    async with httpx.AsyncClient(transport=httpx.MockTransport(entra)) as http, \
            httpx.AsyncClient(transport=httpx.MockTransport(local), trust_env=False) as local_http:
        cred = build_credential(mount(AuthConfig("vm_managed_identity", user_assigned_identity_id=UAMI_ID)),
                                http, local_http=local_http)
        assert isinstance(cred.inner, ImdsCredential)  # type: ignore[attr-defined]
        await cred.get_token(CLOUD.scope)
        await cred.aclose()
        assert not local_http.is_closed  # the caller's client stays open
    assert entra.requests == [] and len(local.requests) == 1
    assert local.requests[0].url.params["client_id"] == UAMI_ID


async def test_vm_managed_identity_system_assigned_owns_client() -> None:
    cred = build_credential(mount(AuthConfig("vm_managed_identity")), httpx.AsyncClient())
    inner = cred.inner  # type: ignore[attr-defined]
    assert isinstance(inner, ImdsCredential) and inner.client_id is None
    await cred.aclose()
    assert inner._http.is_closed


async def test_pod_identity_takes_pod_from_mount(autojump_clock) -> None:
    local = Recorder()
    config = MountConfig(vault_name="kv", cloud=CLOUD, auth=AuthConfig("pod_identity"), objects=(),
                         pod_name="web-0", pod_namespace="shop")
    async with httpx.AsyncClient(transport=httpx.MockTransport(local)) as local_http:
        cred = build_credential(config, httpx.AsyncClient(), local_http=local_http)
        assert isinstance(cred.inner, NmiCredential)  # type: ignore[attr-defined]
        await cred.get_token(CLOUD.scope)
    assert local.requests[0].headers["podname"] == "web-0"
    assert local.requests[0].headers["podns"] == "shop"


def test_default_chain() -> None:
    cred = build_credential(mount(AuthConfig("default_chain", tenant_id=TENANT)), httpx.AsyncClient())
    inner = cred.inner  # type: ignore[attr-defined]
    assert isinstance(inner, DefaultChainCredential) and inner.tenant_id == TENANT
