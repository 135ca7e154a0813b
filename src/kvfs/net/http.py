"""The HTTP client kvfs's own network calls go through: TLS trust, proxies, loopback names.

Why a factory: TLS trust (system CAs plus `SSL_CERT_FILE`), the User-Agent, pooling limits and
the `*.localhost` → loopback rule (RFC 6761: such names always mean the local host, so the
emulator needs no /etc/hosts entry) must be identical for the Key Vault client and the Entra ID
flows, which share one client per daemon and so one circuit per host (kvfs.net.circuit). IMDS and
NMI use a plain proxy-free client (`make_local_http_client`), with host circuits too;
azure-identity's default chain uses `requests` with `make_ssl_context()` (auth/default_chain.py).
"""

from __future__ import annotations

import logging
import os
import ssl
import urllib.request

import httpx

import kvfs
from kvfs.errors import ConfigError
from kvfs.net.circuit import CircuitTransport
from kvfs.net.deadlines import HTTP_TIMEOUT, LOCAL_CONNECT_TIMEOUT

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
USER_AGENT = f"kvfs/{kvfs.__version__}"
ACCEPT_ENCODING = "gzip, deflate"


def is_localhost(host: str) -> bool:
    """True for `localhost` and any name under `.localhost` (RFC 6761: always loopback)."""
    host = host.lower().rstrip(".")
    return host == "localhost" or host.endswith(".localhost")


# CPython's NO_PROXY matcher (in urllib.request, but missing from typeshed)
_bypasses_proxy = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]

_preloaded_context: ssl.SSLContext | None = None
# The system CAs, parsed before a fork (kvfs.csi.zygote): OpenSSL's store of ~150 certificates is
# then shared by every forked daemon instead of parsed into each one's private memory.
_shared_system: tuple[tuple[tuple[int, int, int], ...], ssl.SSLContext] | None = None


def _system_ca_paths() -> tuple[str, str]:
    """The compiled-in system CA file and folder (not SSL_CERT_FILE, which only adds trust here)."""
    paths = ssl.get_default_verify_paths()
    return paths.openssl_cafile or "", paths.openssl_capath or ""


def _stamp(path: str) -> tuple[int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def share_system_trust() -> None:
    """In a process about to fork: parse the system CAs now, once, for every fork to share.

    Called again before each fork, it parses them anew only if the system bundle changed
    (a ca-certificates update under a long-lived zygote reaches the next daemon).
    """
    global _shared_system
    stamp = tuple(_stamp(path) for path in _system_ca_paths())
    if _shared_system is None or _shared_system[0] != stamp:
        _shared_system = (stamp, make_ssl_context(trust_env=False))


def preload_ssl_context() -> None:
    """Read the trusted CAs now, for a process about to lose the rights to read them.

    The CSI daemon drops to an unprivileged uid right after it starts; the file named by
    SSL_CERT_FILE may only be readable by root. Later clients reuse this context. A forked
    daemon takes the system CAs its zygote parsed (`share_system_trust`) and adds its own
    SSL_CERT_FILE to them: the context is this process's copy, no other daemon sees the change.
    """
    global _preloaded_context, _shared_system
    shared, _shared_system = _shared_system, None
    _preloaded_context = make_ssl_context(system=shared[1] if shared else None)


def make_ssl_context(*, trust_env: bool = True, system: ssl.SSLContext | None = None) -> ssl.SSLContext:
    """System CAs plus the CA file named by `SSL_CERT_FILE`.

    OpenSSL's "default verify paths" are *replaced* by SSL_CERT_FILE when it is set, so the
    compiled-in system bundle is loaded explicitly as well: the extra file adds trust, it never
    removes the public CAs. `system`: a context holding the system CAs already, completed here.
    """
    ctx = system or _system_context()
    extra = os.environ.get("SSL_CERT_FILE", "") if trust_env else ""
    if extra:
        try:
            ctx.load_verify_locations(cafile=extra)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                "SSL_CERT_FILE",
                extra,
                f"cannot load trusted CA certificates ({exc.__class__.__name__}: {exc.strerror or exc})",
                "point SSL_CERT_FILE at a readable PEM file of CA certificates, or unset it",
            ) from None
    return ctx


def _system_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificates and host names
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    cafile, capath = _system_ca_paths()
    if cafile and os.path.isfile(cafile):
        try:
            ctx.load_verify_locations(cafile=cafile)
        except (ssl.SSLError, OSError):  # a broken system bundle must not stop the mount
            log.warning("could not load the system CA bundle %s", cafile)
    if capath and os.path.isdir(capath):
        ctx.load_verify_locations(capath=capath)
    return ctx


class LoopbackTransport(httpx.AsyncBaseTransport):
    """Routes `localhost` / `*.localhost` to 127.0.0.1 without DNS; everything else unchanged.

    The Host header and the TLS SNI / certificate hostname check keep the original name (the
    `sni_hostname` request extension). Each loopback name gets its own connection pool: pools are
    keyed by the connected address, and a TLS connection verified for one name must never be
    reused for another.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext,
        limits: httpx.Limits,
        proxy: str | None = None,
    ) -> None:
        self._ssl = ssl_context
        self._limits = limits
        self._direct = httpx.AsyncHTTPTransport(verify=ssl_context, limits=limits, http2=False)
        self._proxied = (
            httpx.AsyncHTTPTransport(verify=ssl_context, limits=limits, http2=False, proxy=proxy)
            if proxy
            else None
        )
        self._loopback: dict[str, httpx.AsyncHTTPTransport] = {}

    def _loopback_transport(self, host: str) -> httpx.AsyncHTTPTransport:
        transport = self._loopback.get(host)
        if transport is None:
            transport = httpx.AsyncHTTPTransport(verify=self._ssl, limits=self._limits, http2=False)
            self._loopback[host] = transport
        return transport

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if is_localhost(host):
            # A copy, so the caller's request (and logs, response.url) keep the original name.
            # Headers are copied as they are: Host was set from the original URL.
            extensions = dict(request.extensions)
            if request.url.scheme == "https":
                extensions["sni_hostname"] = host
            loopback = httpx.Request(
                request.method,
                request.url.copy_with(host=LOOPBACK),
                headers=request.headers,
                stream=request.stream,
                extensions=extensions,
            )
            return await self._loopback_transport(host.lower()).handle_async_request(loopback)
        if self._proxied is not None and not _bypasses_proxy(host):
            return await self._proxied.handle_async_request(request)
        return await self._direct.handle_async_request(request)

    async def aclose(self) -> None:
        await self._direct.aclose()
        if self._proxied is not None:
            await self._proxied.aclose()
        for transport in self._loopback.values():
            await transport.aclose()
        self._loopback.clear()


def make_transport(*, trust_env: bool = True) -> CircuitTransport:
    """The network under the shared client: pooled, verified TLS, `*.localhost` on loopback, host circuits.

    With `trust_env`, `SSL_CERT_FILE` adds CAs and `HTTPS_PROXY`/`NO_PROXY` are honoured (never
    for loopback names). The daemon wraps it to count Key Vault requests (kvfs.daemon.metrics).
    """
    proxy = urllib.request.getproxies_environment().get("https") if trust_env else None
    return CircuitTransport(
        LoopbackTransport(
            ssl_context=(
                _preloaded_context if trust_env and _preloaded_context else make_ssl_context(trust_env=trust_env)
            ),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32, keepalive_expiry=60.0),
            proxy=proxy or None,
        )
    )


def make_http_client(
    *,
    timeout: float = HTTP_TIMEOUT,
    trust_env: bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """Build the shared client: HTTP/1.1 over `transport`, by default `make_transport(trust_env=...)`.

    `transport` replaces the network (tests pass `httpx.MockTransport`); it is used as given.
    """
    if transport is None:
        transport = make_transport(trust_env=trust_env)
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(timeout),
        # Only encodings kvfs.net.body decodes within its size cap.
        headers={"User-Agent": USER_AGENT, "Accept-Encoding": ACCEPT_ENCODING},
        follow_redirects=False,
        trust_env=False,  # env proxies / SSL_CERT_FILE are applied above, once, explicitly
    )


def make_local_http_client() -> httpx.AsyncClient:
    """The client for IMDS and NMI: plain HTTP on the node, never through a proxy, host circuits.

    A connection that does not open within `LOCAL_CONNECT_TIMEOUT` will not open.
    """
    return httpx.AsyncClient(
        transport=CircuitTransport(httpx.AsyncHTTPTransport(trust_env=False)),
        trust_env=False,
        timeout=httpx.Timeout(HTTP_TIMEOUT, connect=LOCAL_CONNECT_TIMEOUT),
        headers={"Accept-Encoding": ACCEPT_ENCODING},  # what kvfs.net.body can decode
    )
