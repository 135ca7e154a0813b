"""The cache's seams: what it reads from (a Key Vault client) and what it offers (the fs core's view).

`ObjectCache` is all `kvfs.fs.core` knows of the cache, so the file tree can be tested over
the real cache with a fake vault, or over a fake cache.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvfs.config.model import ObjectSpec, ObjectType
from kvfs.errors import KvfsError


class VaultReader(Protocol):
    """What the cache needs from a Key Vault client (kvfs.vault.client.VaultClient or a fake).

    Answers are shape-checked bundles / list items (kvfs.vault.bundle); failures are KvfsErrors.
    """

    async def get(self, kind: ObjectType, name: str, version: str = "") -> dict[str, Any]: ...

    async def list_versions(self, kind: ObjectType, name: str) -> list[dict[str, Any]]: ...


@dataclass(frozen=True, eq=False)  # identity equality: usable as a dict key by the file tree
class Version:
    """One version of one object, rendered: immutable, so its inode may be cached forever."""

    spec: ObjectSpec
    version: str
    files: Mapping[str, bytes] = field(repr=False)  # suffix → bytes: "" main, ".crt"/".key" split
    kv_id: str
    content_type: str
    created: int
    updated: int
    expires: int | None

    def __repr__(self) -> str:  # never show file bytes: they are secret values
        sizes = {k: len(v) for k, v in self.files.items()}
        return f"Version({self.spec.object_id!s}, version={self.version!r}, sizes={sizes})"


OnChange = Callable[[ObjectSpec, Version], Awaitable[None]]


class CacheListener(Protocol):
    """The cache's report of every load, for what the daemon tells the outside (kvfs.daemon.status).

    The hook points for status, events, pod events and Secret syncs: the loader calls these,
    synchronously, after each load of an object's current version or history folder. A
    listener that raises is logged and ignored; it never fails a read.
    """

    def fetched(self, spec: ObjectSpec, version: Version | None, history: Sequence[Version] = ()) -> None:
        """Key Vault answered: `spec` shows `version` now (None: a history folder with no enabled
        version); a history folder's load also gives all its versions, newest first."""
        ...

    def failed(self, spec: ObjectSpec, error: KvfsError, *, background: bool) -> None:
        """A load failed; `background`: a refresh (readers keep the last good bytes), else a reader waited."""
        ...


class ObjectCache(Protocol):
    """What the file tree asks the cache; every failure is a KvfsError carrying an errno."""

    def peek(self, spec: ObjectSpec) -> Version | None:
        """The version `spec` shows now if it is cached (and fresh enough); never fetches."""
        ...

    async def current(self, spec: ObjectSpec) -> Version:
        """The version `spec` shows now, fetched if needed."""
        ...

    def peek_history(self, spec: ObjectSpec) -> list[Version] | None:
        """What `spec`'s history folder shows now if it is cached (and fresh enough); never fetches."""
        ...

    async def history(self, spec: ObjectSpec) -> list[Version]:
        """At most `spec.version_history` enabled versions, newest first."""
        ...


@dataclass
class CacheStats:
    """Counters for tests and the daemon's status."""

    errors: collections.Counter[str] = field(default_factory=collections.Counter)  # by error code
    hits: int = 0  # reads answered from cache
    refreshes: int = 0  # background refreshes that got Key Vault's answer
    refresh_failures: int = 0  # background refreshes that failed (the last good bytes stay served)
    evictions: int = 0  # objects forgotten to keep the cache within its byte limit
