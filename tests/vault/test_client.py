"""VaultClient with httpx.MockTransport and MockClock: exact requests, 401 handling, errors, paging."""

from __future__ import annotations

import email.utils
import errno
import json
import logging
import random
from collections.abc import Awaitable, Callable

import httpx
import pytest
import trio

import kvfs
from kvfs.auth.base import AccessToken
from kvfs.errors import ConfigError, VaultError
from kvfs.vault.client import MAX_PAGES, VaultClient, challenge_tenant
from kvfs.net.http import make_http_client
from kvfs.net.retry import RetryPolicy

VAULT = "https://demo.vault.azure.net/"
SCOPE = "https://vault.azure.net/.default"
TENANT = "11111111-1111-1111-1111-111111111111"
OTHER_TENANT = "22222222-2222-2222-2222-222222222222"
VER = "0123456789abcdef0123456789abcdef"
SECRET_VALUE = "hunter2-super-secret"

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


class FakeCredential:
    """Hands out tok-1, tok-2, …: a new token only after invalidate() (like a caching credential)."""

    def __init__(self) -> None:
        self.generation = 1
        self.calls = 0
        self.invalidations = 0

    @property
    def token(self) -> str:
        return f"tok-{self.generation}-eyJhbGciOi.secret"

    async def get_token(self, scope: str) -> AccessToken:
        assert scope == SCOPE
        self.calls += 1
        return AccessToken(self.token, expires_at=1e9)

    def invalidate(self, scope: str) -> None:
        self.invalidations += 1
        self.generation += 1

    async def aclose(self) -> None:
        return None


def secret_bundle(name: str = "db", version: str = VER) -> dict:
    return {
        "value": SECRET_VALUE,
        "id": f"https://demo.vault.azure.net/secrets/{name}/{version}",
        "attributes": {"enabled": True, "created": 1, "updated": 1},
    }


def kv_error(status: int, code: str, message: str, inner: str = "", **headers: str) -> httpx.Response:
    err: dict = {"code": code, "message": message}
    if inner:
        err["innererror"] = {"code": inner}
    return httpx.Response(status, json={"error": err}, headers=headers)


class Recorder:
    """Mock transport that records requests and answers from a script of responses/callables."""

    def __init__(self, *answers: httpx.Response | Exception | Handler) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return await answer(request)
        return answer


def make_client(
    recorder: Recorder, cred: FakeCredential | None = None, **kwargs: object
) -> tuple[VaultClient, FakeCredential]:
    cred = cred or FakeCredential()
    http = make_http_client(transport=httpx.MockTransport(recorder))
    kwargs.setdefault("tenant_id", TENANT)
    kwargs.setdefault("retry", RetryPolicy(rng=random.Random(7)))
    return VaultClient(VAULT, cred, SCOPE, http, **kwargs), cred  # type: ignore[arg-type]


# -- request shape ----------------------------------------------------------------------------


async def test_get_secret_exact_request_with_bearer_on_first_request() -> None:
    rec = Recorder(httpx.Response(200, json=secret_bundle()))
    client, cred = make_client(rec)
    bundle = await client.get("secret", "db")
    assert bundle["value"] == SECRET_VALUE
    (req,) = rec.requests
    assert req.method == "GET"
    assert str(req.url) == "https://demo.vault.azure.net/secrets/db?api-version=7.4"
    assert req.headers["authorization"] == f"Bearer {cred.token}"
    assert req.headers["user-agent"] == f"kvfs/{kvfs.__version__}"
    assert req.headers["accept"] == "application/json"
    assert client.request_counts == {"get_secret": 1}


@pytest.mark.parametrize(
    ("kind", "path", "route"),
    [
        ("secret", "secrets", "get_secret"),
        ("key", "keys", "get_key"),
        ("cert", "certificates", "get_certificate"),
    ],
)
async def test_versioned_routes(kind: str, path: str, route: str) -> None:
    rec = Recorder(httpx.Response(200, json={"id": "x"}))
    client, _ = make_client(rec, api_version="7.6")
    await client.get(kind, "My-Object-1", VER)  # type: ignore[arg-type]
    assert (
        str(rec.requests[0].url) == f"https://demo.vault.azure.net/{path}/My-Object-1/{VER}?api-version=7.6"
    )
    assert client.request_counts[route] == 1


@pytest.mark.parametrize(
    ("name", "version", "path"),
    [
        ("a/b", "", "/secrets/a%2Fb"),
        ("../x", "", "/secrets/%2E%2E%2Fx"),
        ("..", "", "/secrets/%2E%2E"),
        ("db", "..", "/secrets/db/%2E%2E"),
        ("db?x=1#f", "1/2", "/secrets/db%3Fx%3D1%23f/1%2F2"),
        ("db%2F", "", "/secrets/db%252F"),
    ],
)
async def test_every_path_segment_is_percent_encoded(name: str, version: str, path: str) -> None:
    """Names are validated by the configuration; at the URL boundary, no name can change what the
    URL addresses (no other path, no query, no fragment)."""
    rec = Recorder(httpx.Response(404, json={"error": {"code": "SecretNotFound", "message": "x"}}))
    client, _ = make_client(rec)
    with pytest.raises(VaultError):
        await client.get("secret", name, version)
    (request,) = rec.requests
    assert request.url.raw_path == path.encode() + b"?api-version=7.4"
    assert request.url.host == "demo.vault.azure.net"


def test_vault_url_must_be_https() -> None:
    with pytest.raises(ConfigError):
        VaultClient("http://demo.vault.azure.net/", FakeCredential(), SCOPE, make_http_client())


# -- 401 challenge ----------------------------------------------------------------------------


def challenge(tenant: str) -> httpx.Response:
    return kv_error(
        401,
        "Unauthorized",
        "AKV10032: Invalid issuer.",
        **{
            "WWW-Authenticate": f'Bearer authorization="https://login.windows.net/{tenant}",'
            ' resource="https://vault.azure.net"'
        },
    )


def test_challenge_tenant_parsing() -> None:
    assert (
        challenge_tenant(f'Bearer authorization="https://login.microsoftonline.com/{TENANT}", resource="x"')
        == TENANT
    )
    assert challenge_tenant(f"Bearer authorization_uri=https://login.windows.net/{TENANT}/oauth2") == TENANT
    assert challenge_tenant('Bearer resource="https://vault.azure.net"') == ""
    # Private clouds may serve the authority under a path; AD FS ends in /adfs.
    assert challenge_tenant(f'Bearer authorization="https://localhost:8443/aad/{TENANT}"') == TENANT
    assert challenge_tenant('Bearer authorization="https://adfs.contoso.local/adfs"') == "adfs"


async def test_401_from_other_tenant_names_both_tenants_and_the_fix() -> None:
    rec = Recorder(challenge(OTHER_TENANT))
    client, cred = make_client(rec)
    with pytest.raises(VaultError) as caught:
        await client.get("secret", "db")
    err = caught.value
    assert err.status == 401 and err.errno == errno.EACCES
    assert OTHER_TENANT in str(err) and TENANT in str(err) and "tenantID" in str(err)
    assert len(rec.requests) == 1 and cred.invalidations == 0


async def test_401_same_tenant_refreshes_token_once_and_retries() -> None:
    rec = Recorder(challenge(TENANT), httpx.Response(200, json=secret_bundle()))
    client, cred = make_client(rec)
    assert (await client.get("secret", "db"))["value"] == SECRET_VALUE
    assert cred.invalidations == 1
    assert [r.headers["authorization"] for r in rec.requests] == [
        "Bearer tok-1-eyJhbGciOi.secret",
        "Bearer tok-2-eyJhbGciOi.secret",
    ]


async def test_second_401_is_eacces_without_a_loop(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    rec = Recorder(challenge(TENANT))
    client, cred = make_client(rec)
    with pytest.raises(VaultError) as caught:
        await client.get("secret", "db")
    assert caught.value.errno == errno.EACCES
    assert len(rec.requests) == 2 and cred.invalidations == 1
    for text in [str(caught.value), repr(caught.value), caplog.text, repr(client)]:
        assert "tok-" not in text and "eyJ" not in text


# -- error envelope ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "status", "code", "inner", "err_no", "must_mention"),
    [
        (
            kv_error(404, "SecretNotFound", "A secret with (name/id) db was not found"),
            404,
            "SecretNotFound",
            "",
            errno.ENOENT,
            "db",
        ),
        (
            kv_error(404, "VaultNotFound", "No vault named 'demo' is served by this emulator."),
            404,
            "VaultNotFound",
            "",
            errno.ENOENT,
            "does not exist (VaultNotFound; check keyvaultName)",
        ),
        (
            kv_error(
                403, "Forbidden", "Operation get is not allowed on a disabled secret.", "SecretDisabled"
            ),
            403,
            "Forbidden",
            "SecretDisabled",
            errno.EACCES,
            "enable",
        ),
        (
            kv_error(403, "Forbidden", "Caller is not authorized", "ForbiddenByRbac"),
            403,
            "Forbidden",
            "ForbiddenByRbac",
            errno.EACCES,
            "Key Vault Secrets User",
        ),
        (
            kv_error(403, "Forbidden", "does not have secrets get permission", "AccessDenied"),
            403,
            "Forbidden",
            "AccessDenied",
            errno.EACCES,
            "access policy",
        ),
        (
            kv_error(403, "Forbidden", "Client address is not authorized", "ForbiddenByFirewall"),
            403,
            "Forbidden",
            "ForbiddenByFirewall",
            errno.EACCES,
            "firewall",
        ),
        (
            kv_error(400, "BadParameter", "The specified version (9.9) is not recognized."),
            400,
            "BadParameter",
            "",
            errno.EIO,
            "9.9",
        ),
    ],
)
async def test_error_envelope_maps_to_vault_error(
    response: httpx.Response,
    status: int,
    code: str,
    inner: str,
    err_no: int,
    must_mention: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    rec = Recorder(response)
    client, _ = make_client(rec)
    with pytest.raises(VaultError) as caught:
        await client.get("secret", "db")
    err = caught.value
    assert (err.status, err.code, err.inner_code, err.errno) == (status, code, inner, err_no)
    assert must_mention in str(err) and "'db'" in str(err)
    assert len(rec.requests) == 1  # 4xx are not retried
    assert "tok-" not in str(err) + caplog.text
    assert any("demo.vault.azure.net" in r.getMessage() and code in r.getMessage() for r in caplog.records)


async def test_secret_value_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client, _ = make_client(Recorder(httpx.Response(200, json=secret_bundle())))
    await client.get("secret", "db")
    assert SECRET_VALUE not in caplog.text and "tok-" not in caplog.text


# -- retries ----------------------------------------------------------------------------------


async def test_retry_after_seconds(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder(
        kv_error(429, "Throttled", "too many", **{"Retry-After": "3"}),
        httpx.Response(200, json=secret_bundle()),
    )
    client, _ = make_client(rec)
    start = trio.current_time()
    await client.get("secret", "db")
    assert trio.current_time() - start == pytest.approx(3.0)
    assert client.request_counts["get_secret"] == 2
    assert all(r.headers["authorization"].startswith("Bearer ") for r in rec.requests)


async def test_retry_after_http_date(autojump_clock: trio.testing.MockClock) -> None:
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 5, usegmt=True)
    rec = Recorder(
        kv_error(503, "ServiceUnavailable", "busy", **{"Retry-After": date}),
        httpx.Response(200, json=secret_bundle()),
    )
    client, _ = make_client(rec, retry=RetryPolicy(wallclock=lambda: now))
    start = trio.current_time()
    await client.get("secret", "db")
    assert trio.current_time() - start == pytest.approx(5.0)


async def test_429_without_retry_after_backs_off_and_succeeds(autojump_clock: trio.testing.MockClock) -> None:
    throttled = kv_error(429, "Throttled", "Reason: VaultRequestTypeLimitReached")
    rec = Recorder(throttled, throttled, throttled, httpx.Response(200, json=secret_bundle()))
    client, _ = make_client(rec)
    start = trio.current_time()
    assert (await client.get("secret", "db"))["value"] == SECRET_VALUE
    elapsed = trio.current_time() - start
    assert len(rec.requests) == 4
    assert 0 < elapsed <= 0.8 + 1.6 + 3.2


async def test_throttling_until_deadline_is_eio_within_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rec = Recorder(kv_error(429, "Throttled", "too many", **{"Retry-After": "4"}))
    client, _ = make_client(rec, retry=RetryPolicy(deadline=25.0, max_attempts=100))
    start = trio.current_time()
    with pytest.raises(VaultError) as caught:
        await client.get("secret", "db")
    assert trio.current_time() - start <= 25.0
    assert caught.value.errno == errno.EIO and caught.value.status == 429
    assert caught.value.retry_after == pytest.approx(4.0)
    assert len(rec.requests) == 7  # t = 0, 4, …, 24 (24 + 1 s fits); t = 28 would pass 25


async def test_hanging_vault_answers_eio_at_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError

    client, _ = make_client(Recorder(hang), deadline=25.0)
    start = trio.current_time()
    with pytest.raises(VaultError) as caught:
        await client.get("secret", "db")
    assert trio.current_time() - start == pytest.approx(25.0)
    assert caught.value.errno == errno.EIO and caught.value.code == "Timeout"


async def test_dropped_connections_are_retried(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder(
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.ReadTimeout("timed out"),
        httpx.Response(200, json=secret_bundle()),
    )
    client, _ = make_client(rec)
    assert (await client.get("secret", "db"))["value"] == SECRET_VALUE
    assert len(rec.requests) == 3


async def test_unreachable_vault_is_eio_naming_the_vault(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder(httpx.ConnectError("[Errno 111] Connection refused"))
    client, _ = make_client(rec, retry=RetryPolicy(max_attempts=3))
    with pytest.raises(VaultError) as caught:
        await client.get("secret", "db")
    err = caught.value
    assert err.status == 0 and err.errno == errno.EIO and err.code == "ConnectError"
    assert "demo.vault.azure.net" in str(err)
    assert len(rec.requests) == 3


async def test_debug_logs_one_line_per_request_without_query_headers_or_body(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kvfs.vault.client")
    rec = Recorder(
        httpx.ConnectError("[Errno 111] Connection refused"),
        kv_error(503, "ServiceUnavailable", "busy"),
        httpx.Response(200, json=secret_bundle()),
        httpx.Response(200, json={"value": [], "nextLink": None}),
    )
    client, cred = make_client(rec)
    await client.get("secret", "db")
    await client.list_versions("secret", "db")  # a query of its own: maxresults
    lines = [r for r in caplog.records if r.name == "kvfs.vault.client" and r.getMessage().startswith("GET ")]
    assert len(lines) == len(rec.requests) == 4
    outcomes = [getattr(r, "status", None) or getattr(r, "code") for r in lines]
    assert outcomes == ["ConnectError", 503, 200, 200]
    assert [r.path for r in lines] == ["/secrets/db"] * 3 + ["/secrets/db/versions"]  # type: ignore[attr-defined]
    assert all(r.method == "GET" and r.duration_ms >= 0 for r in lines)  # type: ignore[attr-defined]
    assert lines[1].getMessage().startswith("GET /secrets/db -> 503 (")
    everything = caplog.text + repr([r.__dict__ for r in lines])
    assert "api-version" not in everything and "maxresults" not in everything
    assert cred.token not in everything and SECRET_VALUE not in everything


# -- paging -----------------------------------------------------------------------------------


def item(version: str, created: int) -> dict:
    return {
        "id": f"https://demo.vault.azure.net/secrets/db/{version}",
        "attributes": {"enabled": True, "created": created},
    }


async def test_paging_through_empty_pages_and_443_links() -> None:
    pages = {
        None: {
            "value": [item("a" * 32, 1)],
            "nextLink": "https://demo.vault.azure.net:443/secrets/db/versions?api-version=7.2&$skiptoken=T1&maxresults=25",
        },
        "T1": {
            "value": [],
            "nextLink": "https://DEMO.vault.azure.net/secrets/db/versions?api-version=7.2&$skiptoken=T2&maxresults=25",
        },
        "T2": {
            "value": [item("b" * 32, 2)],
            "nextLink": "https://demo.vault.azure.net:443/secrets/db/versions?$skiptoken=T3",
        },
        "T3": {"value": [item("c" * 32, 3)], "nextLink": None},
    }

    async def serve(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=pages[request.url.params.get("$skiptoken")])

    rec = Recorder(serve)
    client, cred = make_client(rec)
    items = await client.list_versions("secret", "db")
    assert [i["id"][-1] for i in items] == ["a", "b", "c"]
    first = rec.requests[0].url
    assert (first.path, dict(first.params)) == (
        "/secrets/db/versions",
        {"api-version": "7.4", "maxresults": "25"},
    )
    assert [r.url.params.get("api-version") for r in rec.requests] == ["7.4"] * 4
    assert all(r.headers["authorization"] == f"Bearer {cred.token}" for r in rec.requests)
    assert client.request_counts == {"list_secret_versions": 4}


@pytest.mark.parametrize("last", [{"nextLink": ""}, {}, {"nextLink": None}])
async def test_paging_end_markers(last: dict) -> None:
    rec = Recorder(httpx.Response(200, json={"value": [item("a" * 32, 1)], **last}))
    client, _ = make_client(rec)
    assert len(await client.list_versions("key", "db")) == 1
    assert rec.requests[0].url.path == "/keys/db/versions"
    assert client.request_counts == {"list_key_versions": 1}


@pytest.mark.parametrize(
    "link",
    [
        "https://evil.example.com/secrets/db/versions?$skiptoken=T1",
        "https://demo.vault.azure.net:8443/secrets/db/versions?$skiptoken=T1",
        "http://demo.vault.azure.net/secrets/db/versions?$skiptoken=T1",
        "https://demo.vault.azure.net.evil.com/secrets?$skiptoken=T1",
    ],
)
async def test_foreign_next_link_is_refused(link: str) -> None:
    rec = Recorder(httpx.Response(200, json={"value": [item("a" * 32, 1)], "nextLink": link}))
    client, _ = make_client(rec)
    with pytest.raises(VaultError) as caught:
        await client.list_versions("cert", "db")
    assert caught.value.code == "ForeignNextLink"
    assert len(rec.requests) == 1  # the token went nowhere else
    assert rec.requests[0].url.path == "/certificates/db/versions"


async def test_repeating_next_link_stops() -> None:
    link = "https://demo.vault.azure.net/secrets/db/versions?$skiptoken=SAME"
    rec = Recorder(httpx.Response(200, json={"value": [], "nextLink": link}))
    client, _ = make_client(rec)
    with pytest.raises(VaultError) as caught:
        await client.list_versions("secret", "db")
    assert len(rec.requests) == 2
    assert caught.value.code == "PagingLoop" and "nextLink repeats" in str(caught.value)


async def test_endless_next_links_stop_after_the_page_cap() -> None:
    """A vault answering a fresh nextLink forever gets MAX_PAGES requests, not a request loop."""

    async def serve(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params.get("$skiptoken", "0")) + 1
        link = f"https://demo.vault.azure.net/secrets/db/versions?$skiptoken={page}"
        return httpx.Response(200, json={"value": [item(f"{page:032x}", page)], "nextLink": link})

    rec = Recorder(serve)
    client, _ = make_client(rec)
    with pytest.raises(VaultError) as caught:
        await client.list_versions("secret", "db")
    assert caught.value.code == "PagingLoop" and f"over {MAX_PAGES} pages" in str(caught.value)
    assert len(rec.requests) == MAX_PAGES


async def test_invalid_json_body_is_eio() -> None:
    client, _ = make_client(Recorder(httpx.Response(200, content=b"<html>proxy</html>")))
    with pytest.raises(VaultError) as caught:
        await client.get("secret", "db")
    assert caught.value.errno == errno.EIO
    assert json.dumps(SECRET_VALUE) not in str(caught.value)
