"""Hypothesis drives the file tree over the real cache in random order, against a simple model.

`FilesystemCore` runs over the real `Resolver` (tests/cache/fakevault.py underneath) with its
background refresh, in one trio run on a thread with a MockClock. The machine plays the kernel:
lookups (root, `..data`, a sub-folder, a history folder), forgets, readdir (taking only some
entries, as the adapter does), open, read and release. Key Vault changes under it (a new
version, a disabled newest version), and a refresh interval passes now and then. The model is
what Key Vault holds, what the cache loaded (an object's versions as of its last fetch), and
what the kernel holds (lookup counts per inode, open handles).

Invariants: a handle reads exactly the bytes of the version it opened, never a mix; a lookup
never gives an inode other bytes than before; every inode the kernel still knows answers getattr
with a size equal to the bytes it shows and names their version: its own, or, once its name moved
on and no file opened before that through the page cache is left, its name's current version (a
`subPath` bind mount holds such inodes); a refresh tells the kernel exactly the old inodes it
knows of the names whose version changed, as deleted; and once the kernel forgets everything,
the core holds no inode but those of versions a name shows or a handle reads (lookup counts
balance, nothing leaks).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar, Union

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cache.fakevault import FakeVault, Stored, fake_render
from kvfs.cache.base import Version
from kvfs.cache.resolver import Resolver
from kvfs.config.model import AuthConfig, CloudConfig, MountConfig, ObjectSpec
from kvfs.fs.core import FilesystemCore, FsError
from kvfs.fs.tree import ROOT_INODE

T = TypeVar("T")
Where = Union[str, int]  # a file's suffix, or a history index

CLOUD = CloudConfig("AzurePublicCloud", "vault.azure.net", "https://vault.azure.net", "https://login.microsoftonline.com")
INTERVAL = 120.0

PLAIN = ObjectSpec(name="alpha", type="secret")
NESTED = ObjectSpec(name="beta", type="secret", alias="sub/b")
HISTORY = ObjectSpec(name="hist", type="secret", version_history=3)
PINNED_NAME = "pinned"
FOLDERS = ("root", "..data", "sub", "hist")
SUFFIXES = ("", ".crt", ".key")  # split_cert_key: fake_render gives every secret all three


class TrioThread:
    """One trio run with a MockClock on its own thread; `run` awaits a coroutine function in it."""

    def __init__(self, background: Callable[..., Awaitable[None]]) -> None:
        self.clock = trio.testing.MockClock()
        self._background = background
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "trio thread did not start"

    def _main(self) -> None:
        try:
            trio.run(self._serve, clock=self.clock)
        except BaseException as exc:  # handed to the test thread by close()
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(self._background)
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        return trio.from_thread.run(fn, trio_token=self._token)

    def close(self) -> None:
        if self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(10)
        if self._failure is not None:
            raise self._failure


class TreeAndCache(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.vault = FakeVault()
        for spec in (PLAIN, NESTED, HISTORY):
            self.vault.add("secret", spec.name, f"{spec.name} v0")
        first = self.vault.add("secret", PINNED_NAME, "pinned v0")
        self.pinned = ObjectSpec(name=PINNED_NAME, type="secret", version=first)
        self.specs = (PLAIN, NESTED, HISTORY, self.pinned)
        config = MountConfig(
            vault_name="demo",
            cloud=CLOUD,
            auth=AuthConfig(mode="default_chain"),
            objects=self.specs,
            split_cert_key=True,
            refresh_interval=INTERVAL,
        )
        self.deleted: set[tuple[int, str, int]] = set()  # what the core told the kernel
        self.cache = Resolver(self.vault, config, render=fake_render, on_change=self._on_change)
        self.core = FilesystemCore(config, self.cache, kernel=self)
        self.trio = TrioThread(self.cache.run_refresh)
        self.folders = {"root": ROOT_INODE}
        for name in ("..data", "sub", "hist"):
            self.folders[name] = self.run(lambda: self.core.lookup(ROOT_INODE, name)).inode
        # The cache: object name → the version ids it shows (one, or a history folder's).
        self.loaded: dict[str, list[str]] = {}
        # The kernel: lookup counts by inode, and what it learnt about each inode.
        self.lookups: dict[int, int] = {}
        self.inode_bytes: dict[int, bytes] = {}
        self.inode_names: dict[int, tuple[ObjectSpec, Where, str]] = {}  # (object, where, version id)
        self.superseded: set[int] = set()  # inodes whose name moved on
        self.placeholders: dict[int, tuple[ObjectSpec, Where]] = {}
        # fh → (inode, the bytes it opened, (object name, version) of those bytes)
        self.handles: dict[int, tuple[int, bytes, tuple[str, str]]] = {}
        self.page_cache_handles: dict[int, int] = {}  # fh → inode, for handles opened while it was current

    # ----- kvfs.fs.core.KernelCache: the core telling the kernel -----------------------------

    def entry_deleted(self, parent_inode: int, name: str, inode: int) -> None:
        self.deleted.add((parent_inode, name, inode))

    def attrs_changed(self, inode: int, done: Callable[[], None]) -> None:
        done()

    async def _on_change(self, spec: ObjectSpec, version: Version) -> None:
        await self.core.on_change(spec, version)

    def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        return self.trio.run(fn)

    # ----- the model ----------------------------------------------------------------------

    def newest_first(self, spec: ObjectSpec) -> list[Stored]:
        enabled = [s for s in self.vault.objects[("secret", spec.name)] if s.enabled]
        return sorted(enabled, key=lambda s: s.created, reverse=True)

    def in_vault(self, spec: ObjectSpec) -> list[str]:
        """The version ids a fetch of `spec` shows now."""
        if spec.pinned:
            return [spec.version]
        return [s.version for s in self.newest_first(spec)[: max(1, spec.version_history)]]

    def fetch(self, spec: ObjectSpec) -> None:
        """The core asks the cache for `spec`: fetched now unless the cache holds it."""
        self.loaded.setdefault(spec.name, self.in_vault(spec))

    def stored(self, name: str, version: str) -> Stored:
        return next(s for s in self.vault.objects[("secret", name)] if s.version == version)

    def entries(self, folder: str) -> dict[str, tuple[ObjectSpec, Where]]:
        """The files `folder` shows: name → (object, suffix or history index)."""
        if folder == "hist":
            return {str(i): (HISTORY, i) for i in range(len(self.loaded[HISTORY.name]))}
        specs = {"b": NESTED} if folder == "sub" else {"alpha": PLAIN, PINNED_NAME: self.pinned}
        return {name + suffix: (spec, suffix) for name, spec in specs.items() for suffix in SUFFIXES}

    def content(self, spec: ObjectSpec, where: Where) -> tuple[Stored, bytes]:
        """The version a (loaded) name shows, and its file's bytes."""
        version = self.loaded[spec.name][where if isinstance(where, int) else 0]
        stored = self.stored(spec.name, version)
        suffix = where if isinstance(where, str) else ""
        return stored, fake_render(spec, {"value": stored.value}, split_cert_key=True)[suffix]

    def learn(self, inode: int, spec: ObjectSpec, where: Where) -> None:
        """A lookup gave `inode` for a name: the name's current version; never other bytes than before."""
        assert inode not in self.placeholders and inode not in self.superseded
        stored, data = self.content(spec, where)
        assert self.inode_bytes.setdefault(inode, data) == data, f"inode {inode} changed its bytes"
        self.inode_names[inode] = (spec, where, stored.version)
        self.lookups[inode] = self.lookups.get(inode, 0) + 1

    def names_of(self, spec: ObjectSpec, where: Where) -> list[tuple[int, str]]:
        """(folder inode, name) of every place the file appears."""
        if isinstance(where, int):
            return [(self.folders["hist"], str(where))]
        folders = ("sub",) if spec is NESTED else ("root", "..data")
        places = [(self.folders[f], name, shown) for f in folders for name, shown in self.entries(f).items()]
        return [(parent, name) for parent, name, shown in places if shown == (spec, where)]

    def exists(self, spec: ObjectSpec, where: Where) -> bool:
        return not isinstance(where, int) or where < len(self.loaded[spec.name])

    def shows(self, inode: int) -> tuple[bytes, tuple[str, str]] | None:
        """The bytes and (object, version) an inode the kernel knows shows now; None: nothing (ENOENT).

        Its own, unless its name moved on and no page-cache handle of it is left: then it
        follows its name, and shows nothing if the name is gone.
        """
        spec, where, version = self.inode_names[inode]
        following = inode in self.superseded and inode not in self.page_cache_handles.values()
        if not following:
            return self.inode_bytes[inode], (spec.name, version)
        if not self.exists(spec, where):
            return None
        stored, content = self.content(spec, where)
        return content, (spec.name, stored.version)

    # ----- the kernel's requests ----------------------------------------------------------

    @rule(folder=st.sampled_from(FOLDERS), data=st.data())
    def lookup(self, folder: str, data: st.DataObject) -> None:
        names = ["0", "1", "2", "3"] if folder == "hist" else [*sorted(self.entries(folder)), "nope"]
        name = data.draw(st.sampled_from(names))
        parent = self.folders[folder]
        if folder == "hist" and int(name) < HISTORY.version_history:
            self.fetch(HISTORY)  # the folder's versions are fetched to answer
        expected = self.entries(folder).get(name) if folder != "hist" or HISTORY.name in self.loaded else None
        if expected is None:
            with pytest.raises(FsError) as info:
                self.run(lambda: self.core.lookup(parent, name))
            assert info.value.errno == errno.ENOENT
            return
        spec, where = expected
        self.fetch(spec)
        attr = self.run(lambda: self.core.lookup(parent, name))
        stored, content = self.content(spec, where)
        assert stat.S_ISREG(attr.mode)
        assert attr.size == len(content)
        assert attr.mtime_ns == stored.created * 10**9
        self.learn(attr.inode, spec, where)

    @rule(folder=st.sampled_from(FOLDERS), data=st.data())
    def readdir(self, folder: str, data: st.DataObject) -> None:
        """One READDIRPLUS call from `start`, of which the kernel takes `taken` entries."""
        inode = self.folders[folder]
        if folder == "hist":
            self.fetch(HISTORY)
        listed = self.run(lambda: self.core.readdir(inode))
        expected = self.entries(folder)
        folders = {"root": {"sub", "hist", "..data"}, "..data": {"sub", "hist"}}.get(folder, set())
        assert sorted(name for name, _ in listed) == sorted([*expected, *folders])
        start = data.draw(st.integers(0, len(listed)), label="start")
        taken = data.draw(st.integers(0, len(listed) - start), label="taken")
        for index, (name, attr) in enumerate(listed):
            if name not in expected:
                pass  # a folder
            elif expected[name][0].name not in self.loaded:  # listing fetches nothing
                assert (attr.entry_timeout, attr.attr_timeout) == (0, 0), "a placeholder expires at once"
            else:
                assert attr.size == len(self.content(*expected[name])[1])
            if not start <= index < start + taken:
                self.core.unreaddir(attr)  # as kvfs.fs.adapter does for entries not sent
            elif name in expected and attr.attr_timeout == 0:
                assert self.placeholders.setdefault(attr.inode, expected[name]) == expected[name]
                self.lookups[attr.inode] = self.lookups.get(attr.inode, 0) + 1
            elif name in expected:
                self.learn(attr.inode, *expected[name])

    @precondition(lambda self: self.lookups)
    @rule(data=st.data())
    def forget(self, data: st.DataObject) -> None:
        inode = data.draw(st.sampled_from(sorted(self.lookups)))
        count = data.draw(st.integers(1, self.lookups[inode]))
        self.core.forget(inode, count)
        self.lookups[inode] -= count
        if not self.lookups[inode]:
            del self.lookups[inode]

    @precondition(lambda self: self.lookups)
    @rule(data=st.data())
    def open(self, data: st.DataObject) -> None:
        inode = data.draw(st.sampled_from(sorted(self.lookups)))
        if inode in self.placeholders:  # a stale listing entry: opens what the name shows now
            spec, where = self.placeholders[inode]
            self.fetch(spec)
            stored, content = self.content(spec, where)
            version = (spec.name, stored.version)
        else:
            shown = self.shows(inode)
            if shown is None:  # it follows a name that is gone
                with pytest.raises(FsError) as info:
                    self.run(lambda: self.core.open(inode, os.O_RDONLY))
                assert info.value.errno == errno.ENOENT
                return
            content, version = shown
        fh = self.run(lambda: self.core.open(inode, os.O_RDONLY))
        assert fh not in self.handles
        self.handles[fh] = (inode, content, version)
        cached = inode not in self.placeholders and inode not in self.superseded
        assert self.core.direct_io(fh) is not cached
        if cached:
            self.page_cache_handles[fh] = inode

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        fh = data.draw(st.sampled_from(sorted(self.handles)))
        _, content, _ = self.handles[fh]
        offset = data.draw(st.integers(0, len(content) + 2))
        size = data.draw(st.integers(0, len(content) + 2))
        assert self.run(lambda: self.core.read(fh, offset, size)) == content[offset : offset + size]

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        fh = data.draw(st.sampled_from(sorted(self.handles)))
        self.core.release(fh)
        del self.handles[fh]
        self.page_cache_handles.pop(fh, None)

    @rule()
    def drop_caches(self) -> None:
        """The kernel evicts every inode no open file holds (`echo 2 > drop_caches`)."""
        open_inodes = {inode for inode, _, _ in self.handles.values()}
        for inode in [i for i in self.lookups if i not in open_inodes]:
            self.core.forget(inode, self.lookups.pop(inode))
        self.check_nothing_leaks()

    # ----- Key Vault changes, and the refresh -----------------------------------------------

    @rule(spec_index=st.integers(0, 3))
    def rotate(self, spec_index: int) -> None:
        spec = self.specs[spec_index]
        self.vault.add("secret", spec.name, f"{spec.name} v{len(self.vault.objects[('secret', spec.name)])}")

    @rule(spec_index=st.integers(0, 2))
    def disable_newest(self, spec_index: int) -> None:
        enabled = self.newest_first(self.specs[spec_index])
        if len(enabled) > 1:
            enabled[0].enabled = False

    @rule()
    def refresh(self) -> None:
        """One refresh interval: every loaded object is fetched again, and the kernel told."""

        async def one_interval() -> None:
            self.trio.clock.jump(INTERVAL)
            await trio.testing.wait_all_tasks_blocked()

        changed = [s for s in self.specs if s.name in self.loaded and self.loaded[s.name] != self.in_vault(s)]
        current = {inode: names for inode, names in self.inode_names.items() if inode not in self.superseded}
        for spec in changed:
            self.loaded[spec.name] = self.in_vault(spec)
        self.deleted.clear()
        self.run(one_interval)
        told: set[tuple[int, str, int]] = set()
        for inode, (spec, where, version) in current.items():
            if spec in changed and (not self.exists(spec, where) or self.content(spec, where)[0].version != version):
                self.superseded.add(inode)
                if self.lookups.get(inode):
                    told |= {(parent, name, inode) for parent, name in self.names_of(spec, where)}
        assert self.deleted == told

    # ----- invariants ---------------------------------------------------------------------

    @invariant()
    def handles_read_their_version_and_known_inodes_stay_valid(self) -> None:
        async def check() -> None:
            for fh, (_, content, _) in self.handles.items():
                assert await self.core.read(fh, 0, len(content) + 10) == content, "torn or wrong read"
            held = set(self.core.known_inodes())
            for inode in self.lookups:
                attr = await self.core.getattr(inode)
                if inode in self.placeholders:
                    assert attr.attr_timeout == 0
                    continue
                assert inode in held
                shown = self.shows(inode)
                content, version = shown if shown is not None else (self.inode_bytes[inode], None)
                assert attr.size == len(content)
                if version is not None:
                    assert await self.version_of(inode) == version
                name, version_id = await self.version_of(inode)
                value = self.stored(name, version_id).value.encode()
                assert content in {value, b"crt:" + value, b"key:" + value}

        self.run(check)

    async def version_of(self, inode: int) -> tuple[str, str]:
        """(object name, version id) an inode says it holds (its xattrs)."""
        object_id = (await self.core.getxattr(inode, "user.kvfs.object")).decode()
        return object_id.split("/")[1], (await self.core.getxattr(inode, "user.kvfs.version")).decode()

    def check_nothing_leaks(self) -> None:
        """Inodes no kernel count holds show a version a name shows now or a handle reads."""
        unheld = set(self.core.known_inodes()) - set(self.lookups)
        allowed = {(name, version) for name, versions in self.loaded.items() for version in versions}
        allowed |= {version for _, _, version in self.handles.values()}
        slots = 3 * len(SUFFIXES) + HISTORY.version_history  # the files of three objects, N history files

        async def versions() -> set[tuple[str, str]]:
            return {await self.version_of(inode) for inode in unheld}

        assert self.run(versions) <= allowed, "a superseded version's inode outlived every reference"
        assert len(unheld) <= slots + len(self.handles)

    def teardown(self) -> None:
        try:
            for fh in list(self.handles):
                self.core.release(fh)
            self.handles.clear()
            self.page_cache_handles.clear()
            self.drop_caches()
        finally:
            self.trio.close()


TreeAndCache.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_tree_and_cache_against_a_model = TreeAndCache.TestCase
