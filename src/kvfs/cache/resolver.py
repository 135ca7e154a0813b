"""Resolver: Key Vault object → immutable bytes per version, cached, single-flighted, refreshed.

Why: upstream fetches every object for every pod at every poll (faults #3, #5, #6). kvfs fetches
an object when it is first read, lets concurrent readers share one request, serves cached bytes
without touching the network, refreshes only what was read, and keeps serving the last good
bytes while Key Vault is unreachable (optionally bounded by `max_staleness`).
"""

from __future__ import annotations

import collections
import logging
import random
import types
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import httpx
import trio

from kvfs.config.model import MountConfig, ObjectSpec, ObjectType
from kvfs.errors import KvfsError, VaultError

log = logging.getLogger(__name__)

T = TypeVar("T")
RenderFn = Callable[..., Mapping[str, bytes]]
OnChange = Callable[[ObjectSpec, "Version"], Awaitable[None]]


class VaultReader(Protocol):
    """What the resolver needs from a Key Vault client (VaultClient or a test fake)."""

    async def get_secret(self, name: str, version: str = "") -> dict: ...

    async def get_key(self, name: str, version: str = "") -> dict: ...

    async def get_certificate(self, name: str, version: str = "") -> dict: ...

    async def list_versions(self, kind: ObjectType, name: str) -> list[dict]: ...


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


@dataclass
class ResolverStats:
    """Counters for benchmarks, metrics and tests."""

    fetches: collections.Counter[str] = field(default_factory=collections.Counter)  # "get"/"list"
    errors: collections.Counter[str] = field(default_factory=collections.Counter)  # by error code
    hits: int = 0  # reads answered from cache
    refreshes: int = 0  # background refresh attempts
    refresh_failures: int = 0
    changes: int = 0  # new versions noticed after the first fetch


@dataclass
class _Entry(Generic[T]):
    value: T
    refreshed_at: float  # trio time of the last successful fetch


class _Flight:
    """One in-flight load that concurrent callers wait on."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.abandoned = False  # the leader was cancelled: waiters must try again


def _version_id(kv_id: str) -> str:
    """`https://v/secrets/name/<version>` → `<version>` ("" when the id has no version)."""
    try:
        parts = [p for p in httpx.URL(kv_id).path.split("/") if p]
    except (httpx.InvalidURL, ValueError):
        return ""
    return parts[2] if len(parts) >= 3 else ""


def _item_id(item: Mapping[str, Any]) -> str:
    """Id of a bundle or list item (keys carry it as `kid` / `key.kid`)."""
    for candidate in (item.get("id"), item.get("kid")):
        if isinstance(candidate, str) and candidate:
            return candidate
    key = item.get("key")
    if isinstance(key, Mapping) and isinstance(key.get("kid"), str):
        return key["kid"]
    return ""


def _int_or(value: object, default: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, VaultError):
        return exc.inner_code or exc.code or (f"HTTP{exc.status}" if exc.status else "VaultError")
    code = getattr(exc, "code", "")
    return str(code) if code else type(exc).__name__


class Resolver:
    """Answers "what bytes does this object show now" for the file tree."""

    def __init__(
        self,
        client: VaultReader,
        config: MountConfig,
        *,
        render: RenderFn | None = None,
        on_change: OnChange | None = None,
        max_concurrency: int = 16,
        deadline: float = 28.0,
        error_cooldown: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        if render is None:
            from kvfs.vault.render import render_object

            render = render_object
        self._client = client
        self._config = config
        self._render = render
        self.on_change = on_change
        self._limiter = trio.CapacityLimiter(max_concurrency)
        self._deadline = deadline
        # A failed load is answered from memory for a few seconds: an app polling a missing or
        # forbidden object must not turn into a stream of Key Vault requests.
        self._error_cooldown = error_cooldown
        self._recent_errors: dict[tuple[str, ObjectSpec], tuple[float, BaseException]] = {}
        self._rng = rng or random.Random()
        self._current: dict[ObjectSpec, _Entry[Version]] = {}
        self._histories: dict[ObjectSpec, _Entry[list[Version]]] = {}
        self._versions: dict[tuple[ObjectSpec, str], Version] = {}  # immutable renders by id
        self._flights: dict[tuple[str, ObjectSpec], _Flight] = {}
        self._read: set[ObjectSpec] = set()
        self._read_history: set[ObjectSpec] = set()
        self._due: dict[tuple[str, ObjectSpec], float] = {}
        self._failures: dict[tuple[str, ObjectSpec], int] = {}
        self._failing: set[ObjectSpec] = set()  # objects whose current failure was logged
        self._wake = trio.Event()
        self.statistics = ResolverStats()

    # -- reads ------------------------------------------------------------------------------

    def _fresh(self, spec: ObjectSpec, entry: _Entry[Any]) -> bool:
        bound = self._config.max_staleness
        if spec.pinned or bound <= 0:
            return True
        return trio.current_time() - entry.refreshed_at <= bound

    def peek(self, spec: ObjectSpec) -> Version | None:
        """The cached current version, if any (and within max_staleness); never fetches."""
        entry = self._current.get(spec)
        return entry.value if entry is not None and self._fresh(spec, entry) else None

    async def current(self, spec: ObjectSpec) -> Version:
        """The version `spec` shows now; cached reads return without awaiting the network."""
        self._read.add(spec)  # refresh only what was read
        entry = self._current.get(spec)
        if entry is not None and self._fresh(spec, entry):
            self.statistics.hits += 1
            return entry.value
        return await self._remembering(("current", spec), lambda: self._load_current(spec))

    async def history(self, spec: ObjectSpec) -> list[Version]:
        """Exactly `spec.version_history` versions (fewer if fewer exist), newest first."""
        self._read_history.add(spec)
        entry = self._histories.get(spec)
        if entry is not None and self._fresh(spec, entry):
            self.statistics.hits += 1
            return list(entry.value)
        return list(await self._remembering(("history", spec), lambda: self._load_history(spec)))

    async def _remembering(self, key: tuple[str, ObjectSpec], load: Callable[[], Awaitable[T]]) -> T:
        """A reader's load through the single flight, with failures remembered for a moment."""
        recent = self._recent_errors.get(key)
        if recent is not None:
            if trio.current_time() < recent[0]:
                raise recent[1]
            del self._recent_errors[key]
        try:
            return await self._single_flight(key, load)
        except KvfsError as exc:
            self._recent_errors[key] = (trio.current_time() + self._error_cooldown, exc)
            raise

    async def _single_flight(self, key: tuple[str, ObjectSpec], load: Callable[[], Awaitable[T]]) -> T:
        while True:
            flight = self._flights.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.abandoned:
                continue  # the leader was cancelled; become (or follow) a new leader
            if flight.error is not None:
                raise flight.error
            return flight.result
        flight = _Flight()
        self._flights[key] = flight
        try:
            flight.result = await self._bounded(key[1], load)
        except trio.Cancelled:
            flight.abandoned = True
            raise
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()
        return flight.result

    async def _bounded(self, spec: ObjectSpec, load: Callable[[], Awaitable[T]]) -> T:
        """Run a load within the read deadline; log the first failure of each object once."""
        try:
            with trio.move_on_after(self._deadline) as scope:
                result = await load()
            if scope.cancelled_caught:
                raise VaultError(
                    f"{spec.object_id}: no answer from Key Vault within {self._deadline:g} s", code="Timeout"
                )
        except KvfsError as exc:
            self._note_failure(spec, exc)
            raise
        if spec in self._failing:
            self._failing.discard(spec)
            log.info("object=%s fetched again after failures", spec.object_id)
        return result

    def _note_failure(self, spec: ObjectSpec, exc: BaseException) -> None:
        code = _error_code(exc)
        self.statistics.errors[code] += 1
        if spec not in self._failing:
            self._failing.add(spec)
            # The message is safe by contract (KvfsError); it names the object and the code.
            log.warning("object=%s code=%s: %s", spec.object_id, code, exc)

    # -- loading ----------------------------------------------------------------------------

    async def _get(self, spec: ObjectSpec, version: str) -> dict:
        get = {
            "secret": self._client.get_secret,
            "key": self._client.get_key,
            "cert": self._client.get_certificate,
        }[spec.type]
        async with self._limiter:
            self.statistics.fetches["get"] += 1
            return await get(spec.name, version)

    def _make_version(self, spec: ObjectSpec, bundle: Mapping[str, Any]) -> Version:
        kv_id = _item_id(bundle)
        version = _version_id(kv_id)
        cached = self._versions.get((spec, version.lower())) if version else None
        if cached is not None:
            return cached
        files = dict(
            self._render(
                spec,
                bundle,
                split_cert_key=self._config.split_cert_key,
                construct_pem_chain=self._config.construct_pem_chain,
            )
        )
        attrs = bundle.get("attributes") if isinstance(bundle.get("attributes"), Mapping) else {}
        assert isinstance(attrs, Mapping)
        ct = bundle.get("contentType")
        made = Version(
            spec=spec,
            version=version,
            files=types.MappingProxyType(files),
            kv_id=kv_id,
            content_type=ct if isinstance(ct, str) else "",
            created=_int_or(attrs.get("created"), 0) or 0,
            updated=_int_or(attrs.get("updated"), 0) or 0,
            expires=_int_or(attrs.get("exp"), None),
        )
        if version:
            self._versions[(spec, version.lower())] = made
        return made

    async def _load_current(self, spec: ObjectSpec) -> Version:
        if spec.pinned:
            cached = self._versions.get((spec, spec.version.lower()))
            if cached is not None:
                self._current[spec] = _Entry(cached, trio.current_time())
                return cached
        bundle = await self._get(spec, spec.version if spec.pinned else "")
        new = self._make_version(spec, bundle)
        old = self._current.get(spec)
        self._current[spec] = _Entry(new, trio.current_time())
        self._schedule(("current", spec))
        if old is not None and old.value.version != new.version:
            self._prune(spec)
            self.statistics.changes += 1
            log.info("object=%s new version %s", spec.object_id, new.version)
            await self._notify(spec, new)
        return new

    async def _load_history(self, spec: ObjectSpec) -> list[Version]:
        async with self._limiter:
            self.statistics.fetches["list"] += 1
            items = await self._client.list_versions(spec.type, spec.name)
        enabled: list[tuple[int, int, int, str]] = []
        for position, item in enumerate(items):
            attrs = item.get("attributes")
            if not isinstance(attrs, Mapping) or attrs.get("enabled") is not True:
                continue
            vid = _version_id(_item_id(item))
            if vid:
                created = _int_or(attrs.get("created"), 0) or 0
                updated = _int_or(attrs.get("updated"), 0) or 0
                enabled.append((created, updated, position, vid))
        # Newest first. `created` has one-second resolution; for versions made in the same second
        # the one listed later is taken as newer (services and emulators list in creation order).
        enabled.sort(reverse=True)
        start = 0
        if spec.pinned:
            wanted = spec.version.lower()
            ids = [vid.lower() for *_, vid in enabled]
            if wanted not in ids:
                raise VaultError(
                    f"{spec.object_id}: objectVersion {spec.version} is not among the object's"
                    f' {len(ids)} enabled versions (check objectVersion, or use "latest")',
                    status=404,
                    code="VersionNotFound",
                )
            start = ids.index(wanted)
        chosen = [vid for *_, vid in enabled[start : start + spec.version_history]]
        versions = await self._fetch_versions(spec, chosen)
        old = self._histories.get(spec)
        self._histories[spec] = _Entry(versions, trio.current_time())
        self._schedule(("history", spec))
        if old is not None and [v.version for v in old.value] != [v.version for v in versions]:
            self._prune(spec)
            self.statistics.changes += 1
            log.info(
                "object=%s history now starts at %s", spec.object_id, versions[0].version if versions else "-"
            )
            if versions:
                await self._notify(spec, versions[0])
        return versions

    async def _fetch_versions(self, spec: ObjectSpec, ids: list[str]) -> list[Version]:
        """Fetch and render the given versions concurrently (capped), reusing cached renders."""
        results: list[Version | None] = [None] * len(ids)
        errors: list[BaseException] = []

        async def one(index: int, vid: str) -> None:
            try:
                cached = self._versions.get((spec, vid.lower()))
                results[index] = cached or self._make_version(spec, await self._get(spec, vid))
            except Exception as exc:  # noqa: BLE001 - re-raised below without an ExceptionGroup
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for index, vid in enumerate(ids):
                nursery.start_soon(one, index, vid)
        if errors:
            raise errors[0]
        return [v for v in results if v is not None]

    def _prune(self, spec: ObjectSpec) -> None:
        """Forget renders of `spec` no longer shown (open files keep their own reference)."""
        keep = set()
        if spec in self._current:
            keep.add(self._current[spec].value.version.lower())
        if spec in self._histories:
            keep.update(v.version.lower() for v in self._histories[spec].value)
        for key in [k for k in self._versions if k[0] == spec and k[1] not in keep]:
            del self._versions[key]

    async def _notify(self, spec: ObjectSpec, version: Version) -> None:
        if self.on_change is None:
            return
        try:
            await self.on_change(spec, version)
        except Exception:  # a failing listener must not break refresh for other objects
            log.exception("object=%s on_change failed", spec.object_id)

    # -- background refresh ------------------------------------------------------------------

    def _schedule(self, key: tuple[str, ObjectSpec]) -> None:
        interval = self._config.refresh_interval
        if interval > 0:
            self._due[key] = trio.current_time() + interval
            self._failures.pop(key, None)
            self._wake.set()  # the refresh loop may be sleeping past this new due time

    def _refresh_keys(self) -> list[tuple[str, ObjectSpec]]:
        keys = [("current", s) for s in self._read if not s.pinned and s in self._current]
        keys += [("history", s) for s in self._read_history if not s.pinned and s in self._histories]
        return keys

    def _backoff(self, failures: int, exc: BaseException) -> float:
        """Delay before retrying a failed refresh: Retry-After, else jittered exponential ≤ interval."""
        interval = self._config.refresh_interval
        asked = getattr(exc, "retry_after", None)
        if isinstance(asked, (int, float)) and asked > 0:
            return float(asked)
        ceiling = min(interval, min(2.0, interval) * 2.0 ** (failures - 1))
        return ceiling * self._rng.uniform(0.5, 1.0)

    async def _refresh_one(self, key: tuple[str, ObjectSpec]) -> None:
        kind, spec = key
        self.statistics.refreshes += 1
        load = self._load_current if kind == "current" else self._load_history
        try:
            await self._single_flight(key, lambda: load(spec))
        except KvfsError as exc:
            # Keep serving the last good bytes; _bounded already logged the first failure.
            self.statistics.refresh_failures += 1
            failures = self._failures.get(key, 0) + 1
            self._failures[key] = failures
            delay = self._backoff(failures, exc)
            self._due[key] = trio.current_time() + delay
            log.debug(
                "object=%s refresh failed (%s), next try in %.1fs", spec.object_id, _error_code(exc), delay
            )
        except Exception:
            self.statistics.refresh_failures += 1
            self._due[key] = trio.current_time() + self._config.refresh_interval
            log.exception("object=%s refresh failed unexpectedly", spec.object_id)

    async def run_refresh(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forever: re-fetch what was read, when due; on a new version call on_change."""
        interval = self._config.refresh_interval
        task_status.started()
        if interval <= 0:
            return
        while True:
            now = trio.current_time()
            due = [k for k in self._refresh_keys() if self._due.get(k, now) <= now]
            if due:
                async with trio.open_nursery() as nursery:
                    for key in due:
                        nursery.start_soon(self._refresh_one, key)
                continue
            next_at = min((self._due.get(k, now) for k in self._refresh_keys()), default=now + interval)
            self._wake = trio.Event()
            with trio.move_on_at(next_at):
                await self._wake.wait()
