"""When and how long to retry an HTTP request: the one retry engine of kvfs.

Why: throttling (429) is Key Vault's most common failure, and a file read must still answer
within the budget of kvfs.net.deadlines. So retries honour the server's `Retry-After` (seconds,
HTTP date, or the millisecond variants), otherwise back off exponentially (capped, with full
jitter by default), and never start an attempt that could not finish before the operation's
deadline. Key Vault and the token endpoints differ only in parameters (`KEY_VAULT_RETRY`,
`ENTRA_RETRY`, `IMDS_RETRY`).
"""

from __future__ import annotations

import datetime
import email.utils
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import httpx
import trio

from kvfs.errors import is_tls_verification_error
from kvfs.net.circuit import HostUnreachable
from kvfs.net.deadlines import TOKEN_DEADLINE, VAULT_OP_DEADLINE

log = logging.getLogger(__name__)

# azure-core's retried statuses; Key Vault answers 429 when throttling.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

# Network failures worth another try; TLS verification failures are not (they will not heal), nor
# a host found down (its circuit decides when to try it again).
_RETRY_EXCEPTIONS: tuple[type[Exception], ...] = (
    httpx.TimeoutException,  # connect / read / write / pool timeouts
    httpx.NetworkError,  # connect refused, connection reset, ...
    httpx.RemoteProtocolError,  # server dropped the connection mid-response
)


class DeadlineExceeded(Exception):
    """The operation's deadline passed while an attempt was still running."""


def parse_retry_after(headers: Mapping[str, str], *, now: float) -> float | None:
    """Seconds to wait as the server asks, or None when it does not say.

    Looks at `retry-after-ms`, `x-ms-retry-after-ms` (milliseconds), then `Retry-After`
    (delta seconds or an HTTP date, relative to wall-clock `now`). Never negative.
    """
    for name in ("retry-after-ms", "x-ms-retry-after-ms"):
        raw = headers.get(name)
        if raw:
            try:
                ms = float(raw.strip())
            except ValueError:
                continue
            if math.isfinite(ms):
                return max(0.0, ms / 1000.0)
    raw = headers.get("retry-after")
    if not raw:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:  # HTTP dates are GMT
            when = when.replace(tzinfo=datetime.timezone.utc)
        return max(0.0, when.timestamp() - now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


def full_jitter(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """AWS-style full jitter: uniform(0, min(cap, base * 2**(attempt-1))), attempt counts from 1."""
    return rng.uniform(0.0, exponential(attempt, base=base, cap=cap))


def exponential(attempt: int, *, base: float, cap: float) -> float:
    """min(cap, base * 2**(attempt-1)), attempt counts from 1."""
    return min(cap, base * (2.0 ** max(0, attempt - 1)))


@dataclass(frozen=True)
class RetryPolicy:
    """Retry rules for one kind of request; `run()` applies them to an attempt function."""

    deadline: float = VAULT_OP_DEADLINE  # seconds per operation, attempts and waits included
    statuses: frozenset[int] = RETRY_STATUSES
    retry_network_errors: bool = True
    base: float = 0.8
    cap: float = 8.0
    max_attempts: int = 10
    jitter: bool = True
    # A retry is started only if at least this much time remains after its delay.
    min_attempt_time: float = 1.0
    rng: random.Random = field(default_factory=random.Random, compare=False)
    wallclock: Callable[[], float] = time.time  # only for HTTP-date Retry-After values

    def retryable_status(self, status: int) -> bool:
        return status in self.statuses

    def retryable_exception(self, exc: BaseException) -> bool:
        return (
            self.retry_network_errors
            and isinstance(exc, _RETRY_EXCEPTIONS)
            and not isinstance(exc, HostUnreachable)
            and not is_tls_verification_error(exc)
        )

    def retry_after(self, response: httpx.Response | None) -> float | None:
        if response is None:
            return None
        return parse_retry_after(response.headers, now=self.wallclock())

    def delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        """Wait before attempt `attempt + 1`: the server's Retry-After, else the backoff."""
        asked = self.retry_after(response)
        if asked is not None:
            return asked
        if self.jitter:
            return full_jitter(attempt, base=self.base, cap=self.cap, rng=self.rng)
        return exponential(attempt, base=self.base, cap=self.cap)

    def fits(self, delay: float, deadline: float, attempt_time: float = 0.0) -> bool:
        """Whether a retry after `delay` can still finish before `deadline` (trio time).

        An attempt is expected to take as long as the slowest one so far (at least
        `min_attempt_time`). This is also what caps a long `Retry-After`: it is not waited for.
        """
        expected = max(self.min_attempt_time, attempt_time)
        return trio.current_time() + delay + expected <= deadline

    async def run(
        self,
        attempt_fn: Callable[[], Awaitable[httpx.Response]],
        *,
        deadline: float | None = None,
        what: str = "request",
    ) -> httpx.Response:
        """Call `attempt_fn` until it gives a non-retryable answer, retries run out or time does.

        Returns the last response (possibly a retryable status: the caller turns it into an
        error); re-raises the last network exception; raises `DeadlineExceeded` when an attempt
        is still running at the deadline (trio time; default: now + `self.deadline`).
        """
        if deadline is None:
            deadline = trio.current_time() + self.deadline
        attempt = 0
        slowest = 0.0
        while True:
            attempt += 1
            started = trio.current_time()
            response: httpx.Response | None = None
            error: Exception | None = None
            with trio.move_on_at(deadline) as scope:
                try:
                    response = await attempt_fn()
                except Exception as exc:  # noqa: BLE001 - classified just below
                    if not self.retryable_exception(exc):
                        raise
                    error = exc
            if scope.cancelled_caught:
                raise DeadlineExceeded(what)
            slowest = max(slowest, trio.current_time() - started)
            if response is not None and not self.retryable_status(response.status_code):
                return response
            delay = self.delay(attempt, response)
            outcome = f"HTTP {response.status_code}" if response is not None else type(error).__name__
            if attempt >= self.max_attempts or not self.fits(delay, deadline, slowest):
                log.debug("%s: giving up after %d attempts (%s)", what, attempt, outcome)
                if response is not None:
                    return response
                assert error is not None
                raise error
            log.debug("%s: %s, retry %d in %.2fs", what, outcome, attempt, delay)
            if response is not None:
                await response.aclose()
            await trio.sleep(delay)


# Key Vault: azure-core's rules (statuses, 0.8 s backoff factor), capped at 8 s so several tries
# fit in one operation, jittered because every pod of a deployment reads the same vault.
KEY_VAULT_RETRY = RetryPolicy()
# Entra ID: two quick retries of a transient answer; the token cache retries later reads.
ENTRA_RETRY = RetryPolicy(
    deadline=TOKEN_DEADLINE,
    statuses=frozenset({429, 500, 502, 503, 504}),
    base=1.0,
    max_attempts=3,
    jitter=False,
)
# IMDS asks to retry 404/410 (updating), 429 and 5xx with exponential backoff; an IMDS that does
# not accept connections is not there at all (not an Azure VM), so network errors end at once.
IMDS_RETRY = RetryPolicy(
    deadline=TOKEN_DEADLINE,
    statuses=frozenset({404, 410, 429, 500, 502, 503, 504}),
    retry_network_errors=False,
    max_attempts=6,
    jitter=False,
)
