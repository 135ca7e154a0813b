"""The identity preflight's verdicts, over the real token cache and host circuits, with faked networks.

What each failure class becomes (a refusal with its gRPC code, or a transient miss that lets the
mount go ahead) is checked here; tests/e2e/test_preflight.py and tests/csi/test_operability.py
show the messages reaching `kvfs mount`'s stderr and the gRPC status through real processes.
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Callable

import httpx
import pytest
import trio

from kvfs.auth.base import AccessToken
from kvfs.auth.cache import CachingCredential
from kvfs.auth.flows import ClientSecretCredential
from kvfs.daemon.preflight import (
    ENDPOINT,
    IDENTITY,
    PreflightError,
    Refusal,
    check_volume,
    name_not_found,
    parse_refusal,
    ready_line,
)
from kvfs.errors import AuthError
from kvfs.net.circuit import CircuitTransport

SCOPE = "https://vault.azure.net/.default"
VAULT = "https://kv-demo.vault.azure.net/"
TOKEN = "eyJ0eXAiOiJKV1QifQ.eyJzdWIiOiJ4In0.c2ln"


class Flow:
    """A token flow that answers from a script: each call takes the next item (a token or an error)."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def get_token(self, scope: str) -> AccessToken:
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if answer == "hang":
            await trio.sleep_forever()
        if isinstance(answer, Exception):
            raise answer
        return AccessToken(TOKEN, trio.current_time() + 3600)

    async def aclose(self) -> None:
        pass


def vault_http(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.AsyncClient:
    """The daemon's client shape: every request passes its host's circuit."""
    return httpx.AsyncClient(transport=CircuitTransport(httpx.MockTransport(handler)))


def answers(status: int = 401) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        assert (request.method, request.url.path, request.url.query) == ("GET", "/", b"")
        assert "authorization" not in request.headers  # no token is sent, no object asked for
        return httpx.Response(status, json={"error": {"code": "Unauthorized"}})

    return handler


def raises(exc: Exception, cause: BaseException) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc from cause

    return handler


def refused_identity(code: str = "AADSTS70021") -> AuthError:
    return AuthError(f"Entra ID found no federated identity credential ... Fix: create one ({code} said so)", code=code)


async def test_a_good_identity_passes_and_its_token_serves_the_first_read(autojump_clock: trio.abc.Clock) -> None:
    flow = Flow("token")
    credential = CachingCredential(flow)
    async with vault_http(answers(401)) as http:
        assert await check_volume(credential, SCOPE, VAULT, http) is None
    await credential.get_token(SCOPE)
    assert flow.calls == 1  # the read after the mount exchanges nothing


@pytest.mark.parametrize("code", ["AADSTS70021", "AADSTS700016", "AADSTS90002", "AADSTS7000215", "imds_identity_not_found"])
async def test_a_refused_identity_is_permission_denied_with_the_code_and_the_message(
    autojump_clock: trio.abc.Clock, code: str
) -> None:
    credential = CachingCredential(Flow(refused_identity(code)))
    async with vault_http(answers()) as http:
        refusal = await check_volume(credential, SCOPE, VAULT, http)
    assert refusal is not None
    assert (refusal.grpc_code, refusal.code) == (IDENTITY, code)
    assert f"({code})" in refusal.message and "Fix: create one" in refusal.message


@pytest.mark.parametrize(
    "error",
    [
        AuthError("timed out waiting for Entra ID", code="entra_timeout", errno=errno.EIO),
        AuthError("Entra ID refused ... (HTTP 503, AADSTS90033)", code="AADSTS90033", errno=errno.EIO),
        AuthError("cannot reach Entra ID (HostUnreachable: ...)", code="entra_unreachable", errno=errno.EIO),
        AuthError("IMDS is unavailable (HTTP 500)", code="imds_500", errno=errno.EIO),
        "hang",
    ],
    ids=["timeout", "5xx", "refused-connection", "imds-5xx", "no-answer"],
)
async def test_a_transient_failure_mounts_anyway_and_is_not_remembered(
    autojump_clock: trio.abc.Clock, error: object, caplog: pytest.LogCaptureFixture
) -> None:
    flow = Flow(error, "token")
    credential = CachingCredential(flow)
    async with vault_http(answers()) as http:
        started = trio.current_time()
        assert await check_volume(credential, SCOPE, VAULT, http, deadline=10.0) is None
        assert trio.current_time() - started <= 10.0
    assert "mounting anyway: the first read tries again" in caplog.text
    # the first read asks again at once (no error cooldown), and gets the token
    await credential.get_token(SCOPE)
    assert flow.calls == 2


def gaierror(code: int) -> socket.gaierror:
    return socket.gaierror(code, "Name or service not known")


async def test_a_vault_host_that_does_not_exist_is_a_failed_precondition(autojump_clock: trio.abc.Clock) -> None:
    handler = raises(httpx.ConnectError("[Errno -2] Name or service not known"), gaierror(socket.EAI_NONAME))
    async with vault_http(handler) as http:
        refusal = await check_volume(CachingCredential(Flow("token")), SCOPE, VAULT, http)
    assert refusal is not None and (refusal.grpc_code, refusal.code) == (ENDPOINT, "DNSNotFound")
    assert "kv-demo.vault.azure.net does not exist" in refusal.message and "check keyvaultName" in refusal.message


async def test_a_vault_host_that_serves_no_vault_of_that_name_is_a_failed_precondition(
    autojump_clock: trio.abc.Clock,
) -> None:
    """`kvfs emulator` answers every `*.vault.localhost` name; for one it does not serve, 404 VaultNotFound."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"code": "VaultNotFound", "message": "No vault named 'nope'."}})

    async with vault_http(handler) as http:
        refusal = await check_volume(CachingCredential(Flow("token")), SCOPE, VAULT, http)
    assert refusal is not None and (refusal.grpc_code, refusal.code) == (ENDPOINT, "VaultNotFound")
    assert "kv-demo.vault.azure.net serves no vault of that name (check keyvaultName)" in refusal.message


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_any_other_answer_of_the_vault_host_passes(autojump_clock: trio.abc.Clock, status: int) -> None:
    async with vault_http(answers(status)) as http:
        assert await check_volume(CachingCredential(Flow("token")), SCOPE, VAULT, http) is None


@pytest.mark.parametrize(
    "cause",
    [
        socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
    ],
    ids=["dns-server-failing", "refused"],
)
async def test_a_vault_host_that_cannot_be_reached_now_is_transient(
    autojump_clock: trio.abc.Clock, cause: OSError
) -> None:
    async with vault_http(raises(httpx.ConnectError(str(cause)), cause)) as http:
        assert await check_volume(CachingCredential(Flow("token")), SCOPE, VAULT, http) is None


async def test_an_untrusted_vault_certificate_is_a_failed_precondition(autojump_clock: trio.abc.Clock) -> None:
    cause = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    async with vault_http(raises(httpx.ConnectError("handshake failed"), cause)) as http:
        refusal = await check_volume(CachingCredential(Flow("token")), SCOPE, VAULT, http)
    assert refusal is not None and (refusal.grpc_code, refusal.code) == (ENDPOINT, "TLSVerifyFailed")
    assert "SSL_CERT_FILE" in refusal.message


async def test_an_authority_host_that_does_not_exist_is_found_through_the_real_flow(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The flow raises AuthError `from None`; the name error stays reachable through its context."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "login.example.invalid":
            raise httpx.ConnectError("[Errno -2] Name or service not known") from gaierror(socket.EAI_NONAME)
        return httpx.Response(401)

    async with vault_http(handler) as http:
        flow = ClientSecretCredential("https://login.example.invalid", "tenant", "client", "s3cret", http)
        refusal = await check_volume(CachingCredential(flow), SCOPE, VAULT, http)
    assert refusal is not None and (refusal.grpc_code, refusal.code) == (ENDPOINT, "DNSNotFound")
    assert "cannot reach Entra ID at https://login.example.invalid" in refusal.message
    assert "s3cret" not in refusal.message


async def test_an_identity_refusal_wins_over_an_endpoint_one(autojump_clock: trio.abc.Clock) -> None:
    cause = ssl.SSLCertVerificationError(1, "CERTIFICATE_VERIFY_FAILED")
    async with vault_http(raises(httpx.ConnectError("handshake"), cause)) as http:
        refusal = await check_volume(CachingCredential(Flow(refused_identity())), SCOPE, VAULT, http)
    assert refusal is not None and refusal.grpc_code == IDENTITY


def test_the_ready_line_carries_the_code_and_one_line_of_message() -> None:
    refusal = Refusal(IDENTITY, "AADSTS70021", "no federated credential\nFix: create one")
    line = ready_line(refusal)
    assert line == "error [PERMISSION_DENIED] no federated credential Fix: create one"
    # the mounter passes what follows "error " on; the plugin reads the code back
    assert parse_refusal(line.removeprefix("error ")) == ("PERMISSION_DENIED", "no federated credential Fix: create one")
    assert parse_refusal("[FAILED_PRECONDITION] vault host x does not exist") == ("FAILED_PRECONDITION", "vault host x does not exist")
    for other in ("daemon exited before it was ready", "[INTERNAL] no", "[OK] fine", "[PERMISSION_DENIED]"):
        assert parse_refusal(other) is None
    assert str(PreflightError(refusal)) == refusal.message


def test_only_a_name_that_does_not_exist_counts_as_not_found() -> None:
    def chained(cause: BaseException) -> Exception:
        try:
            try:
                raise cause
            except BaseException:
                raise AuthError("cannot reach Entra ID") from None
        except AuthError as exc:
            return exc

    assert name_not_found(chained(gaierror(socket.EAI_NONAME)))
    assert not name_not_found(chained(socket.gaierror(socket.EAI_AGAIN, "again")))
    assert not name_not_found(chained(ConnectionRefusedError()))
    assert not name_not_found(AuthError("no cause"))
