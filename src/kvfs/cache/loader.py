"""Loader: fetches an object's current version or history from Key Vault into the store.

Each load runs once for all concurrent callers (SingleFlight), within the load deadline, and a
failure is answered from memory for the error cooldown. A failing object is logged when it
starts failing and again whenever the cause (its error code) changes, not on every attempt.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

import trio

from kvfs.cache.base import CacheListener, CacheStats, OnChange, VaultReader, Version
from kvfs.cache.store import VersionStore
from kvfs.config.model import ObjectSpec
from kvfs.errors import KvfsError, VaultError, error_code
from kvfs.net.singleflight import SingleFlight
from kvfs.vault.bundle import attributes_of, item_id, version_of

log = logging.getLogger(__name__)

T = TypeVar("T")


class Target(NamedTuple):
    """What one load fetches: an object's current version, or its history folder."""

    spec: ObjectSpec
    history: bool

    def __str__(self) -> str:
        return f"object={self.spec.object_id}" + (" (history)" if self.history else "")


class Loader:
    """Turns cache misses and refreshes into Key Vault requests, and their answers into Versions."""

    def __init__(
        self,
        client: VaultReader,
        store: VersionStore,
        stats: CacheStats,
        *,
        on_loaded: Callable[[Target], None],
        on_change: OnChange | None,
        listener: CacheListener | None = None,
        max_concurrency: int,
        deadline: float,
        error_cooldown: float,
    ) -> None:
        self._client = client
        self._store = store
        self._stats = stats
        self._on_loaded = on_loaded
        self._on_change = on_change
        self._listener = listener
        self._listener_failed = False  # its first failure is logged with a traceback, later ones quietly
        self._limiter = trio.CapacityLimiter(max_concurrency)
        self._deadline = deadline
        self._current: SingleFlight[ObjectSpec, Version] = SingleFlight(
            cooldown=error_cooldown, remember=(KvfsError,)
        )
        self._history: SingleFlight[ObjectSpec, list[Version]] = SingleFlight(
            cooldown=error_cooldown, remember=(KvfsError,)
        )
        self._logged: dict[ObjectSpec, str] = {}  # failing object → the error code last logged

    async def current(self, spec: ObjectSpec, *, background: bool = False) -> Version:
        """Fetch `spec`'s current version; `background` loads skip the error cooldown."""
        return await self._current.run(
            spec, lambda: self._bounded(spec, self._fetch_current(spec), background), cooldown=not background
        )

    async def history(self, spec: ObjectSpec, *, background: bool = False) -> list[Version]:
        """Fetch `spec`'s newest versions (at most `spec.version_history`)."""
        return await self._history.run(
            spec, lambda: self._bounded(spec, self._fetch_history(spec), background), cooldown=not background
        )

    async def refresh(self, target: Target) -> None:
        """Re-fetch what `target` shows, for the refresh scheduler."""
        if target.history:
            await self.history(target.spec, background=True)
        else:
            await self.current(target.spec, background=True)

    # -- one load ---------------------------------------------------------------------------

    async def _bounded(self, spec: ObjectSpec, fetch: Awaitable[T], background: bool) -> T:
        """Run a fetch within the load deadline; log failures when their cause changes."""
        try:
            with trio.move_on_after(self._deadline) as scope:
                result = await fetch
            if scope.cancelled_caught:
                raise VaultError(
                    f"{spec.object_id}: no answer from Key Vault within {self._deadline:g} s", code="Timeout"
                )
        except KvfsError as exc:
            self._failed(spec, exc)
            self._tell(lambda listener: listener.failed(spec, exc, background=background))
            raise
        if self._logged.pop(spec, None) is not None:
            log.info("object=%s fetched again after failures", spec.object_id, extra={"object": spec.object_id})
        return result

    def _failed(self, spec: ObjectSpec, exc: KvfsError) -> None:
        code = error_code(exc)
        self._stats.errors[code] += 1
        if self._logged.get(spec) != code:
            self._logged[spec] = code
            # The message is safe by contract (KvfsError); it names the object and the code.
            fields = {"object": spec.object_id, "code": code}
            log.warning("object=%s code=%s: %s", spec.object_id, code, exc, extra=fields)

    async def _get(self, spec: ObjectSpec, version: str) -> dict[str, Any]:
        async with self._limiter:
            return await self._client.get(spec.type, spec.name, version)

    async def _fetch_current(self, spec: ObjectSpec) -> Version:
        new = self._store.render(spec, await self._get(spec, spec.version if spec.pinned else ""))
        old = self._store.set_current(spec, new)
        self._tell(lambda listener: listener.fetched(spec, new))
        if not spec.pinned:
            self._on_loaded(Target(spec, history=False))
        if old is not None and old.version != new.version:
            log.info("object=%s new version %s", spec.object_id, new.version, extra={"object": spec.object_id})
            await self._notify(spec, new)
        return new

    async def _fetch_history(self, spec: ObjectSpec) -> list[Version]:
        async with self._limiter:
            items = await self._client.list_versions(spec.type, spec.name)
        enabled: list[tuple[int, int, int, str]] = []
        for position, item in enumerate(items):
            attributes = attributes_of(item)
            version = version_of(item_id(item))
            if attributes.enabled is True and version:
                enabled.append((attributes.created, attributes.updated, position, version))
        # Newest first. `created` has one-second resolution; for versions made in the same second
        # the one listed later is taken as newer (services and emulators list in creation order).
        enabled.sort(reverse=True)
        ids = [version for *_, version in enabled]
        start = 0
        if spec.pinned:
            lowered = [version.lower() for version in ids]
            if spec.version.lower() not in lowered:
                raise VaultError(
                    f"{spec.object_id}: objectVersion {spec.version} is not among the object's"
                    f' {len(ids)} enabled versions (check objectVersion, or use "latest")',
                    status=404,
                    code="VersionNotFound",
                )
            start = lowered.index(spec.version.lower())
        versions = await self._fetch_versions(spec, ids[start : start + spec.version_history])
        old = self._store.set_history(spec, versions)
        self._tell(lambda listener: listener.fetched(spec, versions[0] if versions else None, versions))
        if not spec.pinned:
            self._on_loaded(Target(spec, history=True))
        if old is not None and [v.version for v in old] != [v.version for v in versions]:
            log.info(
                "object=%s history now starts at %s", spec.object_id, versions[0].version if versions else "-"
            )
            if versions:
                await self._notify(spec, versions[0])
        return versions

    async def _fetch_versions(self, spec: ObjectSpec, ids: list[str]) -> list[Version]:
        """Fetch and render the given versions concurrently (capped), reusing kept renders."""
        results: list[Version | None] = [None] * len(ids)
        errors: list[Exception] = []

        async def one(index: int, version: str) -> None:
            try:
                kept = self._store.rendered(spec, version)
                results[index] = kept or self._store.render(spec, await self._get(spec, version))
            except Exception as exc:  # noqa: BLE001 - re-raised below without an ExceptionGroup
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for index, version in enumerate(ids):
                nursery.start_soon(one, index, version)
        if errors:
            raise errors[0]
        return [v for v in results if v is not None]

    def _tell(self, call: Callable[[CacheListener], None]) -> None:
        """Report a load to the listener; its failure never reaches the reader."""
        if self._listener is None:
            return
        try:
            call(self._listener)
        except Exception:
            if not self._listener_failed:
                self._listener_failed = True
                log.exception("the cache listener failed (reads go on; later failures are logged at DEBUG)")
            else:
                log.debug("the cache listener failed again", exc_info=True)

    async def _notify(self, spec: ObjectSpec, version: Version) -> None:
        if self._on_change is None:
            return
        try:
            await self._on_change(spec, version)
        except Exception:  # a failing listener must not break refresh for other objects
            log.exception("object=%s on_change failed", spec.object_id)
