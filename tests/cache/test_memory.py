"""The per-volume cache limit: the bytes a daemon holds stay bounded, whatever the kernel remembers.

The real cache over the fake vault, and the file tree over it; bytes held are counted from the
live `Version` objects themselves (gc), not from the cache's own bookkeeping.
"""

from __future__ import annotations

import gc
import logging
import os
import random

import pytest
import trio
import trio.testing

from cache.fakevault import FakeVault, fake_render
from kvfs.cache.base import Version
from kvfs.cache.resolver import Resolver
from kvfs.cache.store import size_of
from kvfs.config.model import DEFAULT_CACHE_LIMIT, AuthConfig, CloudConfig, MountConfig, ObjectSpec
from kvfs.fs.core import FilesystemCore
from kvfs.fs.tree import ROOT_INODE

KIB = 1024
LIMIT = 10 * KIB
CLOUD = CloudConfig(
    "AzurePublicCloud", "vault.azure.net", "https://vault.azure.net", "https://login.microsoftonline.com"
)
SPECS = tuple(ObjectSpec(name=f"o{i}", type="secret") for i in range(10))


def config(*specs: ObjectSpec, limit: int = LIMIT, refresh: float = 60.0) -> MountConfig:
    return MountConfig(
        vault_name="demo",
        cloud=CLOUD,
        auth=AuthConfig(mode="service_principal"),
        objects=specs or SPECS,
        refresh_interval=refresh,
        cache_limit=limit,
    )


def vault_of(size: int = 3 * KIB) -> FakeVault:
    """o0 … o9, each `size` bytes of a distinct letter."""
    vault = FakeVault()
    for i, spec in enumerate(SPECS):
        vault.add("secret", spec.name, chr(ord("a") + i) * size)
    return vault


def make(vault: FakeVault, cfg: MountConfig) -> Resolver:
    return Resolver(vault, cfg, render=fake_render, rng=random.Random(1))


def live_bytes() -> int:
    """Bytes of every rendered version still alive in this process, whoever holds it."""
    gc.collect()
    return size_of(o for o in gc.get_objects() if isinstance(o, Version))


def test_the_default_limit_is_64_mib() -> None:
    assert DEFAULT_CACHE_LIMIT == 64 * 1024 * 1024 == config(limit=DEFAULT_CACHE_LIMIT).cache_limit


async def test_the_cache_keeps_at_most_its_limit_forgetting_the_least_recently_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = vault_of()
    cache = make(vault, config())
    for spec in SPECS:
        await cache.current(spec)
        assert cache.kept_bytes <= LIMIT
    assert [spec.name for spec in SPECS if cache.peek(spec) is not None] == ["o7", "o8", "o9"]
    assert cache.kept_bytes == 9 * KIB and cache.statistics.evictions == 7
    assert live_bytes() <= LIMIT  # nothing else holds the evicted ones
    await cache.current(SPECS[7])  # read again: now the most recent
    assert (await cache.current(SPECS[0])).files[""] == b"a" * 3 * KIB  # evicted: fetched again
    assert vault.calls["get:o0:latest"] == 2 and vault.calls["get:o7:latest"] == 1
    assert [spec.name for spec in SPECS if cache.peek(spec) is not None] == ["o0", "o7", "o9"]


async def test_evicted_objects_are_not_refreshed_and_refreshes_do_not_count_as_reads(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = vault_of()
    cache = make(vault, config(refresh=10.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run_refresh)
        for spec in SPECS[:4]:
            await cache.current(spec)  # o0 is evicted by o3
        await cache.current(SPECS[1])  # read order now o2, o3, o1
        await trio.sleep(35)
        assert vault.calls["get:o0:latest"] == 1  # no longer refreshed
        assert vault.calls["get:o1:latest"] >= 4 and vault.calls["get:o2:latest"] >= 4
        await cache.current(SPECS[4])  # evicts the least recently *read* (o2), not the least refreshed
        assert [spec.name for spec in SPECS if cache.peek(spec) is not None] == ["o1", "o3", "o4"]
        await cache.current(SPECS[0])  # read again: fetched, and refreshed from now on
        await trio.sleep(10.5)
        assert vault.calls["get:o0:latest"] == 3
        nursery.cancel_scope.cancel()


async def test_an_object_larger_than_the_limit_is_served_kept_alone_and_logged_once(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kvfs.cache")
    vault = vault_of()
    big = ObjectSpec(name="big", type="secret")
    vault.add("secret", "big", "B" * 4 * LIMIT)
    cache = make(vault, config(big, *SPECS))
    await cache.current(SPECS[0])
    assert (await cache.current(big)).files[""] == b"B" * 4 * LIMIT  # served, never refused
    assert cache.peek(big) is not None and cache.peek(SPECS[0]) is None  # kept alone
    assert cache.kept_bytes == 4 * LIMIT
    await cache.current(SPECS[1])  # the next read evicts it: it is the least recent
    assert cache.peek(big) is None and cache.kept_bytes == 3 * KIB
    await cache.current(big)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "object=secret/big takes 40 KiB, more than the cache limit of 10 KiB: served, and kept alone"
        " while it is the most recently read (other objects are dropped from memory while it is kept, and fetched again"
        " when read)"
    ]


async def test_a_history_folder_over_the_limit_is_logged_with_how_many_versions_fit(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A long history of large versions is what outgrows the limit: the fix is fewer versions."""
    caplog.set_level(logging.INFO, logger="kvfs.cache")
    vault = vault_of()
    bundle = ObjectSpec(name="bundle", type="secret", version_history=8)
    for letter in "abcdefgh":
        vault.add("secret", "bundle", letter * 4 * KIB)
    cache = make(vault, config(bundle, *SPECS))
    assert len(await cache.history(bundle)) == 8  # served, never refused
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "object=secret/bundle takes 32 KiB, more than the cache limit of 10 KiB: served, and kept alone"
        " while it is the most recently read (lower its objectVersionHistory, now 8: about 2 versions of this"
        " size fit)"
    ]


async def test_inodes_the_kernel_remembers_do_not_hold_bytes(autojump_clock: trio.testing.MockClock) -> None:
    """The file tree keeps size, mtime and xattrs of every inode, and bytes only of open files."""
    vault = vault_of()
    cfg = config()
    core = FilesystemCore(cfg, make(vault, cfg))
    inodes = [(await core.lookup(ROOT_INODE, spec.name)).inode for spec in SPECS]  # never forgotten
    assert live_bytes() <= LIMIT  # was 30 KiB: every looked-up version stayed in the tree
    for inode in inodes:
        attr = await core.getattr(inode)
        assert attr.size == 3 * KIB and attr.mtime_ns > 0  # without the bytes, without a fetch
    assert len(await core.listxattr(inodes[0])) == 6
    assert vault.calls["get"] == 10

    fh = await core.open(inodes[0], os.O_RDONLY)  # evicted: its bytes are fetched again
    assert vault.calls["get:o0:latest"] == 2
    for spec in SPECS[1:]:
        await core.lookup(ROOT_INODE, spec.name)  # evicts o0 again: the open file keeps its bytes
    assert live_bytes() <= LIMIT + 3 * KIB  # the limit, plus what is open
    assert await core.read(fh, 0, 4 * KIB) == b"a" * 3 * KIB
    core.release(fh)
    assert live_bytes() <= LIMIT


async def test_open_of_an_evicted_inode_whose_name_moved_on_reads_the_new_version(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = vault_of()
    cfg = config()
    core = FilesystemCore(cfg, make(vault, cfg))
    old = (await core.lookup(ROOT_INODE, "o0")).inode
    for spec in SPECS[1:4]:
        await core.lookup(ROOT_INODE, spec.name)  # evicts o0
    vault.add("secret", "o0", "rotated")
    fh = await core.open(old, os.O_RDONLY)  # as through a bind mount (subPath) made on the old inode
    assert await core.read(fh, 0, 100) == b"rotated"
    assert core.direct_io(fh)  # the old inode's page cache holds other bytes
    assert (await core.getattr(old)).size == len(b"rotated")
    new = (await core.lookup(ROOT_INODE, "o0")).inode
    assert new != old
    assert await core.read(await core.open(new, os.O_RDONLY), 0, 100) == b"rotated"
