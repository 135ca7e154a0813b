"""VersionStore: immutable renders per (object, version), and which of them each object shows.

An object shows one current version (a file) or its newest versions (a history folder). Each
pointer remembers when it was fetched, so `max_staleness` can bound the age of served bytes.
A render is made once per version and kept while a pointer shows it; open files hold their
own reference, so pruning never pulls bytes from under a reader.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import trio

from kvfs.cache.base import Version
from kvfs.config.model import MountConfig, ObjectSpec
from kvfs.vault.bundle import attributes_of, item_id, version_of

T = TypeVar("T")
RenderFn = Callable[..., Mapping[str, bytes]]


@dataclass(frozen=True)
class _Pointer(Generic[T]):
    value: T
    fetched_at: float  # trio time


class VersionStore:
    """Renders by version id, current / history pointers, freshness, pruning. No I/O."""

    def __init__(self, config: MountConfig, render: RenderFn) -> None:
        self._config = config
        self._render = render
        self._renders: dict[ObjectSpec, dict[str, Version]] = {}  # by lower-cased version id
        self._current: dict[ObjectSpec, _Pointer[Version]] = {}
        self._history: dict[ObjectSpec, _Pointer[tuple[Version, ...]]] = {}

    def _fresh(self, spec: ObjectSpec, pointer: _Pointer[Any]) -> bool:
        bound = self._config.max_staleness
        if spec.pinned or bound <= 0:
            return True
        return trio.current_time() - pointer.fetched_at <= bound

    def current(self, spec: ObjectSpec) -> Version | None:
        """The version `spec` shows, unless none was fetched or it is older than max_staleness."""
        pointer = self._current.get(spec)
        return pointer.value if pointer is not None and self._fresh(spec, pointer) else None

    def history(self, spec: ObjectSpec) -> list[Version] | None:
        """The versions `spec`'s history folder shows, on the same terms as `current`."""
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
        return made

    def set_current(self, spec: ObjectSpec, version: Version) -> Version | None:
        """Point `spec` at `version` (fetched now); returns the version it showed before."""
        old = self._current.get(spec)
        self._current[spec] = _Pointer(version, trio.current_time())
        if old is not None and old.value.version != version.version:
            self._prune(spec)
        return old.value if old is not None else None

    def set_history(self, spec: ObjectSpec, versions: Sequence[Version]) -> list[Version] | None:
        """Point `spec`'s history at `versions` (fetched now); returns what it showed before."""
        old = self._history.get(spec)
        self._history[spec] = _Pointer(tuple(versions), trio.current_time())
        if old is not None and [v.version for v in old.value] != [v.version for v in versions]:
            self._prune(spec)
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
