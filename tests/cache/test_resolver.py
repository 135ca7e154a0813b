"""Resolver against an in-memory fake vault, under MockClock (autojump): caching, refresh, history."""

from __future__ import annotations

import errno
import logging
import random
from collections import Counter
from typing import Any

import pytest
import trio
import trio.testing

from cache.fakevault import FakeVault, fake_render
from kvfs.cache.base import Version
from kvfs.cache.resolver import Resolver
from kvfs.config.model import AuthConfig, CloudConfig, MountConfig, ObjectSpec
from kvfs.errors import VaultError

CLOUD = CloudConfig(
    "AzurePublicCloud", "vault.azure.net", "https://vault.azure.net", "https://login.microsoftonline.com"
)


def config(
    *specs: ObjectSpec, refresh: float = 60.0, max_staleness: float = 0.0, split: bool = False
) -> MountConfig:
    return MountConfig(
        vault_name="demo",
        cloud=CLOUD,
        auth=AuthConfig(mode="service_principal"),
        objects=specs,
        refresh_interval=refresh,
        max_staleness=max_staleness,
        split_cert_key=split,
    )


SECRET = ObjectSpec(name="db", type="secret")
THROTTLED = VaultError("secret 'db': vault is throttling", status=429, code="Throttled")


class Changes:
    def __init__(self) -> None:
        self.seen: list[tuple[ObjectSpec, Version]] = []

    async def __call__(self, spec: ObjectSpec, version: Version) -> None:
        self.seen.append((spec, version))


def make(vault: FakeVault, cfg: MountConfig, **kw: Any) -> Resolver:
    return Resolver(vault, cfg, render=fake_render, rng=random.Random(5), **kw)


# -- current() --------------------------------------------------------------------------------


async def test_current_fetches_latest_and_renders(autojump_clock: trio.testing.MockClock) -> None:
    vault = FakeVault()
    vault.add("secret", "db", "old")
    v2 = vault.add("secret", "db", "new")
    resolver = make(vault, config(SECRET, split=True))
    got = await resolver.current(SECRET)
    assert got.version == v2 and got.files[""] == b"new" and got.files[".key"] == b"key:new"
    assert (got.kv_id, got.content_type, got.created, got.expires) == (
        f"https://demo.vault.azure.net/secrets/db/{v2}",
        "text/plain",
        20,
        99,
    )
    assert resolver.peek(SECRET) is got
    assert "new" not in repr(got)  # file bytes never in reprs


async def test_hundred_concurrent_readers_share_one_fetch(autojump_clock: trio.testing.MockClock) -> None:
    vault = FakeVault()
    vault.add("secret", "db", "v")
    vault.latency = 1.0
    resolver = make(vault, config(SECRET))
    results: list[Version] = []

    async def read() -> None:
        results.append(await resolver.current(SECRET))

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(read)
    assert vault.calls["get"] == 1
    assert len(results) == 100 and all(r is results[0] for r in results)


async def test_cached_read_never_awaits_the_network(autojump_clock: trio.testing.MockClock) -> None:
    vault = FakeVault()
    vault.add("secret", "db", "v")
    resolver = make(vault, config(SECRET))
    first = await resolver.current(SECRET)
    vault.latency = 1000.0  # any network call would now visibly advance the clock
    vault.fail = THROTTLED
    start = trio.current_time()
    for _ in range(10):
        assert await resolver.current(SECRET) is first
    assert trio.current_time() == start
    assert vault.calls["get"] == 1
    assert resolver.statistics.hits == 10


async def test_errors_reach_every_waiter_and_are_remembered_briefly(autojump_clock: trio.testing.MockClock) -> None:
    vault = FakeVault()
    vault.add("secret", "db", "v")
    vault.latency = 1.0
    vault.fail = THROTTLED
    resolver = make(vault, config(SECRET))
    errors: list[BaseException] = []

    async def read() -> None:
        try:
            await resolver.current(SECRET)
        except VaultError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(read)
    assert len(errors) == 5 and vault.calls["get"] == 1 and errors[0].errno == errno.EIO
    assert resolver.peek(SECRET) is None
    vault.fail = None
    # Within the cooldown the failure is answered from memory, without another request.
    with pytest.raises(VaultError):
        await resolver.current(SECRET)
    assert vault.calls["get"] == 1
    await trio.sleep(5.1)
    assert (await resolver.current(SECRET)).files[""] == b"v"
    assert vault.calls["get"] == 2


async def test_first_failure_logged_once_per_object(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kvfs.cache")
    vault = FakeVault()
    vault.add("secret", "db", "topsecret-value")
    vault.fail = VaultError(
        "secret 'db': access denied", status=403, code="Forbidden", inner_code="ForbiddenByRbac"
    )
    resolver = make(vault, config(SECRET))
    for _ in range(5):
        with pytest.raises(VaultError):
            await resolver.current(SECRET)
        await trio.sleep(6)  # past the error cooldown: each read really asks Key Vault
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "secret/db" in warnings[0].getMessage() and "ForbiddenByRbac" in warnings[0].getMessage()
    assert resolver.statistics.errors["ForbiddenByRbac"] == 5
    vault.fail = None
    await resolver.current(SECRET)
    assert "topsecret-value" not in caplog.text


async def test_cancelled_leader_does_not_fail_the_waiters(autojump_clock: trio.testing.MockClock) -> None:
    vault = FakeVault()
    vault.add("secret", "db", "v")
    vault.latency = 5.0
    resolver = make(vault, config(SECRET))
    got: list[Version] = []

    async def waiter() -> None:
        await trio.sleep(1)
        got.append(await resolver.current(SECRET))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        with trio.move_on_after(2):  # the leader gives up (e.g. an interrupted read)
            await resolver.current(SECRET)
    assert len(got) == 1 and got[0].files[""] == b"v"
    assert vault.calls["get"] == 2


async def test_pinned_version_fetched_by_id_and_never_refreshed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()
    v1 = vault.add("secret", "db", "one")
    vault.add("secret", "db", "two")
    pinned = ObjectSpec(name="db", type="secret", version=v1.upper())
    resolver = make(vault, config(pinned, refresh=10, max_staleness=5))
    async with trio.open_nursery() as nursery:
        await nursery.start(resolver.run_refresh)
        assert (await resolver.current(pinned)).files[""] == b"one"
        await trio.sleep(100)
        assert (await resolver.current(pinned)).files[""] == b"one"  # beyond max_staleness: immutable
        nursery.cancel_scope.cancel()
    assert vault.calls["get"] == 1 and vault.calls[f"get:db:{v1.upper()}"] == 1


# -- refresh ----------------------------------------------------------------------------------


async def test_refresh_picks_up_new_version_and_calls_on_change(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()
    vault.add("secret", "db", "one")
    unread = ObjectSpec(name="other", type="secret")
    vault.add("secret", "other", "x")
    changes = Changes()
    resolver = make(vault, config(SECRET, unread, refresh=60), on_change=changes)
    async with trio.open_nursery() as nursery:
        await nursery.start(resolver.run_refresh)
        first = await resolver.current(SECRET)
        await trio.sleep(61)
        assert changes.seen == [] and vault.calls["get:db:latest"] == 2  # refreshed, unchanged
        v2 = vault.add("secret", "db", "two")
        await trio.sleep(60)
        assert len(changes.seen) == 1
        spec, new = changes.seen[0]
        assert spec == SECRET and new.version == v2 and new.files[""] == b"two"
        assert (await resolver.current(SECRET)) is new and first.files[""] == b"one"
        nursery.cancel_scope.cancel()
    assert vault.calls["get:other:latest"] == 0  # never read → never fetched


async def test_object_read_during_sleep_is_refreshed_within_one_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()
    vault.add("secret", "db", "one")
    late = ObjectSpec(name="late", type="secret")
    vault.add("secret", "late", "a")
    changes = Changes()
    resolver = make(vault, config(SECRET, late, refresh=60), on_change=changes)
    async with trio.open_nursery() as nursery:
        await nursery.start(resolver.run_refresh)
        await resolver.current(SECRET)
        await trio.sleep(50)
        await resolver.current(late)  # t=50: due at 110, although the loop planned to wake at 60
        vault.add("secret", "late", "b")
        await trio.sleep(61)
        assert [v.files[""] for _, v in changes.seen] == [b"b"]
        nursery.cancel_scope.cancel()


async def test_volumes_started_together_do_not_refresh_together(autojump_clock: trio.testing.MockClock) -> None:
    """A rollout's 50 pods read the same object at the same moment: their volumes' refreshes spread
    over half an interval instead of hitting the vault as one burst every interval, and each volume
    still refreshes within one interval of its last fetch (a new version shows within one)."""
    interval = 120.0
    vaults = [FakeVault() for _ in range(50)]
    for vault in vaults:
        vault.add("secret", "db", "one")
    volumes = [
        Resolver(vault, config(SECRET, refresh=interval), render=fake_render, rng=random.Random(seed))
        for seed, vault in enumerate(vaults)
    ]  # each daemon has its own random generator
    async with trio.open_nursery() as nursery:
        for volume in volumes:
            await nursery.start(volume.run_refresh)
        for volume in volumes:
            await volume.current(SECRET)  # all at t=0
        await trio.sleep(interval * 5 + 1)
        nursery.cancel_scope.cancel()
    first = sorted(vault.get_times["db"][1] for vault in vaults)
    assert interval / 2 <= first[0] and first[-1] <= interval
    assert first[-1] - first[0] >= interval / 3  # spread, not in step
    assert max(Counter(int(t) for t in first).values()) <= 4  # no second sees more than 4 of the 50
    for vault in vaults:
        gaps = [b - a for a, b in zip(vault.get_times["db"][1:], vault.get_times["db"][2:], strict=False)]
        assert gaps and all(0.9 * interval <= gap <= interval for gap in gaps)


async def test_refresh_failure_serves_stale_backs_off_and_recovers(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="kvfs.cache")
    vault = FakeVault()
    vault.add("secret", "db", "one")
    changes = Changes()
    interval = 60.0
    resolver = make(vault, config(SECRET, refresh=interval), on_change=changes)
    async with trio.open_nursery() as nursery:
        await nursery.start(resolver.run_refresh)
        await resolver.current(SECRET)
        vault.fail = THROTTLED
        v2 = vault.add("secret", "db", "two")
        await trio.sleep(interval * 20)  # a long outage
        gets_during_outage = vault.calls["get"] - 1
        # Backoff grows to the interval: far fewer tries than constant retrying, at least one per interval.
        assert 19 <= gets_during_outage <= 19 + 12
        start = trio.current_time()
        assert (await resolver.current(SECRET)).files[""] == b"one"  # stale bytes, no wait
        assert trio.current_time() == start
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
        vault.fail = None
        recovered_at = trio.current_time()
        while not changes.seen:
            await trio.sleep(1)
        assert trio.current_time() - recovered_at <= interval + 1
        assert changes.seen[0][1].version == v2
        nursery.cancel_scope.cancel()
    assert resolver.statistics.refresh_failures == gets_during_outage


async def test_refresh_honours_retry_after(autojump_clock: trio.testing.MockClock) -> None:
    vault = FakeVault()
    vault.add("secret", "db", "one")
    resolver = make(vault, config(SECRET, refresh=60))
    async with trio.open_nursery() as nursery:
        await nursery.start(resolver.run_refresh)
        await resolver.current(SECRET)
        vault.fail = VaultError("throttled", status=429, code="Throttled", retry_after=45.0)
        await trio.sleep(60.5)  # the first refresh (within one interval) fails
        (failed_at,) = vault.get_times["db"][1:]
        await trio.sleep_until(failed_at + 44.5)
        assert len(vault.get_times["db"]) == 2  # not yet
        await trio.sleep_until(failed_at + 45.5)
        assert vault.get_times["db"][2:] == [failed_at + 45]
        nursery.cancel_scope.cancel()


async def test_refresh_interval_zero_never_refreshes(autojump_clock: trio.testing.MockClock) -> None:
    vault = FakeVault()
    vault.add("secret", "db", "one")
    resolver = make(vault, config(SECRET, refresh=0))
    async with trio.open_nursery() as nursery:
        await nursery.start(resolver.run_refresh)
        await resolver.current(SECRET)
        await trio.sleep(10_000)
    assert vault.calls["get"] == 1


async def test_max_staleness_bounds_serving_stale(autojump_clock: trio.testing.MockClock) -> None:
    vault = FakeVault()
    vault.add("secret", "db", "one")
    resolver = make(vault, config(SECRET, refresh=0, max_staleness=30))
    first = await resolver.current(SECRET)
    vault.fail = THROTTLED
    await trio.sleep(20)
    assert await resolver.current(SECRET) is first  # within the bound: cached, no fetch
    assert vault.calls["get"] == 1
    await trio.sleep(11)
    assert resolver.peek(SECRET) is None
    with pytest.raises(VaultError):
        await resolver.current(SECRET)  # too old: behaves as uncached
    vault.fail = None
    await trio.sleep(6)  # past the error cooldown
    assert (await resolver.current(SECRET)).files[""] == b"one"
    assert vault.calls["get"] == 3


# -- history ----------------------------------------------------------------------------------


def history_vault() -> tuple[FakeVault, list[str]]:
    vault = FakeVault()
    ids = [
        vault.add("secret", "db", "v1", created=100),
        vault.add("secret", "db", "v2", created=200),
        vault.add("secret", "db", "v3-disabled", created=300, enabled=False),
        vault.add("secret", "db", "v4", created=400),
        vault.add("secret", "db", "v5-no-attributes", created=450, attributes=False),
        vault.add("secret", "db", "v6", created=500),
    ]
    return vault, ids


async def test_history_exactly_n_newest_first_skipping_disabled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault, ids = history_vault()
    spec = ObjectSpec(name="db", type="secret", version_history=3)
    resolver = make(vault, config(spec))
    versions = await resolver.history(spec)
    assert [v.files[""] for v in versions] == [b"v6", b"v4", b"v2"]  # N, not N+1 as upstream writes
    assert [v.version for v in versions] == [ids[5], ids[3], ids[1]]
    assert vault.calls["list"] == 1 and vault.calls["get"] == 3
    assert await resolver.history(spec) == versions  # cached
    assert vault.calls["list"] == 1 and vault.calls["get"] == 3


async def test_history_with_fewer_versions_than_n(autojump_clock: trio.testing.MockClock) -> None:
    vault, _ = history_vault()
    spec = ObjectSpec(name="db", type="secret", version_history=10)
    assert [v.files[""] for v in await make(vault, config(spec)).history(spec)] == [
        b"v6",
        b"v4",
        b"v2",
        b"v1",
    ]


@pytest.mark.parametrize("start", ["", "latest"])
async def test_history_latest_starts_at_newest(start: str, autojump_clock: trio.testing.MockClock) -> None:
    vault, _ = history_vault()
    spec = ObjectSpec(name="db", type="secret", version=start, version_history=2)
    assert [v.files[""] for v in await make(vault, config(spec)).history(spec)] == [b"v6", b"v4"]


async def test_history_starts_at_the_given_version(autojump_clock: trio.testing.MockClock) -> None:
    vault, ids = history_vault()
    spec = ObjectSpec(name="db", type="secret", version=ids[3], version_history=2)
    assert [v.files[""] for v in await make(vault, config(spec)).history(spec)] == [b"v4", b"v2"]


@pytest.mark.parametrize("which", ["disabled", "unknown"])
async def test_history_unknown_start_version_is_enoent(
    which: str, autojump_clock: trio.testing.MockClock
) -> None:
    vault, ids = history_vault()
    version = ids[2] if which == "disabled" else "f" * 32
    spec = ObjectSpec(name="db", type="secret", version=version, version_history=2)
    with pytest.raises(VaultError) as caught:
        await make(vault, config(spec)).history(spec)
    err = caught.value
    assert err.status == 404 and err.errno == errno.ENOENT
    assert version in str(err) and "objectVersion" in str(err)


async def test_history_fetches_concurrently_with_a_cap(autojump_clock: trio.testing.MockClock) -> None:
    vault = FakeVault()
    for i in range(8):
        vault.add("secret", "db", f"v{i}")
    vault.latency = 1.0
    spec = ObjectSpec(name="db", type="secret", version_history=8)
    resolver = make(vault, config(spec), max_concurrency=4)
    start = trio.current_time()
    assert len(await resolver.history(spec)) == 8
    assert trio.current_time() - start == pytest.approx(1.0 + 2.0)  # list, then 8 gets 4 at a time


async def test_history_refresh_notices_a_new_version(autojump_clock: trio.testing.MockClock) -> None:
    vault, _ = history_vault()
    spec = ObjectSpec(name="db", type="secret", version_history=2)
    changes = Changes()
    resolver = make(vault, config(spec, refresh=60), on_change=changes)
    async with trio.open_nursery() as nursery:
        await nursery.start(resolver.run_refresh)
        await resolver.history(spec)
        gets = vault.calls["get"]
        vault.add("secret", "db", "v7", created=600)
        await trio.sleep(61)
        assert [v.files[""] for v in await resolver.history(spec)] == [b"v7", b"v6"]
        assert vault.calls["get"] == gets + 1  # v6 reused from cache (immutable)
        assert len(changes.seen) == 1 and changes.seen[0][1].files[""] == b"v7"
        nursery.cancel_scope.cancel()


async def test_history_same_second_versions_listed_later_are_newer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()
    vault.list_in_creation_order = True
    for value in ("a", "b", "c"):
        vault.add("secret", "db", value, created=1000)  # all within one second
    spec = ObjectSpec(name="db", type="secret", version_history=2)
    assert [v.files[""] for v in await make(vault, config(spec)).history(spec)] == [b"c", b"b"]


# -- each object on its own (refresh scheduling, Retry-After clamp, failure logs) -------------


async def test_a_throttled_object_does_not_delay_another_objects_refresh(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()
    vault.add("secret", "db", "one")
    slow = ObjectSpec(name="slow", type="secret")
    vault.add("secret", "slow", "x")
    resolver = make(vault, config(SECRET, slow, refresh=10))
    async with trio.open_nursery() as nursery:
        await nursery.start(resolver.run_refresh)
        await resolver.current(SECRET)
        await resolver.current(slow)
        # From now on every request for `slow` hangs (retries against a throttling vault) until
        # the load deadline gives up on it, far longer than the refresh interval.
        vault.latency_only["slow"] = 1000.0
        await trio.sleep(75)
        nursery.cancel_scope.cancel()
    times = vault.get_times["db"]
    assert times[0] == 0 and 5 <= times[1] <= 10 and len(times) >= 8  # every 9-10 s after a first within 10 s
    assert all(9 <= later - earlier <= 10 for earlier, later in zip(times[1:], times[2:], strict=False))
    slow_times = vault.get_times["slow"]
    assert slow_times[0] == 0 and 5 <= slow_times[1] <= 10
    assert all(later - earlier >= 28 for earlier, later in zip(slow_times[1:], slow_times[2:], strict=False))  # stuck
    assert resolver.statistics.refresh_failures >= 2


async def test_background_retry_after_is_clamped_to_the_refresh_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()
    vault.add("secret", "db", "one")
    changes = Changes()
    resolver = make(vault, config(SECRET, refresh=60), on_change=changes)
    async with trio.open_nursery() as nursery:
        await nursery.start(resolver.run_refresh)
        await resolver.current(SECRET)
        vault.fail = VaultError("throttled", status=429, code="Throttled", retry_after=999_999_999.0)
        await trio.sleep(60.5)  # the first refresh (within one interval) fails and asks for 31 years
        (failed_at,) = vault.get_times["db"][1:]
        vault.fail = None
        v2 = vault.add("secret", "db", "two")
        await trio.sleep_until(failed_at + 60.5)  # retried one interval later, not in 31 years
        assert vault.get_times["db"] == [0, failed_at, failed_at + 60]
        assert [v.version for _, v in changes.seen] == [v2]
        nursery.cancel_scope.cancel()


async def test_failure_is_logged_again_when_its_cause_changes(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kvfs.cache")
    vault = FakeVault()
    vault.add("secret", "db", "v")
    resolver = make(vault, config(SECRET))
    forbidden = VaultError("secret 'db': access denied", status=403, code="Forbidden", inner_code="ForbiddenByRbac")
    causes = [forbidden, forbidden, THROTTLED, THROTTLED, forbidden]
    for cause in causes:
        vault.fail = cause
        with pytest.raises(VaultError):
            await resolver.current(SECRET)
        await trio.sleep(6)  # past the error cooldown: each read really asks Key Vault
    vault.fail = None
    await resolver.current(SECRET)
    lines = [r.getMessage() for r in caplog.records]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w.split(":")[0] for w in warnings] == [
        "object=secret/db code=ForbiddenByRbac",
        "object=secret/db code=Throttled",
        "object=secret/db code=ForbiddenByRbac",
    ]
    assert lines[-1] == "object=secret/db fetched again after failures"
