"""CachingCredential: refresh-ahead, single flight, stale-while-valid, errors once expired."""

from __future__ import annotations

import errno
import logging

import pytest
import trio

from kvfs.auth.base import AccessToken
from kvfs.auth.cache import EXPIRED_TOKEN_HOLD, CachingCredential
from kvfs.errors import AuthError

SCOPE = "https://vault.azure.net/.default"


class CountingCredential:
    """An inner credential issuing numbered tokens of a fixed lifetime, optionally failing."""

    def __init__(self, lifetime: float, delay: float = 0.0, issuer: str = "") -> None:
        self.lifetime = lifetime
        self.issuer = issuer
        self.delay = delay
        self.calls: list[float] = []
        self.fail: AuthError | None = None
        self.closed = False

    async def get_token(self, scope: str) -> AccessToken:
        self.calls.append(trio.current_time())
        if self.delay:
            await trio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return AccessToken(
            token=f"tok-{len(self.calls)}", expires_at=trio.current_time() + self.lifetime, issuer=self.issuer
        )

    async def aclose(self) -> None:
        self.closed = True


async def read_for(cache: CachingCredential, seconds: float, step: float = 1.0) -> set[str]:
    """A reader asking for a token every `step` seconds; returns the tokens it saw."""
    seen: set[str] = set()
    end = trio.current_time() + seconds
    while trio.current_time() < end:
        token = await cache.get_token(SCOPE)
        assert token.expires_at > trio.current_time()  # never hands out an expired token
        seen.add(token.token)
        await trio.sleep(step)
    return seen


@pytest.mark.parametrize(("lifetime", "refresh_after"), [(3600.0, 3300.0), (60.0, 54.0)])
async def test_one_exchange_per_lifetime(autojump_clock, lifetime: float, refresh_after: float) -> None:
    inner = CountingCredential(lifetime)
    cache = CachingCredential(inner)
    start = trio.current_time()
    seen = await read_for(cache, lifetime * 5, step=lifetime / 120)
    # one exchange per refresh period over five lifetimes, not one per call
    periods = lifetime * 5 / refresh_after
    assert len(inner.calls) == pytest.approx(periods, abs=1)
    assert len(seen) == len(inner.calls)
    gaps = [b - a for a, b in zip(inner.calls, inner.calls[1:], strict=False)]
    assert all(refresh_after - 1 <= g <= refresh_after + lifetime / 120 + 1 for g in gaps), gaps
    assert inner.calls[0] == start


async def test_hundred_concurrent_callers_share_one_exchange(autojump_clock) -> None:
    inner = CountingCredential(3600, delay=2.0)
    cache = CachingCredential(inner)
    results: list[str] = []

    async def one() -> None:
        results.append((await cache.get_token(SCOPE)).token)

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(one)
    assert len(inner.calls) == 1
    assert results == ["tok-1"] * 100


async def test_concurrent_callers_during_refresh_get_old_token_without_waiting(autojump_clock) -> None:
    inner = CountingCredential(60, delay=5.0)
    cache = CachingCredential(inner)
    assert (await cache.get_token(SCOPE)).token == "tok-1"
    await trio.sleep(55)  # past the refresh point (54 s), the old token still valid
    got: list[tuple[str, float]] = []

    async def one() -> None:
        t0 = trio.current_time()
        token = await cache.get_token(SCOPE)
        got.append((token.token, trio.current_time() - t0))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(one)
    assert len(inner.calls) == 2
    refresher = [g for g in got if g[0] == "tok-2"]
    others = [g for g in got if g[0] == "tok-1"]
    assert len(refresher) == 1 and len(others) == 9
    assert all(wait == 0 for _, wait in others)


async def test_separate_cache_per_scope(autojump_clock) -> None:
    inner = CountingCredential(3600)
    cache = CachingCredential(inner)
    a = await cache.get_token(SCOPE)
    b = await cache.get_token("https://managedhsm.azure.net/.default")
    assert a.token != b.token and len(inner.calls) == 2
    assert (await cache.get_token(SCOPE)).token == a.token


async def test_failed_refresh_keeps_old_token_and_waits_30s(autojump_clock, caplog) -> None:
    inner = CountingCredential(3600)
    cache = CachingCredential(inner)  # refresh 300 s before expiry, at 3300 s
    assert (await cache.get_token(SCOPE)).token == "tok-1"
    await trio.sleep(3301)
    inner.fail = AuthError("Entra ID unreachable", code="entra_unreachable", errno=errno.EIO)
    assert (await cache.get_token(SCOPE)).token == "tok-1"
    assert len(inner.calls) == 2
    assert any("entra_unreachable" in r.getMessage() for r in caplog.records)

    await trio.sleep(29)  # within the retry interval: no new attempt
    assert (await cache.get_token(SCOPE)).token == "tok-1"
    assert len(inner.calls) == 2
    await trio.sleep(2)  # retry interval over: one more attempt, still failing
    assert (await cache.get_token(SCOPE)).token == "tok-1"
    assert len(inner.calls) == 3

    inner.fail = None
    await trio.sleep(31)
    assert (await cache.get_token(SCOPE)).token == "tok-4"


async def test_errors_propagate_once_expired(autojump_clock) -> None:
    inner = CountingCredential(600)
    cache = CachingCredential(inner)
    await cache.get_token(SCOPE)
    inner.fail = AuthError("AADSTS70021: no matching FIC", code="AADSTS70021")
    await trio.sleep(601)
    with pytest.raises(AuthError) as exc:
        await cache.get_token(SCOPE)
    assert exc.value.code == "AADSTS70021" and exc.value.errno == errno.EACCES


async def test_first_failure_propagates_to_all_waiters_then_cools_down(autojump_clock) -> None:
    inner = CountingCredential(600, delay=1.0)
    inner.fail = AuthError("refused", code="AADSTS700016")
    cache = CachingCredential(inner, error_cooldown=5.0)
    codes: list[str] = []

    async def one() -> None:
        try:
            await cache.get_token(SCOPE)
        except AuthError as err:
            codes.append(err.code)

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)
    assert codes == ["AADSTS700016"] * 20 and len(inner.calls) == 1
    with pytest.raises(AuthError):
        await cache.get_token(SCOPE)  # within the cooldown: no new exchange
    assert len(inner.calls) == 1
    await trio.sleep(6)
    inner.fail = None
    assert (await cache.get_token(SCOPE)).token == "tok-2"


async def test_cancelled_refresher_hands_over(autojump_clock) -> None:
    inner = CountingCredential(600, delay=10.0)
    cache = CachingCredential(inner)
    got: list[str] = []

    async def follower() -> None:
        got.append((await cache.get_token(SCOPE)).token)

    async with trio.open_nursery() as nursery:
        with trio.move_on_after(1):  # the first caller gives up mid-exchange
            nursery.start_soon(follower)
            await cache.get_token(SCOPE)
    assert got == ["tok-2"]
    assert len(inner.calls) == 2


async def test_invalidate_and_aclose(autojump_clock) -> None:
    inner = CountingCredential(3600)
    cache = CachingCredential(inner)
    await cache.get_token(SCOPE)
    cache.invalidate(SCOPE)
    assert (await cache.get_token(SCOPE)).token == "tok-2"
    await cache.aclose()
    assert inner.closed


async def test_token_never_logged(autojump_clock, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    inner = CountingCredential(60)
    cache = CachingCredential(inner)
    await read_for(cache, 200, step=7)
    inner.fail = AuthError("x", code="c")
    await read_for(cache, 20, step=7)
    assert caplog.records
    for record in caplog.records:
        assert "tok-" not in record.getMessage()


@pytest.mark.parametrize("lifetime", [0.0, -30.0])
async def test_an_identity_provider_answering_expired_tokens_is_asked_once_a_minute(
    autojump_clock, caplog, lifetime: float
) -> None:
    """`expires_in: 0` (or less) must not cost one exchange per Key Vault request."""
    inner = CountingCredential(lifetime, issuer="Entra ID at https://login.example")
    cache = CachingCredential(inner)
    start = trio.current_time()
    seen: list[str] = []
    while trio.current_time() < start + 5 * EXPIRED_TOKEN_HOLD:
        seen.append((await cache.get_token(SCOPE)).token)
        cache.invalidate(SCOPE)  # as after Key Vault's 401: asking again at once would change nothing
        await trio.sleep(0.5)
    assert [call - start for call in inner.calls] == [n * EXPIRED_TOKEN_HOLD for n in range(5)]
    assert seen == [f"tok-{n + 1}" for n in range(5) for _ in range(int(EXPIRED_TOKEN_HOLD / 0.5))]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"Entra ID at https://login.example answered an access token that expires in {lifetime:.0f} s: kvfs uses"
        " each token for 60 s instead, so it asks at most once per 60 s; if Key Vault refuses the tokens, fix the"
        " identity provider's token lifetime"
    ]


async def test_a_short_lived_token_with_life_left_is_used_until_its_expiry_only(autojump_clock, caplog) -> None:
    """A 5 s token is honest: it is replaced before it expires, never held past it, and nothing is said."""
    inner = CountingCredential(5.0)
    cache = CachingCredential(inner)
    start = trio.current_time()
    while trio.current_time() < start + 20:
        token = await cache.get_token(SCOPE)
        assert trio.current_time() < inner.calls[int(token.token[4:]) - 1] + 5.0
        await trio.sleep(0.5)
    assert len(inner.calls) >= 20 / 5
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_failed_exchange_after_a_short_lived_token_cools_down(autojump_clock) -> None:
    inner = CountingCredential(0.0)
    cache = CachingCredential(inner, error_cooldown=5.0)
    await cache.get_token(SCOPE)
    inner.fail = AuthError("Entra ID unreachable", code="entra_unreachable", errno=errno.EIO)
    await trio.sleep(EXPIRED_TOKEN_HOLD)
    for _ in range(20):  # a read every second for 20 s: the held token is over, each read fails
        with pytest.raises(AuthError):
            await cache.get_token(SCOPE)
        await trio.sleep(1)
    assert len(inner.calls) == 1 + 4  # one exchange per 5 s cooldown, not one per read
    inner.fail = None
    await trio.sleep(5)
    assert (await cache.get_token(SCOPE)).token == "tok-6"


@pytest.mark.parametrize(
    ("lifetime", "margin"),
    [(86400.0, 300.0), (3600.0, 300.0), (600.0, 60.0), (60.0, 6.0), (20.0, 5.0), (4.0, 2.0)],
)
def test_refresh_margin_is_a_tenth_of_the_lifetime_within_bounds(lifetime: float, margin: float) -> None:
    from kvfs.auth.cache import refresh_margin_for

    assert refresh_margin_for(lifetime) == margin
