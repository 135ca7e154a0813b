"""Hypothesis drives the file tree over the real cache in random order, against a simple model.

`FilesystemCore` runs over the real `Resolver` (tests/cache/fakevault.py underneath) with its
background refresh, in one trio run on a thread with a MockClock. The machine plays the kernel:
lookups (root, `..data`, a sub-folder, a history folder), forgets, readdir (taking only some
entries, as the adapter does), open, read and release; Key Vault changes under it (a new
version, a disabled newest version) followed by one refresh interval. The model is what Key
Vault holds plus what the kernel holds (lookup counts per inode, open handles).

Invariants: a handle reads exactly the bytes of the version it opened, never a mix; an inode
never changes its bytes; every inode the kernel still knows answers getattr with a size equal to
its bytes and names the version its bytes are; a rotation invalidates every name of the object
that was fetched; and once the kernel forgets everything, the core holds no inode but those the
names show now (lookup counts balance, nothing superseded leaks).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

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

CLOUD = CloudConfig("AzurePublicCloud", "vault.azure.net", "https://vault.azure.net", "https://login.microsoftonline.com")
INTERVAL = 120.0

PLAIN = ObjectSpec(name="alpha", type="secret")
NESTED = ObjectSpec(name="beta", type="secret", alias="sub/b")
HISTORY = ObjectSpec(name="hist", type="secret", version_history=3)
PINNED_NAME = "pinned"
FOLDERS = ("root", "..data", "sub", "hist")


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
        self.invalidated: set[tuple[int, str]] = set()
        self.cache = Resolver(self.vault, config, render=fake_render, on_change=self._on_change)
        self.core = FilesystemCore(
            config, self.cache, invalidate_entry=lambda parent, name: self.invalidated.add((parent, name))
        )
        self.trio = TrioThread(self.cache.run_refresh)
        self.folders = {"root": ROOT_INODE}
        for name, parent in (("..data", "root"), ("sub", "root"), ("hist", "root")):
            self.folders[name] = self.run(lambda: self.core.lookup(ROOT_INODE, name)).inode
        # The model of the kernel: lookup counts by inode, and what it learnt about each inode.
        self.lookups: dict[int, int] = {}
        self.inode_bytes: dict[int, bytes] = {}
        self.placeholders: dict[int, tuple[ObjectSpec, str]] = {}
        # fh → (inode, the bytes it opened, (object name, version) of those bytes)
        self.handles: dict[int, tuple[int, bytes, tuple[str, str]]] = {}
        self.fetched: set[tuple[str, bool]] = set()  # (object name, history?) the cache has loaded
        self.history_given: set[str] = set()  # history file names the kernel was given

    async def _on_change(self, spec: ObjectSpec, version: Version) -> None:
        await self.core.on_change(spec, version)

    def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        return self.trio.run(fn)

    # ----- the model ----------------------------------------------------------------------

    def entries(self, folder: str) -> dict[str, tuple[ObjectSpec, str | int]]:
        """The files `folder` shows: name → (object, suffix or history index)."""
        if folder == "hist":
            return {str(i): (HISTORY, i) for i in range(min(3, len(self.newest_first(HISTORY))))}
        if folder == "sub":
            specs = {"b": NESTED}
        else:
            specs = {"alpha": PLAIN, PINNED_NAME: self.pinned}
        return {name + suffix: (spec, suffix) for name, spec in specs.items() for suffix in ("", ".crt", ".key")}

    def newest_first(self, spec: ObjectSpec) -> list[Stored]:
        enabled = [s for s in self.vault.objects[("secret", spec.name)] if s.enabled]
        return sorted(enabled, key=lambda s: s.created, reverse=True)

    def shown(self, spec: ObjectSpec, where: str | int) -> Stored:
        """The version a name shows now (a refresh follows every change in the vault)."""
        if isinstance(where, int):
            return self.newest_first(spec)[where]
        if spec.pinned:
            return next(s for s in self.vault.objects[("secret", spec.name)] if s.version == spec.version)
        return self.newest_first(spec)[0]

    @staticmethod
    def content(stored: Stored, where: str | int) -> bytes:
        return fake_render(HISTORY, {"value": stored.value}, split_cert_key=True)[where if isinstance(where, str) else ""]

    def learn(self, inode: int, data: bytes) -> None:
        """The kernel saw `inode` with `data`'s size: an inode never changes its bytes."""
        assert inode not in self.placeholders
        assert self.inode_bytes.setdefault(inode, data) == data, f"inode {inode} changed its bytes"
        self.lookups[inode] = self.lookups.get(inode, 0) + 1

    def by_version(self, spec: ObjectSpec, version: str) -> Stored:
        return next(s for s in self.vault.objects[("secret", spec.name)] if s.version == version)

    # ----- the kernel's requests ----------------------------------------------------------

    @rule(folder=st.sampled_from(FOLDERS), data=st.data())
    def lookup(self, folder: str, data: st.DataObject) -> None:
        names = ["0", "1", "2", "3"] if folder == "hist" else [*sorted(self.entries(folder)), "nope"]
        name = data.draw(st.sampled_from(names))
        parent = self.folders[folder]
        if folder == "hist" and int(name) < HISTORY.version_history:
            self.fetched.add((HISTORY.name, True))  # the folder's versions are fetched to answer
        expected = self.entries(folder).get(name)
        if expected is None:
            with pytest.raises(FsError) as info:
                self.run(lambda: self.core.lookup(parent, name))
            assert info.value.errno == errno.ENOENT
            return
        spec, where = expected
        self.fetched.add((spec.name, isinstance(where, int)))
        attr = self.run(lambda: self.core.lookup(parent, name))
        stored = self.shown(spec, where)
        content = self.content(stored, where)
        assert stat.S_ISREG(attr.mode)
        assert attr.size == len(content)
        assert attr.mtime_ns == stored.created * 10**9
        self.learn(attr.inode, content)
        if folder == "hist":
            self.history_given.add(name)

    @rule(folder=st.sampled_from(FOLDERS), data=st.data())
    def readdir(self, folder: str, data: st.DataObject) -> None:
        """One READDIRPLUS call from `start`, of which the kernel takes `taken` entries."""
        inode = self.folders[folder]
        if folder == "hist":
            self.fetched.add((HISTORY.name, True))
        listed = self.run(lambda: self.core.readdir(inode))
        expected = self.entries(folder)
        folders = {"root": {"sub", "hist", "..data"}, "..data": {"sub", "hist"}}.get(folder, set())
        assert sorted(name for name, _ in listed) == sorted([*expected, *folders])
        start = data.draw(st.integers(0, len(listed)), label="start")
        taken = data.draw(st.integers(0, len(listed) - start), label="taken")
        for index, (name, attr) in enumerate(listed):
            if not start <= index < start + taken:
                self.core.unreaddir(attr)  # as kvfs.fs.adapter does for entries not sent
            elif name in expected and attr.attr_timeout == 0:  # an unfetched file's placeholder
                assert folder != "hist", "a history folder's entries are fetched when listed"
                assert self.placeholders.setdefault(attr.inode, expected[name]) == expected[name]
                self.lookups[attr.inode] = self.lookups.get(attr.inode, 0) + 1
            elif name in expected:
                spec, where = expected[name]
                content = self.content(self.shown(spec, where), where)
                assert attr.size == len(content)
                self.learn(attr.inode, content)
                if folder == "hist":
                    self.history_given.add(name)

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
            self.fetched.add((spec.name, False))
            stored = self.shown(spec, where)
            content, version = self.content(stored, where), (spec.name, stored.version)
        else:
            content = self.inode_bytes[inode]
            version = self.run(lambda: self.version_of(inode))
        fh = self.run(lambda: self.core.open(inode, os.O_RDONLY))
        assert fh not in self.handles
        self.handles[fh] = (inode, content, version)

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
        self.run(lambda: self.core.release(fh))
        del self.handles[fh]

    @rule()
    def drop_caches(self) -> None:
        """The kernel evicts every inode no open file holds (`echo 2 > drop_caches`)."""
        open_inodes = {inode for inode, _, _ in self.handles.values()}
        for inode in [i for i in self.lookups if i not in open_inodes]:
            self.core.forget(inode, self.lookups.pop(inode))
        self.check_nothing_leaks()

    # ----- Key Vault changes, then one refresh interval -----------------------------------

    @rule(spec_index=st.integers(0, 3))
    def rotate(self, spec_index: int) -> None:
        spec = self.specs[spec_index]
        self.vault.add("secret", spec.name, f"{spec.name} v{len(self.vault.objects[('secret', spec.name)])}")
        self.refresh_and_check_invalidation(spec)

    @rule(spec_index=st.integers(0, 2))
    def disable_newest(self, spec_index: int) -> None:
        spec = self.specs[spec_index]
        enabled = self.newest_first(spec)
        if len(enabled) < 2:
            return
        enabled[0].enabled = False
        self.refresh_and_check_invalidation(spec)

    def refresh_and_check_invalidation(self, spec: ObjectSpec) -> None:
        async def one_interval() -> None:
            self.trio.clock.jump(INTERVAL)
            await trio.testing.wait_all_tasks_blocked()

        self.invalidated.clear()
        self.run(one_interval)
        expected: set[tuple[int, str]] = set()
        if spec.version_history and (spec.name, True) in self.fetched:
            expected = {(self.folders["root"], "hist"), (self.folders["..data"], "hist")}
            expected |= {(self.folders["hist"], name) for name in self.history_given}
        elif not spec.pinned and (spec.name, False) in self.fetched:
            folders = ("sub",) if spec is NESTED else ("root", "..data")
            expected = {(self.folders[f], name) for f in folders for name, (s, _) in self.entries(f).items() if s is spec}
        assert expected <= self.invalidated, f"{spec.name}: not invalidated: {expected - self.invalidated}"
        if not expected:
            assert self.invalidated == set()

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
                assert attr.size == len(self.inode_bytes[inode])
                await self.check_version_xattr(inode, self.inode_bytes[inode])

        self.run(check)

    async def version_of(self, inode: int) -> tuple[str, str]:
        """(object name, version id) an inode says it holds (its xattrs)."""
        object_id = (await self.core.getxattr(inode, "user.kvfs.object")).decode()
        return object_id.split("/")[1], (await self.core.getxattr(inode, "user.kvfs.version")).decode()

    async def check_version_xattr(self, inode: int, content: bytes) -> None:
        """The bytes are exactly those of the version the inode names."""
        name, version = await self.version_of(inode)
        stored = self.by_version(ObjectSpec(name=name, type="secret"), version)
        assert content in {self.content(stored, suffix) for suffix in ("", ".crt", ".key")}

    def check_nothing_leaks(self) -> None:
        """Inodes no kernel count holds show a version a name shows now or a handle reads."""
        unheld = set(self.core.known_inodes()) - set(self.lookups)
        allowed = {(s.name, self.shown(s, "").version) for s in (PLAIN, NESTED, self.pinned)}
        allowed |= {(HISTORY.name, v.version) for v in self.newest_first(HISTORY)[:3]}
        allowed |= {version for _, _, version in self.handles.values()}
        slots = 3 * 3 + HISTORY.version_history  # three files for each plain object, N history files

        async def versions() -> set[tuple[str, str]]:
            return {await self.version_of(inode) for inode in unheld}

        assert self.run(versions) <= allowed, "a superseded version's inode outlived every reference"
        assert len(unheld) <= slots + len(self.handles)

    def teardown(self) -> None:
        try:
            for fh in list(self.handles):
                self.run(lambda: self.core.release(fh))
            self.handles.clear()
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
