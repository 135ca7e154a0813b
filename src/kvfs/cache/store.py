"""VersionStore: immutable renders per (object, version), and which of them each object shows.

An object shows one current version (a file) or its newest versions (a history folder). Each
pointer remembers when it was fetched, so `max_staleness` can bound the age of served bytes.
A render is made once per version and kept while a pointer shows it; open files hold their
own reference, so pruning never pulls bytes from under a reader.

Memory: the bytes of the renders kept are bounded by `MountConfig.cache_limit`, so one volume of
huge objects cannot exhaust the daemon's container. Over the limit, the least recently read
objects are forgotten whole (pointers and renders; `on_evict` stops their refresh), and their
next read fetches them again. The object being stored is never evicted for its own sake: one
object larger than the limit alone is kept and served, with one warning naming it and the limit.
"""

from __future__ import annotations

import collections
import logging
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import trio

from kvfs.cache.base import Version
from kvfs.config.model import MountConfig, ObjectSpec
from kvfs.vault.bundle import attributes_of, item_id, version_of

log = logging.getLogger(__name__)

T = TypeVar("T")
RenderFn = Callable[..., Mapping[str, bytes]]


def size_of(versions: Iterable[Version]) -> int:
    """Bytes of the files of `versions`, each version counted once."""
    unique = {id(v): v for v in versions}
    return sum(len(data) for v in unique.values() for data in v.files.values())


def _within_limit(spec: ObjectSpec, versions: int, size: int, limit: int) -> str:
    """What an object over the limit means for the user. One Key Vault answer (at most 4 MiB is
    accepted) is far below the default limit: a long history folder is what makes one object this
    large, so its fix is fewer versions; the limit itself is not a setting."""
    if spec.version_history >= 2 and versions >= 2:
        fit = limit * versions // size
        return f"lower its objectVersionHistory, now {spec.version_history}: about {fit} versions of this size fit"
    return "other objects are dropped from memory while it is kept, and fetched again when read"


@dataclass(frozen=True)
class _Pointer(Generic[T]):
    value: T
    fetched_at: float  # trio time


class VersionStore:
    """Renders by version id, current / history pointers, freshness, pruning, a byte limit. No I/O."""

    def __init__(
        self,
        config: MountConfig,
        render: RenderFn,
        *,
        on_evict: Callable[[ObjectSpec], None] = lambda spec: None,
    ) -> None:
        self._config = config
        self._render = render
        self._on_evict = on_evict
        self._renders: dict[ObjectSpec, dict[str, Version]] = {}  # by lower-cased version id
        self._current: dict[ObjectSpec, _Pointer[Version]] = {}
        self._history: dict[ObjectSpec, _Pointer[tuple[Version, ...]]] = {}
        # Bytes kept per object, the least recently read first.
        self._sizes: collections.OrderedDict[ObjectSpec, int] = collections.OrderedDict()
        self.kept_bytes = 0
        self._warned: set[ObjectSpec] = set()  # objects logged as larger than the limit

    def _fresh(self, spec: ObjectSpec, pointer: _Pointer[Any]) -> bool:
        bound = self._config.max_staleness
        if spec.pinned or bound <= 0:
            return True
        return trio.current_time() - pointer.fetched_at <= bound

    def current(self, spec: ObjectSpec) -> Version | None:
        """The version `spec` shows, unless none was fetched or it is older than max_staleness.

        Each call counts as a read of `spec` for the byte limit (least recently read go first).
        """
        self._touch(spec)
        pointer = self._current.get(spec)
        return pointer.value if pointer is not None and self._fresh(spec, pointer) else None

    def history(self, spec: ObjectSpec) -> list[Version] | None:
        """The versions `spec`'s history folder shows, on the same terms as `current`."""
        self._touch(spec)
        pointer = self._history.get(spec)
        return list(pointer.value) if pointer is not None and self._fresh(spec, pointer) else None

    def rendered(self, spec: ObjectSpec, version: str) -> Version | None:
        """The render of `version` (case-insensitive id), if one is kept."""
        return self._renders.get(spec, {}).get(version.lower())

    def render(self, spec: ObjectSpec, bundle: Mapping[str, Any]) -> Version:
        """The Version of a fetched bundle; a version rendered before is reused, not re-rendered."""
        kv_id = item_id(bundle)
        version = version_of(kv_id)
        cached = self.rendered(spec, version) if version else None
        if cached is not None:
            return cached
        files = self._render(
            spec,
            bundle,
            split_cert_key=self._config.split_cert_key,
            construct_pem_chain=self._config.construct_pem_chain,
        )
        attributes = attributes_of(bundle)
        made = Version(
            spec=spec,
            version=version,
            files=types.MappingProxyType(dict(files)),
            kv_id=kv_id,
            content_type=bundle.get("contentType") or "",
            created=attributes.created,
            updated=attributes.updated,
            expires=attributes.expires,
        )
        if version:
            self._renders.setdefault(spec, {})[version.lower()] = made
            self._account(spec)
        return made

    def set_current(self, spec: ObjectSpec, version: Version) -> Version | None:
        """Point `spec` at `version` (fetched now); returns the version it showed before."""
        old = self._current.get(spec)
        self._current[spec] = _Pointer(version, trio.current_time())
        if old is not None and old.value.version != version.version:
            self._prune(spec)
        self._account(spec)
        return old.value if old is not None else None

    def set_history(self, spec: ObjectSpec, versions: Sequence[Version]) -> list[Version] | None:
        """Point `spec`'s history at `versions` (fetched now); returns what it showed before."""
        old = self._history.get(spec)
        self._history[spec] = _Pointer(tuple(versions), trio.current_time())
        if old is not None and [v.version for v in old.value] != [v.version for v in versions]:
            self._prune(spec)
        self._account(spec)
        return list(old.value) if old is not None else None

    def _prune(self, spec: ObjectSpec) -> None:
        """Forget renders of `spec` that no pointer shows."""
        keep = set()
        if spec in self._current:
            keep.add(self._current[spec].value.version.lower())
        if spec in self._history:
            keep.update(v.version.lower() for v in self._history[spec].value)
        renders = self._renders.get(spec, {})
        for version in [v for v in renders if v not in keep]:
            del renders[version]

    # -- the byte limit ---------------------------------------------------------------------

    def _touch(self, spec: ObjectSpec) -> None:
        if spec in self._sizes:
            self._sizes.move_to_end(spec)

    def _account(self, spec: ObjectSpec) -> None:
        """Recount `spec`'s bytes (a new object counts as just read), then keep within the limit.

        A refresh recounts without moving the object: only reads make it recent.
        """
        kept: list[Version] = list(self._renders.get(spec, {}).values())
        if spec in self._current:
            kept.append(self._current[spec].value)
        if spec in self._history:
            kept.extend(self._history[spec].value)
        size = size_of(kept)
        self.kept_bytes += size - self._sizes.get(spec, 0)
        self._sizes[spec] = size
        limit = self._config.cache_limit
        while self.kept_bytes > limit:
            victim = next((other for other in self._sizes if other != spec), None)
            if victim is None:
                break  # only `spec` is left: kept, over the limit
            self._evict(victim)
        shown = spec in self._current or spec in self._history  # a history's renders arrive one by one first
        if size > limit and shown and spec not in self._warned:
            self._warned.add(spec)
            log.warning(
                "object=%s takes %d KiB, more than the cache limit of %d KiB: served, and kept alone"
                " while it is the most recently read (%s)",
                spec.object_id,
                size // 1024,
                limit // 1024,
                _within_limit(spec, len({id(v) for v in kept}), size, limit),
            )

    def _evict(self, spec: ObjectSpec) -> None:
        """Forget `spec` whole; open files keep their own reference, its next read fetches it again."""
        self.kept_bytes -= self._sizes.pop(spec)
        self._renders.pop(spec, None)
        self._current.pop(spec, None)
        self._history.pop(spec, None)
        log.debug("object=%s evicted: the cache keeps %d bytes", spec.object_id, self.kept_bytes)
        self._on_evict(spec)
