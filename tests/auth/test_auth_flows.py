"""The four HTTP token flows: exact request shape, response parsing, retries, errors."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import time
from collections.abc import Callable
from urllib.parse import parse_qs

import httpx
import pytest
import trio

from auth.conftest import StaticSource
from kvfs.auth.flows import (
    AssertionCredential,
    ClientSecretCredential,
    ImdsCredential,
    NmiCredential,
)
from kvfs.errors import AuthError, ConfigError
from kvfs.net.retry import ENTRA_RETRY

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
AUTHORITY = "https://login.microsoftonline.com"
SCOPE = "https://vault.azure.net/.default"
ACCESS_TOKEN = "eyJ0eXAiOiJKV1QifQ.eyJhdWQiOiJodHRwczovL3ZhdWx0LmF6dXJlLm5ldCJ9.c2lnbmF0dXJl"
SECRET = "Xy8Q~super.secret-value_123"
ONE_ATTEMPT = dataclasses.replace(ENTRA_RETRY, max_attempts=1)


def client(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def form_of(request: httpx.Request) -> dict[str, str]:
    parsed = parse_qs(request.content.decode(), keep_blank_values=True, strict_parsing=True)
    assert all(len(v) == 1 for v in parsed.values()), parsed
    return {k: v[0] for k, v in parsed.items()}


def entra_ok(expires_in: int = 3599) -> httpx.Response:
    return httpx.Response(
        200,
        json={"token_type": "Bearer", "expires_in": expires_in, "ext_expires_in": expires_in,
              "access_token": ACCESS_TOKEN},
        headers={"Cache-Control": "no-store, no-cache"},
    )


@pytest.mark.parametrize("client_id", [CLIENT_ID, "aaaaaaaa-0000-0000-0000-user-assigned"])
async def test_assertion_request_shape(autojump_clock, sa_token, client_id: str) -> None:
    """App registration and user-assigned managed identity client ids use the same flow."""
    assertion = sa_token()
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        assert request.method == "POST"
        assert str(request.url) == f"{AUTHORITY}/{TENANT}/oauth2/v2.0/token"
        assert request.headers["content-type"] == "application/x-www-form-urlencoded"
        assert "authorization" not in request.headers
        assert form_of(request) == {
            "client_assertion": assertion,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_id": client_id,
            "grant_type": "client_credentials",
            "scope": SCOPE,
        }
        return entra_ok(3599)

    async with client(handler) as http:
        cred = AssertionCredential(AUTHORITY + "/", TENANT, client_id, StaticSource(assertion), http)
        start = trio.current_time()
        token = await cred.get_token(SCOPE)
    assert token.token == ACCESS_TOKEN
    assert token.expires_at == pytest.approx(start + 3599)
    assert len(seen) == 1
    assert ACCESS_TOKEN not in repr(token) and assertion not in repr(cred)


async def test_assertion_reads_source_each_exchange(autojump_clock, sa_token) -> None:
    tokens = [sa_token(sub="system:serviceaccount:a:one"), sa_token(sub="system:serviceaccount:a:two")]
    sent: list[str] = []

    class Rotating:
        async def get(self) -> str:
            return tokens[len(sent)]

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(form_of(request)["client_assertion"])
        return entra_ok()

    async with client(handler) as http:
        cred = AssertionCredential(AUTHORITY, TENANT, CLIENT_ID, Rotating(), http)
        await cred.get_token(SCOPE)
        await cred.get_token(SCOPE)
    assert sent == tokens


async def test_client_secret_request_shape(autojump_clock) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.method == "POST"
        assert str(request.url) == f"https://login.chinacloudapi.cn/{TENANT}/oauth2/v2.0/token"
        assert request.headers["content-type"] == "application/x-www-form-urlencoded"
        assert form_of(request) == {
            "client_id": CLIENT_ID,
            "client_secret": SECRET,
            "grant_type": "client_credentials",
            "scope": "https://vault.azure.cn/.default",
        }
        return entra_ok(86399)

    async with client(handler) as http:
        cred = ClientSecretCredential("https://login.chinacloudapi.cn", TENANT, CLIENT_ID, SECRET, http)
        token = await cred.get_token("https://vault.azure.cn/.default")
    assert token.token == ACCESS_TOKEN
    assert token.expires_at == pytest.approx(trio.current_time() + 86399)
    assert SECRET not in repr(cred)


async def test_entra_accepts_expires_on_and_rejects_missing_fields(autojump_clock) -> None:
    answers = [
        httpx.Response(200, json={"access_token": ACCESS_TOKEN, "expires_on": int(time.time()) + 600}),
        httpx.Response(200, json={"access_token": ACCESS_TOKEN}),
        httpx.Response(200, text="<html>proxy login page</html>"),
    ]

    async with client(lambda r: answers.pop(0)) as http:
        cred = ClientSecretCredential(AUTHORITY, TENANT, CLIENT_ID, SECRET, http)
        token = await cred.get_token(SCOPE)
        assert token.expires_at == pytest.approx(trio.current_time() + 600, abs=2)
        for _ in range(2):
            with pytest.raises(AuthError) as exc:
                await cred.get_token(SCOPE)
            assert exc.value.code == "entra_bad_response" and exc.value.errno == errno.EIO


def test_entra_flows_refuse_plain_http_and_missing_ids() -> None:
    http = httpx.AsyncClient()
    with pytest.raises(ConfigError, match="https"):
        ClientSecretCredential("http://login.example", TENANT, CLIENT_ID, SECRET, http)
    with pytest.raises(ConfigError, match="tenantID"):
        ClientSecretCredential(AUTHORITY, "", CLIENT_ID, SECRET, http)
    with pytest.raises(ConfigError, match="clientID"):
        AssertionCredential(AUTHORITY, TENANT, "", StaticSource("x"), http)
    with pytest.raises(ConfigError) as exc:
        ClientSecretCredential(AUTHORITY, TENANT, CLIENT_ID, "", http)
    assert "clientsecret" in str(exc.value)


async def test_entra_retries_503_then_succeeds(autojump_clock) -> None:
    statuses = [503, 429, 200]
    calls: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(trio.current_time())
        status = statuses.pop(0)
        if status == 200:
            return entra_ok()
        return httpx.Response(status, headers={"Retry-After": "3"} if status == 429 else {})

    async with client(handler) as http:
        cred = ClientSecretCredential(AUTHORITY, TENANT, CLIENT_ID, SECRET, http)
        await cred.get_token(SCOPE)
    assert len(calls) == 3
    assert calls[1] - calls[0] == pytest.approx(1.0)  # backoff
    assert calls[2] - calls[1] == pytest.approx(3.0)  # Retry-After honoured


async def test_entra_400_is_not_retried(autojump_clock, entra_body) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(400, json=entra_body(90002, "invalid_request", f"Tenant '{TENANT}' not found."))

    async with client(handler) as http:
        cred = ClientSecretCredential(AUTHORITY, TENANT, CLIENT_ID, SECRET, http)
        with pytest.raises(AuthError) as exc:
            await cred.get_token(SCOPE)
    assert calls == 1
    assert exc.value.code == "AADSTS90002" and exc.value.errno == errno.EACCES


async def test_entra_unreachable_is_eio(autojump_clock) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with client(handler) as http:
        cred = ClientSecretCredential(AUTHORITY, TENANT, CLIENT_ID, SECRET, http)
        with pytest.raises(AuthError) as exc:
            await cred.get_token(SCOPE)
    assert exc.value.errno == errno.EIO and exc.value.code == "entra_unreachable"
    assert "login.microsoftonline.com" in str(exc.value)


async def test_entra_timeout_is_eio(autojump_clock) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    async with client(handler) as http:
        cred = ClientSecretCredential(AUTHORITY, TENANT, CLIENT_ID, SECRET, http, retry=ONE_ATTEMPT)
        with pytest.raises(AuthError) as exc:
            await cred.get_token(SCOPE)
    assert exc.value.errno == errno.EIO and exc.value.code == "entra_timeout"


# ---------------------------------------------------------------- IMDS


def imds_ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={
        "access_token": ACCESS_TOKEN, "refresh_token": "", "expires_in": "3599",
        "expires_on": str(int(time.time()) + 3599), "not_before": str(int(time.time())),
        "resource": "https://vault.azure.net", "token_type": "Bearer",
    })


@pytest.mark.parametrize("client_id", [None, "aaaaaaaa-0000-0000-0000-000000000001"])
async def test_imds_request_shape(autojump_clock, monkeypatch, client_id: str | None) -> None:
    monkeypatch.delenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", raising=False)

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.method == "GET"
        assert request.url.scheme == "http" and request.url.host == "169.254.169.254"
        assert request.url.path == "/metadata/identity/oauth2/token"
        expected = {"api-version": ["2018-02-01"], "resource": ["https://vault.azure.net"]}
        if client_id:
            expected["client_id"] = [client_id]
        assert parse_qs(request.url.query.decode()) == expected
        assert request.headers["Metadata"] == "true"
        return imds_ok(request)

    async with client(handler) as http:
        token = await ImdsCredential(client_id, http).get_token(SCOPE)
    assert token.token == ACCESS_TOKEN
    assert token.expires_at == pytest.approx(trio.current_time() + 3599)


async def test_imds_base_url_from_env(autojump_clock, monkeypatch) -> None:
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", "http://127.0.0.1:8123/")
    urls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        urls.append(f"{request.url.scheme}://{request.url.host}:{request.url.port}{request.url.path}")
        return imds_ok(request)

    async with client(handler) as http:
        await ImdsCredential(None, http).get_token(SCOPE)
    assert urls == ["http://127.0.0.1:8123/metadata/identity/oauth2/token"]


async def test_imds_expires_on_only(autojump_clock) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"access_token": ACCESS_TOKEN,
                                         "expires_on": str(int(time.time()) + 1200)})

    async with client(handler) as http:
        token = await ImdsCredential(None, http, base_url="http://imds").get_token(SCOPE)
    assert token.expires_at == pytest.approx(trio.current_time() + 1200, abs=2)


@pytest.mark.parametrize("status", [404, 410, 429, 500, 503])
async def test_imds_retries_transient_then_succeeds(autojump_clock, status: int) -> None:
    times: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        times.append(trio.current_time())
        if len(times) <= 3:
            return httpx.Response(status, json={"error": "unavailable", "error_description": "updating"})
        return imds_ok(request)

    async with client(handler) as http:
        token = await ImdsCredential(None, http, base_url="http://imds").get_token(SCOPE)
    assert token.token == ACCESS_TOKEN
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps == pytest.approx([0.8, 1.6, 3.2])  # exponential backoff


async def test_imds_gives_up_within_budget(autojump_clock) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(503, text="busy")

    async with client(handler) as http:
        start = trio.current_time()
        with pytest.raises(AuthError) as exc:
            await ImdsCredential(None, http, base_url="http://imds").get_token(SCOPE)
    # waits 0.8 + 1.6 + 3.2 + 6.4 s; the next 12.8 s would break the 20 s retry budget
    assert calls == 5
    assert trio.current_time() - start == pytest.approx(12.0)
    assert exc.value.code == "imds_503" and exc.value.errno == errno.EIO


@pytest.mark.parametrize("status", [400, 401, 403])
async def test_imds_no_retry_on_other_4xx(autojump_clock, status: int) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(status, json={"error": "invalid_resource",
                                            "error_description": "AADSTS50001: resource not registered"})

    async with client(handler) as http:
        with pytest.raises(AuthError) as exc:
            await ImdsCredential(None, http, base_url="http://imds").get_token(SCOPE)
    assert calls == 1
    assert exc.value.errno == errno.EACCES
    assert "invalid_resource" in str(exc.value)


async def test_imds_unreachable_asks_if_vm(autojump_clock) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("no route to host", request=request)

    async with client(handler) as http:
        with pytest.raises(AuthError) as exc:
            await ImdsCredential(None, http, base_url="http://169.254.169.254").get_token(SCOPE)
    assert "is this a VM/VMSS with a managed identity?" in str(exc.value)
    assert exc.value.errno == errno.EIO and exc.value.code == "imds_unreachable"


async def test_imds_owns_proxy_free_client_when_none_given(monkeypatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    cred = ImdsCredential(None, None, base_url="http://imds")
    assert cred._http.trust_env is False  # never through a proxy
    await cred.aclose()
    assert cred._http.is_closed


# ---------------------------------------------------------------- NMI


async def test_nmi_request_shape(autojump_clock, monkeypatch) -> None:
    monkeypatch.delenv("KVFS_NMI_URL", raising=False)
    expires_on = int(time.time()) + 3000

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.method == "GET"
        assert str(request.url) == "http://localhost:2579/host/token/?resource=https://vault.azure.net"
        assert request.headers["podname"] == "web-0"
        assert request.headers["podns"] == "shop"
        return httpx.Response(200, json={
            "token": {"access_token": ACCESS_TOKEN, "expires_on": str(expires_on),
                      "token_type": "Bearer", "resource": "https://vault.azure.net"},
            "clientid": CLIENT_ID,
        })

    async with client(handler) as http:
        token = await NmiCredential("web-0", "shop", http).get_token(SCOPE)
    assert token.token == ACCESS_TOKEN
    assert token.expires_at == pytest.approx(trio.current_time() + 3000, abs=2)


async def test_nmi_url_from_env_and_errors(autojump_clock, monkeypatch) -> None:
    monkeypatch.setenv("KVFS_NMI_URL", "http://127.0.0.1:9999")
    answers = [
        httpx.Response(403, text="no AzureAssignedIdentity found for pod:shop/web-0 in assigned state\n"),
        httpx.Response(200, json={"token": {"access_token": ACCESS_TOKEN, "expires_on": "1"}}),
        httpx.Response(502, text="bad gateway"),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.host == "127.0.0.1" and request.url.port == 9999
        return answers.pop(0)

    async with client(handler) as http:
        cred = NmiCredential("web-0", "shop", http)
        with pytest.raises(AuthError) as exc:
            await cred.get_token(SCOPE)
        assert str(exc.value).startswith("nmi response failed with status code: 403, response body: "
                                          "no AzureAssignedIdentity found for pod:shop/web-0")
        assert exc.value.errno == errno.EACCES and exc.value.code == "nmi_403"
        with pytest.raises(AuthError) as exc:
            await cred.get_token(SCOPE)
        assert "nmi did not return expected values in response: token and clientid" in str(exc.value)
        with pytest.raises(AuthError) as exc:
            await cred.get_token(SCOPE)
        assert exc.value.errno == errno.EIO


async def test_nmi_requires_pod_info() -> None:
    with pytest.raises(ConfigError, match="podInfoOnMount"):
        NmiCredential("", "shop", httpx.AsyncClient())


# ---------------------------------------------------------------- secrecy


async def test_no_secret_material_in_errors_or_logs(autojump_clock, sa_token, entra_body, caplog) -> None:
    """Even when Entra echoes our inputs back, no assertion/secret/access token leaks."""
    caplog.set_level(logging.DEBUG)
    assertion = sa_token()

    def echo(request: httpx.Request) -> httpx.Response:
        form = form_of(request)
        echoed = form.get("client_assertion") or form.get("client_secret")
        body = entra_body(50000, "invalid_request", f"weird echo {echoed} and {ACCESS_TOKEN}")
        body["error_codes"] = [50000]
        return httpx.Response(400, json=body)

    errors: list[AuthError] = []
    async with client(echo) as http:
        for cred in (
            AssertionCredential(AUTHORITY, TENANT, CLIENT_ID, StaticSource(assertion), http),
            ClientSecretCredential(AUTHORITY, TENANT, CLIENT_ID, SECRET, http),
        ):
            with pytest.raises(AuthError) as exc:
                await cred.get_token(SCOPE)
            errors.append(exc.value)
    async with client(lambda r: entra_ok()) as http:
        await ClientSecretCredential(AUTHORITY, TENANT, CLIENT_ID, SECRET, http).get_token(SCOPE)
        await AssertionCredential(AUTHORITY, TENANT, CLIENT_ID, StaticSource(assertion), http).get_token(SCOPE)
    texts = [str(e) for e in errors] + [repr(e) for e in errors] + [r.getMessage() for r in caplog.records]
    assert errors and all("AADSTS50000" in str(e) for e in errors)
    for text in texts:
        for material in (assertion, SECRET, ACCESS_TOKEN, assertion.split(".")[2]):
            assert material not in text, text
    assert json.dumps(texts)  # all plain strings
