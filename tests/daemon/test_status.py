"""What a daemon reports about its objects: the event ring, and ObjectWatch fed by the real cache.

The watch is the cache's listener (kvfs.cache.base.CacheListener), so these tests run the real
Resolver over a fake vault and look at what the daemon would answer to `status` and `events`.
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Callable, Sequence
import random

import pytest
import trio
import trio.testing

from cache.fakevault import FakeVault, fake_render
from kvfs.cache.base import Version
from kvfs.cache.resolver import Resolver
from kvfs.config.model import AuthConfig, CloudConfig, MountConfig, ObjectSpec
from kvfs.daemon.events import MESSAGE_LIMIT, EventKind, EventRing
from kvfs.daemon.status import ObjectWatch
from kvfs.errors import KvfsError, VaultError
from kvfs.logsafe import register_secret

CLOUD = CloudConfig("AzurePublicCloud", "vault.azure.net", "https://vault.azure.net", "https://login.microsoftonline.com")
DB = ObjectSpec(name="db", type="secret", alias="conf/db-password")
API = ObjectSpec(name="api", type="secret")
HISTORY = ObjectSpec(name="cert", type="cert", version_history=2)


def watched(vault: FakeVault, *specs: ObjectSpec) -> tuple[Resolver, ObjectWatch, EventRing]:
    config = MountConfig(
        vault_name="demo", cloud=CLOUD, auth=AuthConfig(mode="service_principal"), objects=specs, refresh_interval=60.0
    )
    ring = EventRing()
    watch = ObjectWatch(specs, ring)
    return Resolver(vault, config, render=fake_render, rng=random.Random(1), listener=watch), watch, ring


def kinds(ring: EventRing, since: int = 0) -> list[tuple[str, ...]]:
    shown = []
    for event in ring.read(since)["events"]:
        keys = {"served": ("version",), "rotated": ("old_version", "new_version"), "read_failed": ("code", "errno")}
        shown.append((event["kind"], event["file"], *(str(event[k]) for k in keys[event["kind"]])))
    return shown


def test_the_ring_is_bounded_numbered_and_says_what_a_late_reader_missed() -> None:
    ring = EventRing(size=3)
    assert ring.read(0) == {"next": 1, "dropped": 0, "events": []}
    for i in range(5):
        ring.add(EventKind.SERVED, object=f"secret/s{i}", file=f"s{i}", version="v")
    assert [e["seq"] for e in ring.read(0)["events"]] == [3, 4, 5]
    assert ring.read(0)["dropped"] == 2 and ring.read(2)["dropped"] == 1 and ring.read(3)["dropped"] == 0
    assert ring.read(5)["events"][0]["file"] == "s4" and ring.read(5)["next"] == 6
    assert ring.read(6) == {"next": 6, "dropped": 0, "events": []}
    assert ring.read(99) == {"next": 6, "dropped": 0, "events": []}
    stamp = ring.read(5)["events"][0]["at"]
    assert stamp.endswith("Z") and stamp[4] == "-" and "T" in stamp


async def test_first_load_rotation_and_failures_become_status_and_events(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()
    first = vault.add("secret", "db", "one")
    resolver, watch, ring = watched(vault, DB, API)
    before = {o["file"]: o for o in watch.to_json()}
    assert before["conf/db-password"] == {
        "file": "conf/db-password", "object": "secret/db", "type": "secret", "history": 0,
        "version": None, "fetched_at": None, "refreshed_at": None, "error": None,
    }  # fmt: skip

    await resolver.current(DB)
    await resolver.current(DB)  # cached: no second event
    second = vault.add("secret", "db", "two")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(resolver.run_refresh)
        while resolver.peek(DB) is None or resolver.peek(DB).version != second:  # type: ignore[union-attr]
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert kinds(ring) == [("served", "conf/db-password", first), ("rotated", "conf/db-password", first, second)]

    for _ in range(3):  # the same failure, read after read: one event
        with pytest.raises(KvfsError):
            await resolver.current(API)
        await trio.sleep(10)  # past the error cooldown: each read asks Key Vault again
    vault.fail_only["api"] = VaultError("secret 'api': access denied", status=403, code="Forbidden")
    await trio.sleep(10)
    with pytest.raises(KvfsError):
        await resolver.current(API)
    assert kinds(ring, 3) == [("read_failed", "api", "SecretNotFound", "ENOENT"), ("read_failed", "api", "Forbidden", "EACCES")]

    status = {o["file"]: o for o in watch.to_json()}
    assert status["conf/db-password"]["version"] == second and status["conf/db-password"]["error"] is None
    assert status["conf/db-password"]["fetched_at"] <= status["conf/db-password"]["refreshed_at"]
    assert status["api"]["version"] is None
    assert status["api"]["error"]["code"] == "Forbidden" and status["api"]["error"]["errno"] == "EACCES"
    assert status["api"]["error"]["message"] == "secret 'api': access denied"


async def test_a_failed_refresh_is_status_not_a_read_failure_and_success_clears_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()
    version = vault.add("secret", "db", "one")
    resolver, watch, ring = watched(vault, DB)
    await resolver.current(DB)
    vault.fail = VaultError("Key Vault is throttling", status=429, code="Throttled")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(resolver.run_refresh)
        while watch.to_json()[0]["error"] is None:
            await trio.sleep(1)
        assert watch.to_json()[0]["error"]["code"] == "Throttled"
        assert watch.to_json()[0]["version"] == version  # still served
        vault.fail = None
        while watch.to_json()[0]["error"] is not None:
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert kinds(ring) == [("served", "conf/db-password", version)]  # readers never failed


async def test_a_history_folder_reports_its_newest_version(autojump_clock: trio.testing.MockClock) -> None:
    vault = FakeVault()
    oldest = vault.add("cert", "cert", "a")
    newest = vault.add("cert", "cert", "b")
    resolver, watch, ring = watched(vault, HISTORY)
    assert [v.version for v in await resolver.history(HISTORY)][0] == newest
    assert kinds(ring) == [("served", "cert", newest)]
    assert watch.to_json()[0]["history"] == 2 and watch.to_json()[0]["version"] == newest
    assert ring.read(0)["events"][0]["versions"] == [newest, oldest]  # every entry of the folder, 0 first
    vault.objects[("cert", "cert")][0].enabled = False  # the folder changes, its newest entry does not
    async with trio.open_nursery() as nursery:
        nursery.start_soon(resolver.run_refresh)
        while not ring.read(2)["events"]:
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    rotated = ring.read(2)["events"]
    assert [(e["kind"], e["old_version"], e["new_version"], e["versions"]) for e in rotated] == [
        ("rotated", newest, newest, [newest])
    ]


def test_no_value_or_token_reaches_status_or_events() -> None:
    """Messages are safe by contract; registered secrets are masked again, and long ones clipped."""
    ring = EventRing()
    watch = ObjectWatch((API,), ring)
    register_secret("hunter2-the-client-secret")
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    error = VaultError(f"bad: hunter2-the-client-secret {token} " + "x" * 1000, status=401, code="Unauthorized")
    watch.failed(API, error, background=False)
    shown = json.dumps([ring.read(0), watch.to_json()])
    assert "hunter2" not in shown and token not in shown
    assert len(ring.read(0)["events"][0]["message"]) == MESSAGE_LIMIT


async def test_a_failing_listener_never_fails_a_read(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, expect_logs: Callable[..., None]
) -> None:
    expect_logs(r"cache listener failed", level=logging.ERROR)
    expect_logs(r"cache listener failed again", level=logging.DEBUG)

    class Broken:
        def fetched(self, spec: ObjectSpec, version: Version | None, history: Sequence[Version] = ()) -> None:
            raise RuntimeError("listener bug")

        def failed(self, spec: ObjectSpec, error: KvfsError, *, background: bool) -> None:
            raise RuntimeError("listener bug")

    vault = FakeVault()
    vault.add("secret", "db", "one")
    config = MountConfig(vault_name="demo", cloud=CLOUD, auth=AuthConfig(mode="service_principal"), objects=(DB, API))
    resolver = Resolver(vault, config, render=fake_render, listener=Broken())
    with caplog.at_level(logging.DEBUG, logger="kvfs.cache.loader"):
        assert (await resolver.current(DB)).files[""] == b"one"
        with pytest.raises(KvfsError) as info:
            await resolver.current(API)
    assert info.value.errno == errno.ENOENT  # the vault's answer, not the listener's failure
    tracebacks = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(tracebacks) == 1 and "listener" in tracebacks[0].getMessage()
