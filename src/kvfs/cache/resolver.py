"""Resolver: the object cache the file tree reads through (kvfs.cache.base.ObjectCache).

Why: fetching every object for every pod at every poll, as the upstream provider does, makes
Key Vault throttle. kvfs fetches an object when it is first read, lets concurrent readers
share one request, serves cached bytes without touching the network, refreshes only what was
read, and keeps serving the last good bytes while Key Vault is unreachable (optionally bounded
by `max_staleness`). The work is split by job:

- `VersionStore` (store.py): immutable renders and what each object shows; no I/O;
- `Loader` (loader.py): Key Vault → store, single-flighted, deadline, cooldown, failure logs;
- `RefreshScheduler` (refresh.py): re-fetches each read object on its own schedule.
"""

from __future__ import annotations

import random

from kvfs.cache.base import CacheListener, CacheStats, OnChange, VaultReader, Version
from kvfs.cache.loader import Loader, Target
from kvfs.cache.refresh import RefreshScheduler
from kvfs.cache.store import RenderFn, VersionStore
from kvfs.config.model import MountConfig, ObjectSpec
from kvfs.net.deadlines import ERROR_COOLDOWN, LOAD_DEADLINE

import trio


class Resolver:
    """Answers "what bytes does this object show now" for the file tree."""

    def __init__(
        self,
        client: VaultReader,
        config: MountConfig,
        *,
        render: RenderFn | None = None,
        on_change: OnChange | None = None,
        listener: CacheListener | None = None,
        max_concurrency: int = 16,
        deadline: float = LOAD_DEADLINE,
        error_cooldown: float = ERROR_COOLDOWN,
        rng: random.Random | None = None,
    ) -> None:
        if render is None:
            from kvfs.vault.render import render_object

            render = render_object
        self.statistics = CacheStats()
        self._store = VersionStore(config, render, on_evict=self._evicted)
        self._scheduler: RefreshScheduler[Target] = RefreshScheduler(
            config.refresh_interval, self._refresh, rng=rng
        )
        self._loader = Loader(
            client,
            self._store,
            self.statistics,
            on_loaded=self._scheduler.loaded,
            on_change=on_change,
            listener=listener,
            max_concurrency=max_concurrency,
            deadline=deadline,
            error_cooldown=error_cooldown,
        )

    def peek(self, spec: ObjectSpec) -> Version | None:
        """The cached current version, if any (and within max_staleness); never fetches."""
        return self._store.current(spec)

    def peek_history(self, spec: ObjectSpec) -> list[Version] | None:
        """The cached history folder's versions, if any (and within max_staleness); never fetches."""
        return self._store.history(spec)

    async def current(self, spec: ObjectSpec) -> Version:
        """The version `spec` shows now; cached reads return without awaiting the network."""
        cached = self._store.current(spec)
        if cached is not None:
            self.statistics.hits += 1
            return cached
        return await self._loader.current(spec)

    async def history(self, spec: ObjectSpec) -> list[Version]:
        """Exactly `spec.version_history` versions (fewer if fewer exist), newest first."""
        cached = self._store.history(spec)
        if cached is not None:
            self.statistics.hits += 1
            return cached
        return await self._loader.history(spec)

    @property
    def kept_bytes(self) -> int:
        """Bytes of rendered versions the cache holds (at most `MountConfig.cache_limit`, see store.py)."""
        return self._store.kept_bytes

    def _evicted(self, spec: ObjectSpec) -> None:
        """An evicted object is no longer refreshed; its next read fetches (and re-arms) it."""
        self.statistics.evictions += 1
        self._scheduler.forget(Target(spec, history=False))
        self._scheduler.forget(Target(spec, history=True))

    async def _refresh(self, target: Target) -> None:
        try:
            await self._loader.refresh(target)
        except Exception:
            self.statistics.refresh_failures += 1
            raise
        self.statistics.refreshes += 1

    async def run_refresh(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forever: re-fetch what was read, when due; a new version reaches `on_change`."""
        await self._scheduler.run(task_status=task_status)
