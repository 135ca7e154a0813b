"""Token cache in front of one credential (one identity), keyed by scope.

Upstream fetched a new token per mount and per rotation poll; kvfs keeps one token per
identity and scope until shortly before it expires. Concurrent readers share one in-flight
refresh, and an Entra hiccup during the refresh window keeps serving the still-valid token.
An identity provider that answers tokens already expired (`expires_in: 0` or negative) is asked
at most once per EXPIRED_TOKEN_HOLD, not once per request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from kvfs.auth.base import AccessToken, Credential
from kvfs.errors import AuthError
from kvfs.net.deadlines import ERROR_COOLDOWN
from kvfs.net.singleflight import SingleFlight

log = logging.getLogger(__name__)

# A token answered already expired (`expires_in` 0 or less) is used this long from its request.
# Tokens with any life left are used until their expiry, however short: an identity provider may
# honestly issue short ones (a test IdP does), and Key Vault refuses a token past it.
EXPIRED_TOKEN_HOLD = 60.0


@dataclass
class _Entry:
    token: AccessToken | None = None
    usable_until: float = 0.0  # its expiry; for a token answered expired, EXPIRED_TOKEN_HOLD after its request
    refresh_at: float = 0.0  # trio time after which a refresh is due
    retry_not_before: float = 0.0  # after a failed refresh of a still-valid token

    @property
    def held(self) -> bool:
        """Whether the token is used past the expiry it was answered with (see EXPIRED_TOKEN_HOLD)."""
        return self.token is not None and self.usable_until > self.token.expires_at


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

    A token answered already expired (`expires_in: 0` or negative) is used for EXPIRED_TOKEN_HOLD
    from its request, and `invalidate` keeps it: such an identity provider would otherwise be
    asked once per Key Vault request. If it is just odd (the token lives longer than it says)
    reads go on; if its tokens really are expired, Key Vault refuses them and those reads fail
    until the next exchange. One warning per credential names who answered and the lifetime.
    """

    def __init__(
        self,
        inner: Credential,
        *,
        refresh_margin: float = 300.0,
        retry_interval: float = 30.0,
        error_cooldown: float = ERROR_COOLDOWN,
    ) -> None:
        self.inner = inner
        self.refresh_margin = refresh_margin
        self.retry_interval = retry_interval
        self._entries: dict[str, _Entry] = {}
        self._flights: SingleFlight[str, AccessToken] = SingleFlight(cooldown=error_cooldown, remember=(AuthError,))
        self._warned_expired = False

    def __repr__(self) -> str:
        return f"CachingCredential({self.inner!r})"

    async def get_token(self, scope: str, *, cooldown: bool = True) -> AccessToken:
        """The cached token for `scope`, refreshed if due; `cooldown=False` (a mount's preflight)
        neither answers from a remembered failure nor remembers this one."""
        entry = self._entries.setdefault(scope, _Entry())
        now = trio.current_time()
        token = entry.token
        if token is not None and now < entry.usable_until:
            if now < entry.refresh_at or now < entry.retry_not_before or self._flights.running(scope):
                return token  # still good; a refresh is not due, not allowed yet, or under way
        return await self._flights.run(scope, lambda: self._refresh(scope, entry), cooldown=cooldown)

    async def _refresh(self, scope: str, entry: _Entry) -> AccessToken:
        started = trio.current_time()
        try:
            token = await self.inner.get_token(scope)
        except AuthError as err:
            now = trio.current_time()
            old = entry.token
            if old is not None and now < entry.usable_until:
                entry.retry_not_before = now + self.retry_interval
                log.warning(
                    "token refresh failed (%s), serving the current token for %.0fs more: %s",
                    err.code or "error",
                    entry.usable_until - now,
                    err,
                )
                return old
            entry.token = None
            raise
        lifetime = token.expires_at - started
        entry.token = token
        if token.expires_at <= trio.current_time():  # answered already expired
            self._warn_expired(token, lifetime)
            entry.usable_until = entry.refresh_at = started + EXPIRED_TOKEN_HOLD
        else:
            entry.usable_until = token.expires_at
            entry.refresh_at = token.expires_at - refresh_margin_for(lifetime, self.refresh_margin)
        entry.retry_not_before = 0.0
        log.debug("cached token for %s, refresh in %.0fs", scope, entry.refresh_at - trio.current_time())
        return token

    def _warn_expired(self, token: AccessToken, lifetime: float) -> None:
        if self._warned_expired:
            return
        self._warned_expired = True
        log.warning(
            "%s answered an access token that expires in %.0f s: kvfs uses each token for %.0f s instead, so"
            " it asks at most once per %.0f s; if Key Vault refuses the tokens, fix the identity provider's"
            " token lifetime",
            token.issuer or "the identity provider",
            lifetime,
            EXPIRED_TOKEN_HOLD,
            EXPIRED_TOKEN_HOLD,
        )

    def expires_at(self, scope: str) -> float | None:
        """When the cached token for `scope` expires (trio time); None without one."""
        entry = self._entries.get(scope)
        return entry.token.expires_at if entry is not None and entry.token is not None else None

    def invalidate(self, scope: str | None = None) -> None:
        """Drop cached tokens (e.g. after Key Vault answered 401 with a new challenge).

        A token held past its answered expiry stays: asking again sooner is what the hold prevents.
        """
        for key, entry in self._entries.items():
            if (scope is None or key == scope) and not entry.held:
                entry.token = None

    async def aclose(self) -> None:
        await self.inner.aclose()
