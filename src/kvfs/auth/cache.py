"""Token cache in front of one credential (one identity), keyed by scope.

Upstream fetched a new token per mount and per rotation poll; kvfs keeps one token per
identity and scope until shortly before it expires. Concurrent readers share one in-flight
refresh, and an Entra hiccup during the refresh window keeps serving the still-valid token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from kvfs.auth.base import AccessToken, Credential
from kvfs.errors import AuthError

log = logging.getLogger(__name__)


@dataclass
class _Flight:
    """One refresh in progress; waiters read its outcome."""

    done: trio.Event
    token: AccessToken | None = None
    error: AuthError | None = None


@dataclass
class _Entry:
    token: AccessToken | None = None
    refresh_at: float = 0.0  # trio time after which a refresh is due
    retry_not_before: float = 0.0  # after a failed refresh of a still-valid token
    inflight: _Flight | None = None
    error: AuthError | None = None  # last failure with no usable token
    error_until: float = 0.0


def _copy(err: AuthError) -> AuthError:
    """A fresh exception per waiter, so tracebacks of concurrent callers do not pile up."""
    return AuthError(str(err), code=err.code, errno=err.errno)


def refresh_margin_for(lifetime: float, refresh_margin: float = 300.0) -> float:
    """How long before expiry a token of `lifetime` seconds is replaced."""
    return min(refresh_margin, max(lifetime / 10, min(5.0, lifetime / 2)))


class CachingCredential:
    """Wraps a Credential: refresh-ahead, single-flight, stale-while-valid.

    A token is refreshed `refresh_margin` seconds before expiry, or in the last tenth of its
    lifetime when that is shorter (a 60 s token is refreshed after 54 s): one exchange per
    lifetime, not one per call. The margin stays at least 5 s (half of a shorter lifetime), so
    whole-second `exp` claims and request latency never make a token expire in flight. After a failed
    refresh the old token is served and the next attempt waits `retry_interval`. Without a
    usable token, a failure is repeated for `error_cooldown` seconds instead of hammering the
    identity provider once per file read.
    """

    def __init__(
        self,
        inner: Credential,
        *,
        refresh_margin: float = 300.0,
        retry_interval: float = 30.0,
        error_cooldown: float = 5.0,
    ) -> None:
        self.inner = inner
        self.refresh_margin = refresh_margin
        self.retry_interval = retry_interval
        self.error_cooldown = error_cooldown
        self._entries: dict[str, _Entry] = {}

    def __repr__(self) -> str:
        return f"CachingCredential({self.inner!r})"

    async def get_token(self, scope: str) -> AccessToken:
        entry = self._entries.setdefault(scope, _Entry())
        while True:
            now = trio.current_time()
            token = entry.token
            valid = token is not None and now < token.expires_at
            if token is not None and valid and (now < entry.refresh_at or now < entry.retry_not_before):
                return token
            flight = entry.inflight
            if flight is not None:
                if token is not None and valid:
                    return token  # someone is refreshing; the current token is still good
                await flight.done.wait()
                if flight.token is not None:
                    return flight.token
                if flight.error is not None:
                    raise _copy(flight.error)
                continue  # the refresher was cancelled: try again, possibly as the refresher
            if not valid and entry.error is not None and now < entry.error_until:
                raise _copy(entry.error)
            return await self._refresh(scope, entry)

    async def _refresh(self, scope: str, entry: _Entry) -> AccessToken:
        flight = entry.inflight = _Flight(trio.Event())
        try:
            started = trio.current_time()
            try:
                token = await self.inner.get_token(scope)
            except AuthError as err:
                now = trio.current_time()
                old = entry.token
                if old is not None and now < old.expires_at:
                    entry.retry_not_before = now + self.retry_interval
                    log.warning(
                        "token refresh failed (%s), serving the current token for %.0fs more: %s",
                        err.code or "error",
                        old.expires_at - now,
                        err,
                    )
                    flight.token = old
                    return old
                entry.token = None
                entry.error = err
                entry.error_until = now + self.error_cooldown
                flight.error = err
                raise
            lifetime = max(0.0, token.expires_at - started)
            margin = refresh_margin_for(lifetime, self.refresh_margin)
            entry.token = token
            entry.refresh_at = token.expires_at - margin
            entry.retry_not_before = 0.0
            entry.error = None
            flight.token = token
            log.debug("cached token for %s, refresh in %.0fs", scope, entry.refresh_at - trio.current_time())
            return token
        finally:
            entry.inflight = None
            flight.done.set()

    def invalidate(self, scope: str | None = None) -> None:
        """Drop cached tokens (e.g. after Key Vault answered 401 with a new challenge)."""
        if scope is None:
            for entry in self._entries.values():
                entry.token = None
        elif scope in self._entries:
            self._entries[scope].token = None

    async def aclose(self) -> None:
        await self.inner.aclose()
