"""Host circuits: while a host refuses connections, requests to it fail at once.

Why: a retry policy is right for a host that is slow or throttling, and wrong for one that is
down. With Key Vault refusing connections, each cold read used to retry until its ~20 s deadline,
one object after another (`ls -la` of 20 unread files: minutes). So every request passes through
the circuit of its host (scheme, name, port):

- closed: requests go through. A connection that is refused, a name that does not resolve or a
  TLS handshake or certificate check that fails (all `httpx.ConnectError`) opens the circuit.
  Timeouts and HTTP errors (5xx, 429) do not: the host is there, the retry policy handles them.
- open: requests fail at once with `HostUnreachable`, which the retry policy does not retry.
  After a probe interval (1 s, doubling up to 30 s, jittered) the next request goes through as
  the only probe (half-open); meanwhile the others keep failing at once.
- the probe gets an answer (any HTTP status): closed. It fails in any other way: open again,
  with the next, longer interval. A cancelled probe gives no verdict: the next request probes.

There is no timer: a probe is a real request (a read, or a background refresh), so a host that
is back is noticed by the first request after its probe time.
"""

from __future__ import annotations

import enum
import logging
import random
import time
from dataclasses import dataclass
from typing import TypeVar

import httpx
import trio

from kvfs.errors import KvfsError

log = logging.getLogger(__name__)

FIRST_PROBE = 1.0  # seconds after a host was found down
MAX_PROBE = 30.0  # the longest wait between probes of a host that stays down
_ERROR_TEXT = 200  # characters of the last error kept for messages


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"  # open, with one probe in flight


class HostUnreachable(httpx.ConnectError):
    """A request not sent, or not connected, because its host is down (its circuit is open).

    A `ConnectError`, so callers that phrase connection failures keep working; the retry policy
    does not retry it (kvfs.net.retry).
    """


def describe(error: BaseException) -> str:
    """`Type: message`, the message taken from the first exception of the chain that has one.

    httpx's ConnectError for a failed TLS handshake says nothing itself; its cause does (and the
    cause's `CERTIFICATE_VERIFY_FAILED` is what kvfs.errors.is_tls_verification_error looks for).
    """
    seen: set[int] = set()
    cur: BaseException | None = error
    while cur is not None and id(cur) not in seen:
        text = str(cur).strip()
        if text:
            return f"{type(error).__name__}: {text}"[:_ERROR_TEXT]
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return type(error).__name__


E = TypeVar("E", bound=KvfsError)


def no_cooldown_if_down(error: E, cause: BaseException) -> E:
    """`error`, not to be remembered for the error cooldown if `cause` is a host known to be down.

    Such a failure cost no request, and the next read may be the probe that finds the host back.
    """
    if isinstance(cause, HostUnreachable):
        error.cooldown = False
    return error


def origin(url: httpx.URL) -> str:
    """`scheme://host:port` with the default port explicit, so `host:443` ≡ `host`."""
    port = url.port or (443 if url.scheme == "https" else 80)
    return f"{url.scheme.lower()}://{url.host.lower().rstrip('.')}:{port}"


@dataclass
class _Circuit:
    host: str
    failures: int = 0  # consecutive failed connections (the opening one and failed probes)
    opened_at: float = 0.0  # trio time
    opened_wall: float = 0.0  # wall clock, for messages
    last_error: str = ""
    probe_at: float = 0.0  # trio time from which the next request may probe
    probing: bool = False

    @property
    def state(self) -> State:
        if self.failures == 0:
            return State.CLOSED
        return State.HALF_OPEN if self.probing else State.OPEN


class HostCircuits:
    """The circuits of every host one HTTP client talks to (see the module docstring)."""

    def __init__(
        self,
        *,
        first_probe: float = FIRST_PROBE,
        max_probe: float = MAX_PROBE,
        rng: random.Random | None = None,
    ) -> None:
        self.first_probe = first_probe
        self.max_probe = max_probe
        self._rng = rng or random.Random()
        self._circuits: dict[str, _Circuit] = {}

    def state(self, host: str) -> State:
        """The state of `host`'s circuit (`origin()` form); unknown hosts are closed."""
        circuit = self._circuits.get(host)
        return circuit.state if circuit is not None else State.CLOSED

    def probe_interval(self, failures: int) -> float:
        """Wait before the next probe after `failures` consecutive failures: doubling, capped, jittered."""
        ceiling = min(self.max_probe, self.first_probe * 2.0 ** (failures - 1))
        return ceiling * self._rng.uniform(0.8, 1.0)

    def admit(self, host: str, request: httpx.Request) -> bool:
        """Let a request to `host` through (True: it is the probe) or raise `HostUnreachable`."""
        circuit = self._circuits.get(host)
        if circuit is None or circuit.failures == 0:
            return False
        now = trio.current_time()
        if circuit.probing or now < circuit.probe_at:
            raise self._unreachable(circuit, request)
        circuit.probing = True
        log.info("%s: probing (unreachable for %.0f s)", host, now - circuit.opened_at)
        return True

    def answered(self, host: str) -> None:
        """A request to `host` got an HTTP answer: the host is reachable."""
        circuit = self._circuits.pop(host, None)
        if circuit is not None and circuit.failures:
            log.info(
                "%s reachable again after %.0f s; requests go through",
                host,
                trio.current_time() - circuit.opened_at,
            )

    def failed(self, host: str, request: httpx.Request, error: Exception, *, probe: bool) -> HostUnreachable:
        """A request to `host` could not connect: open (or re-open) its circuit; what to raise."""
        circuit = self._circuits.setdefault(host, _Circuit(host))
        circuit.last_error = describe(error)
        if circuit.failures == 0:
            now = trio.current_time()
            circuit.failures = 1
            circuit.opened_at, circuit.opened_wall = now, time.time()
            circuit.probe_at = now + self.probe_interval(1)
            log.warning(
                "%s unreachable (%s): requests to it fail at once until a probe connects; first probe in %.1f s",
                host,
                circuit.last_error,
                circuit.probe_at - now,
            )
        elif probe:
            self._reopen(circuit, circuit.last_error)
        return self._unreachable(circuit, request)

    def probe_failed(self, host: str, error: Exception) -> None:
        """The probe to `host` connected but got no answer (a timeout, a reset): still down."""
        circuit = self._circuits.get(host)
        if circuit is not None and circuit.probing:
            self._reopen(circuit, f"no answer: {type(error).__name__}")

    def _reopen(self, circuit: _Circuit, reason: str) -> None:
        circuit.probing = False
        circuit.failures += 1
        wait = self.probe_interval(circuit.failures)
        circuit.probe_at = trio.current_time() + wait
        log.info("%s still unreachable (%s); next probe in %.1f s", circuit.host, reason, wait)

    def probe_abandoned(self, host: str) -> None:
        """The probe was cancelled: no verdict, the next request probes."""
        circuit = self._circuits.get(host)
        if circuit is not None:
            circuit.probing = False

    def _unreachable(self, circuit: _Circuit, request: httpx.Request) -> HostUnreachable:
        since = time.strftime("%H:%M:%SZ", time.gmtime(circuit.opened_wall))
        if circuit.probing:
            then = "a probe is under way"
        else:
            then = f"next probe in {max(0.0, circuit.probe_at - trio.current_time()):.1f} s"
        return HostUnreachable(
            f"{circuit.host} unreachable (circuit open since {since}, last error {circuit.last_error}); {then}",
            request=request,
        )


class CircuitTransport(httpx.AsyncBaseTransport):
    """Wraps a transport: every request passes its host's circuit (`HostCircuits`)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, circuits: HostCircuits | None = None) -> None:
        self.inner = inner
        self.circuits = circuits or HostCircuits()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = origin(request.url)
        probe = self.circuits.admit(host, request)
        try:
            response = await self.inner.handle_async_request(request)
        except httpx.ConnectError as error:
            raise self.circuits.failed(host, request, error, probe=probe) from None
        except Exception as error:
            if probe:
                self.circuits.probe_failed(host, error)
            raise
        except BaseException:  # cancelled: neither up nor down
            if probe:
                self.circuits.probe_abandoned(host)
            raise
        self.circuits.answered(host)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()
