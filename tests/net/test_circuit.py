"""Host circuits (MockClock): a host that refuses connections fails fast, is probed with backoff, recovers.

Plus the same rules on real sockets (a refused port, a name that does not resolve, an untrusted
certificate) and through the Key Vault and Entra ID clients, whose retries must not wait for a
host that is down.
"""

from __future__ import annotations

import errno
import logging
import random
import socket
from collections.abc import Callable

import httpx
import pytest
import trio
import trio.testing

from kvfs.auth.base import AccessToken
from kvfs.auth.cache import CachingCredential
from kvfs.auth.flows import ClientSecretCredential, ImdsCredential
from kvfs.cache.resolver import Resolver
from kvfs.config.model import AuthConfig, CloudConfig, MountConfig, ObjectSpec
from kvfs.emulator.server import Emulator
from kvfs.errors import AuthError, VaultError
from kvfs.net.circuit import CircuitTransport, HostCircuits, HostUnreachable, State, origin
from kvfs.net.http import make_http_client, make_local_http_client
from kvfs.vault.client import VaultClient

VAULT = "https://demo.vault.azure.net"
AUTHORITY = "https://login.microsoftonline.com"
SCOPE = "https://vault.azure.net/.default"


class Host:
    """A fake network per host: answers, refuses, times out or hangs; counts connection attempts."""

    def __init__(self) -> None:
        self.mode: dict[str, str] = {}  # host → "up" (default) | "refused" | "timeout" | "503" | "hang"
        self.attempts: dict[str, int] = {}
        self.release = trio.Event()

    async def handler(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.attempts[host] = self.attempts.get(host, 0) + 1
        mode = self.mode.get(host, "up")
        if mode == "refused":
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if mode == "timeout":
            raise httpx.ConnectTimeout("timed out", request=request)
        if mode == "hang":
            await self.release.wait()
        if mode == "503":
            return httpx.Response(503, json={"error": {"code": "ServiceUnavailable"}})
        if request.url.path.endswith("/token"):
            return httpx.Response(200, json={"access_token": "tok", "expires_in": 3600, "token_type": "Bearer"})
        return httpx.Response(200, json={"value": "v", "id": f"{VAULT}/secrets/a/{'1' * 32}", "attributes": {}})


def make(net: Host, **kw: float) -> tuple[httpx.AsyncClient, HostCircuits]:
    circuits = HostCircuits(rng=random.Random(3), **kw)
    transport = CircuitTransport(httpx.MockTransport(net.handler), circuits)
    return make_http_client(transport=transport), circuits


KV = origin(httpx.URL(VAULT))
SPEC = ObjectSpec(name="a", type="secret")
CONFIG = MountConfig(
    vault_name="demo",
    cloud=CloudConfig("AzurePublicCloud", "vault.azure.net", "https://vault.azure.net", AUTHORITY),
    auth=AuthConfig(mode="service_principal"),
    objects=(SPEC,),
)
HOST = "demo.vault.azure.net"


async def get(http: httpx.AsyncClient, url: str = VAULT + "/secrets/a") -> httpx.Response:
    return await http.get(url)


async def refused_once(net: Host) -> tuple[httpx.AsyncClient, HostCircuits]:
    """A client whose circuit for the vault host has just opened."""
    http, circuits = make(net)
    net.mode[HOST] = "refused"
    with pytest.raises(HostUnreachable):
        await get(http)
    return http, circuits


async def test_refused_opens_the_circuit_and_later_requests_fail_without_connecting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = Host()
    http, circuits = make(net)
    net.mode[HOST] = "refused"
    with pytest.raises(HostUnreachable) as first:
        await get(http)
    assert circuits.state(KV) is State.OPEN
    message = str(first.value)
    assert message.startswith(f"{KV} unreachable (circuit open since ")
    assert "last error ConnectError: [Errno 111] Connection refused); next probe in " in message
    start = trio.current_time()
    for _ in range(50):
        with pytest.raises(HostUnreachable):
            await get(http)
    assert net.attempts[HOST] == 1  # only the first request tried to connect
    assert trio.current_time() == start  # and the others did not wait at all
    assert isinstance(first.value, httpx.ConnectError)  # callers phrasing connect errors still do


async def test_half_open_lets_one_probe_through_and_success_closes(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kvfs.net.circuit")
    net = Host()
    http, circuits = await refused_once(net)
    host = HOST
    await trio.sleep(1.0)  # the first probe interval is at most 1 s
    net.mode[host] = "hang"
    outcomes: list[object] = []

    async def probe() -> None:
        outcomes.append((await get(http)).status_code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe)
        await trio.testing.wait_all_tasks_blocked()
        assert circuits.state(KV) is State.HALF_OPEN
        with pytest.raises(HostUnreachable, match="a probe is under way"):
            await get(http)  # only one probe at a time
        assert net.attempts[host] == 2
        net.mode[host] = "up"
        net.release.set()
    assert outcomes == [200]
    assert circuits.state(KV) is State.CLOSED
    assert (await get(http)).status_code == 200
    levels = [(r.levelname, r.getMessage().split(" (")[0].split(";")[0]) for r in caplog.records]
    assert levels == [
        ("WARNING", f"{KV} unreachable"),
        ("INFO", f"{KV}: probing"),
        ("INFO", f"{KV} reachable again after 1 s"),
    ]  # each transition once, not once per failed request


async def test_failed_probes_back_off_doubling_to_the_cap_with_jitter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = Host()
    http, circuits = await refused_once(net)
    host = HOST
    connects: list[float] = [0.0]
    seen = 1
    while trio.current_time() < 130:
        try:
            await get(http)
        except HostUnreachable:
            pass
        if net.attempts[host] > seen:
            seen = net.attempts[host]
            connects.append(trio.current_time())
        await trio.sleep(0.05)  # a reader polling every 50 ms
    gaps = [b - a for a, b in zip(connects, connects[1:])]
    ceilings = [1, 2, 4, 8, 16, 30, 30]
    assert len(gaps) >= len(ceilings)
    for gap, ceiling in zip(gaps, ceilings):
        assert 0.8 * ceiling <= gap <= ceiling + 0.05, gaps  # jittered within [0.8, 1] of the doubling
    assert len(set(round(g, 2) for g in gaps[5:])) > 1  # jitter: probes of many daemons spread out
    assert circuits.state(KV) is State.OPEN


@pytest.mark.parametrize("mode", ["timeout", "503"])
async def test_timeouts_and_server_errors_do_not_open(autojump_clock: trio.testing.MockClock, mode: str) -> None:
    net = Host()
    http, circuits = make(net)
    net.mode[HOST] = mode
    for _ in range(5):
        if mode == "timeout":
            with pytest.raises(httpx.ConnectTimeout):
                await get(http)
        else:
            assert (await get(http)).status_code == 503
    assert circuits.state(KV) is State.CLOSED
    assert net.attempts[HOST] == 5  # every request went out


async def test_a_probe_without_an_answer_reopens_with_a_longer_interval_and_a_cancelled_probe_hands_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = Host()
    http, circuits = await refused_once(net)
    host = HOST
    await trio.sleep(1.0)
    net.mode[host] = "timeout"
    with pytest.raises(httpx.ConnectTimeout):
        await get(http)  # the probe: connected nowhere in time
    assert circuits.state(KV) is State.OPEN
    with pytest.raises(HostUnreachable, match=r"next probe in (1\.[6-9]|2\.0) s"):
        await get(http)
    await trio.sleep(2.0)
    net.mode[host] = "hang"
    with trio.move_on_after(0.5):
        await get(http)  # the probe, cancelled by its caller: no verdict
    assert circuits.state(KV) is State.OPEN
    net.mode[host] = "up"
    assert (await get(http)).status_code == 200  # the next request probes at once, and succeeds
    assert circuits.state(KV) is State.CLOSED


async def test_hosts_are_isolated(autojump_clock: trio.testing.MockClock) -> None:
    net = Host()
    http, circuits = await refused_once(net)
    assert (await get(http, "https://other.vault.azure.net/secrets/a")).status_code == 200
    assert (await get(http, AUTHORITY + "/t/oauth2/v2.0/token")).status_code == 200
    assert circuits.state(KV) is State.OPEN
    assert circuits.state(origin(httpx.URL("https://other.vault.azure.net"))) is State.CLOSED
    # The same name on another port is another host; the default port is spelled out.
    assert circuits.state(origin(httpx.URL("https://demo.vault.azure.net:8443"))) is State.CLOSED
    assert origin(httpx.URL("https://Demo.Vault.Azure.Net./x")) == "https://demo.vault.azure.net:443"


# -- through the clients: no retry waits for a host that is down ----------------------------------


class StaticToken:
    async def get_token(self, scope: str) -> AccessToken:
        return AccessToken("tok", trio.current_time() + 3600)


async def test_key_vault_read_fails_within_two_seconds_with_one_clear_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = Host()
    http, _ = make(net)
    net.mode[HOST] = "refused"
    vault = VaultClient(VAULT, StaticToken(), SCOPE, http)
    start = trio.current_time()
    for name in ("a", "b", "c"):
        with pytest.raises(VaultError) as exc:
            await vault.get("secret", name)
        assert exc.value.code == "HostUnreachable" and exc.value.errno == errno.EIO
    assert trio.current_time() - start < 2.0  # was ~20 s per object: retries until the deadline
    assert net.attempts[HOST] == 1
    assert str(exc.value).startswith(f"secret 'c': vault {KV} unreachable (circuit open since ")


async def test_entra_refusing_connections_fails_a_token_request_fast(autojump_clock: trio.testing.MockClock) -> None:
    net = Host()
    http, circuits = make(net)
    net.mode["login.microsoftonline.com"] = "refused"
    entra = CachingCredential(ClientSecretCredential(AUTHORITY, "t", "c", "client-secret-value", http))
    vault = VaultClient(VAULT, entra, SCOPE, http)
    start = trio.current_time()
    with pytest.raises(AuthError) as exc:
        await vault.get("secret", "a")
    assert trio.current_time() - start < 2.0  # not three attempts with 1 s and 2 s waits
    assert exc.value.code == "entra_unreachable" and exc.value.errno == errno.EIO
    assert "login.microsoftonline.com:443 unreachable (circuit open since" in str(exc.value)
    assert "client-secret-value" not in str(exc.value)
    assert net.attempts == {"login.microsoftonline.com": 1}  # Key Vault was never asked
    assert circuits.state(KV) is State.CLOSED


async def test_imds_refusing_connections_names_the_circuit(autojump_clock: trio.testing.MockClock) -> None:
    net = Host()
    http, _ = make(net)
    net.mode["169.254.169.254"] = "refused"
    imds = ImdsCredential(None, http, base_url="http://169.254.169.254")
    for _ in range(2):
        with pytest.raises(AuthError) as exc:
            await imds.get_token(SCOPE)
        assert exc.value.code == "imds_unreachable"
    assert "http://169.254.169.254:80 unreachable (circuit open since" in str(exc.value)
    assert net.attempts == {"169.254.169.254": 1}


async def test_after_recovery_the_next_read_is_the_probe_not_a_remembered_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Failures that cost no request skip the 5 s error cooldown: reads heal within one probe interval."""
    net = Host()
    http, circuits = make(net)
    net.mode[HOST] = "refused"
    net.mode["login.microsoftonline.com"] = "refused"
    entra = CachingCredential(ClientSecretCredential(AUTHORITY, "t", "c", "s", http))
    cache = Resolver(VaultClient(VAULT, entra, SCOPE, http), CONFIG)
    with pytest.raises(AuthError):
        await cache.current(SPEC)  # Entra ID down
    net.mode["login.microsoftonline.com"] = "up"
    await trio.sleep(1.0)
    with pytest.raises(VaultError, match="unreachable"):
        await cache.current(SPEC)  # Entra ID probed and back; Key Vault down
    net.mode[HOST] = "up"
    await trio.sleep(1.0)
    assert (await cache.current(SPEC)).files[""] == b"v"  # the probe, 1 s after the last failure
    assert circuits.state(KV) is State.CLOSED


# -- real sockets: what opens a circuit in the wild --------------------------------------------------


def refused_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _opens(http: httpx.AsyncClient, url: str) -> str:
    with pytest.raises(HostUnreachable) as first:
        await http.get(url)
    transport = http._transport
    assert isinstance(transport, CircuitTransport)
    assert transport.circuits.state(origin(httpx.URL(url))) is State.OPEN
    return str(first.value)


@pytest.mark.parametrize("factory", [make_http_client, make_local_http_client])
async def test_real_refused_connection_opens(factory: Callable[[], httpx.AsyncClient]) -> None:
    scheme = "https" if factory is make_http_client else "http"  # IMDS and NMI are plain HTTP
    async with factory() as http:
        message = await _opens(http, f"{scheme}://127.0.0.1:{refused_port()}/metadata/identity/oauth2/token")
    assert "ConnectError" in message


async def test_real_dns_failure_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_such_name(host: object, *args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    async with make_http_client() as http:
        message = await _opens(http, "https://nosuchvault.vault.azure.net/secrets/a")
    assert "Name or service not known" in message


async def test_real_untrusted_certificate_opens_and_keeps_its_own_message(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # the emulator's CA is not trusted
    async with make_http_client(trust_env=False) as http:
        url = emulator.vault_url("demo")
        await _opens(http, url + "secrets/a")
        vault = VaultClient(url, StaticToken(), SCOPE, http)
        with pytest.raises(VaultError) as exc:
            await vault.get("secret", "a")
    assert exc.value.code == "TLSVerifyFailed"  # the fix (SSL_CERT_FILE) is still named
    assert "add its CA to the file named by SSL_CERT_FILE" in str(exc.value)
