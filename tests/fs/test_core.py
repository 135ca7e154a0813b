"""FilesystemCore driven directly (no mount), with an in-memory resolver (or the real one)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from cache.fakevault import FakeVault, fake_render
from kvfs.cache.resolver import Resolver
from kvfs.config.model import AuthConfig, CloudConfig, MountConfig, ObjectSpec
from kvfs.errors import VaultError
from kvfs.fs.core import FilesystemCore, FsError
from kvfs.fs.tree import ROOT_INODE

CLOUD = CloudConfig("AzurePublicCloud", "vault.azure.net", "https://vault.azure.net", "https://login.microsoftonline.com")


@dataclass(frozen=True)
class FakeVersion:
    spec: ObjectSpec
    version: str
    files: dict[str, bytes]
    kv_id: str = ""
    content_type: str = ""
    created: int = 1_700_000_000
    updated: int = 1_700_000_000
    expires: int | None = None


@dataclass
class FakeResolver:
    """Serves whatever the test put in `latest` / `versions`; counts fetches."""

    latest: dict[str, FakeVersion] = field(default_factory=dict)
    versions: dict[str, list[FakeVersion]] = field(default_factory=dict)
    errors: dict[str, Exception] = field(default_factory=dict)
    cached: dict[str, FakeVersion] = field(default_factory=dict)
    fetches: list[str] = field(default_factory=list)

    async def current(self, spec: ObjectSpec) -> FakeVersion:
        self.fetches.append(spec.name)
        if spec.name in self.errors:
            raise self.errors[spec.name]
        self.cached[spec.name] = self.latest[spec.name]
        return self.latest[spec.name]

    def peek(self, spec: ObjectSpec) -> FakeVersion | None:
        return self.cached.get(spec.name)

    async def history(self, spec: ObjectSpec) -> list[FakeVersion]:
        self.fetches.append(spec.name)
        return self.versions[spec.name][: spec.version_history]

    def peek_history(self, spec: ObjectSpec) -> list[FakeVersion] | None:
        return self.versions[spec.name][: spec.version_history] if spec.name in self.versions else None


@dataclass
class FakeKernel:
    """Records what the core tells the kernel; attribute drops finish when `settle` is called."""

    deleted: list[tuple[int, str, int]] = field(default_factory=list)
    dropped_attrs: list[int] = field(default_factory=list)
    pending: list[Callable[[], None]] = field(default_factory=list)
    immediate: bool = True

    def entry_deleted(self, parent_inode: int, name: str, inode: int) -> None:
        self.deleted.append((parent_inode, name, inode))

    def attrs_changed(self, inode: int, done: Callable[[], None]) -> None:
        self.dropped_attrs.append(inode)
        self.pending.append(done)
        if self.immediate:
            self.settle()

    def settle(self) -> None:
        while self.pending:
            self.pending.pop(0)()


def make_config(*objects: ObjectSpec, split: bool = False) -> MountConfig:
    return MountConfig(
        vault_name="demo",
        cloud=CLOUD,
        auth=AuthConfig(mode="default_chain"),
        objects=objects,
        split_cert_key=split,
    )


def version(spec: ObjectSpec, ver: str, data: bytes, **files: bytes) -> FakeVersion:
    all_files = {"": data, **{"." + k: v for k, v in files.items()}}
    return FakeVersion(spec, ver, all_files, kv_id=f"https://demo.vault.azure.net/secrets/{spec.name}/{ver}")


def make_core(*objects: ObjectSpec, split: bool = False) -> tuple[FilesystemCore, FakeResolver, FakeKernel]:
    resolver = FakeResolver()
    kernel = FakeKernel()
    core = FilesystemCore(make_config(*objects, split=split), resolver, kernel=kernel)  # type: ignore[arg-type]
    return core, resolver, kernel


A = ObjectSpec(name="alpha", type="secret")
B = ObjectSpec(name="beta", type="secret", alias="nested/dir/b.txt", file_mode=0o600)
H = ObjectSpec(name="hist", type="secret", version_history=3)


async def test_listing_root_fetches_nothing_and_shows_every_name() -> None:
    core, resolver, _ = make_core(A, B, H)
    names = [name for name, _ in await core.readdir(ROOT_INODE)]
    assert sorted(names) == ["..data", "alpha", "hist", "nested"]
    assert resolver.fetches == []
    data_dir = (await core.lookup(ROOT_INODE, "..data")).inode
    assert sorted(n for n, _ in await core.readdir(data_dir)) == ["alpha", "hist", "nested"]
    assert resolver.fetches == []


async def test_lookup_fetches_only_that_object_with_exact_size_mode_and_mtime() -> None:
    core, resolver, _ = make_core(A, B)
    resolver.latest["beta"] = FakeVersion(B, "v1", {"": b"hello beta"}, updated=1_700_000_123)
    nested = await core.lookup(ROOT_INODE, "nested")
    assert stat.S_ISDIR(nested.mode)
    inner = await core.lookup(nested.inode, "dir")
    attr = await core.lookup(inner.inode, "b.txt")
    assert resolver.fetches == ["beta"]
    assert attr.size == len(b"hello beta")
    assert stat.S_IMODE(attr.mode) == 0o600 and stat.S_ISREG(attr.mode)
    assert attr.mtime_ns == 1_700_000_123 * 10**9


async def test_dot_data_view_shows_the_same_inode() -> None:
    core, resolver, _ = make_core(A)
    resolver.latest["alpha"] = version(A, "v1", b"x")
    top = await core.lookup(ROOT_INODE, "alpha")
    data_dir = await core.lookup(ROOT_INODE, "..data")
    assert (await core.lookup(data_dir.inode, "alpha")).inode == top.inode


async def test_open_pins_the_version_across_rotation() -> None:
    core, resolver, kernel = make_core(A)
    resolver.latest["alpha"] = version(A, "v1", b"old value")
    first = await core.lookup(ROOT_INODE, "alpha")
    fh = await core.open(first.inode, os.O_RDONLY)
    assert not core.direct_io(fh)  # the page cache serves it

    resolver.latest["alpha"] = version(A, "v2", b"brand new value")
    await core.on_change(A, resolver.latest["alpha"])
    data_dir = (await core.lookup(ROOT_INODE, "..data")).inode
    assert set(kernel.deleted) == {(ROOT_INODE, "alpha", first.inode), (data_dir, "alpha", first.inode)}

    second = await core.lookup(ROOT_INODE, "alpha")
    assert second.inode != first.inode
    assert second.size == len(b"brand new value")
    assert await core.read(fh, 0, 100) == b"old value"
    fh2 = await core.open(second.inode, os.O_RDONLY)
    assert await core.read(fh2, 4, 3) == b"d n"
    # The old inode still answers getattr while the kernel knows it.
    assert (await core.getattr(first.inode)).size == len(b"old value")


async def test_rotation_tells_the_kernel_the_old_inode_was_deleted_wherever_it_is_named() -> None:
    tls = ObjectSpec(name="tls", type="secret")
    core, resolver, kernel = make_core(tls, B, ObjectSpec(name="unread", type="secret"), split=True)
    resolver.latest["tls"] = version(tls, "v1", b"KEY+CERT", crt=b"CERT", key=b"KEY")
    resolver.latest["beta"] = version(B, "v1", b"b1")
    data_dir = (await core.lookup(ROOT_INODE, "..data")).inode
    old = {name: (await core.lookup(ROOT_INODE, name)).inode for name in ("tls", "tls.crt")}
    nested = (await core.lookup(ROOT_INODE, "nested")).inode
    folder = (await core.lookup(nested, "dir")).inode
    old_b = (await core.lookup(folder, "b.txt")).inode

    await core.on_change(B, resolver.latest["beta"])  # the same version: nothing changed
    resolver.latest["unread"] = version(ObjectSpec(name="unread", type="secret"), "v2", b"u")
    await core.on_change(ObjectSpec(name="unread", type="secret"), resolver.latest["unread"])  # never looked up
    assert kernel.deleted == []

    resolver.latest["beta"] = version(B, "v2", b"b2")
    await core.on_change(B, resolver.latest["beta"])
    assert kernel.deleted == [(folder, "b.txt", old_b)]  # ..data/nested is the same folder

    kernel.deleted.clear()
    resolver.latest["tls"] = version(tls, "v2", b"no longer a certificate")  # no .crt/.key any more
    await core.on_change(tls, resolver.latest["tls"])
    assert sorted(kernel.deleted) == sorted(
        (parent, name, old[name]) for parent in (ROOT_INODE, data_dir) for name in ("tls", "tls.crt")
    )
    assert (await core.lookup(ROOT_INODE, "tls")).inode != old["tls"]
    with pytest.raises(FsError):
        await core.lookup(ROOT_INODE, "tls.crt")


async def test_a_superseded_inode_keeps_its_version_while_page_cache_readers_remain_then_follows_its_name() -> None:
    """What a bind mount of one file (kubelet's subPath) sees: it holds the inode it was made on."""
    core, resolver, kernel = make_core(A)
    resolver.latest["alpha"] = version(A, "v1", b"one")
    bound = (await core.lookup(ROOT_INODE, "alpha")).inode
    reader = await core.open(bound, os.O_RDONLY)  # through the page cache, clamped to size 3

    resolver.latest["alpha"] = version(A, "v2", b"two, longer")
    await core.on_change(A, resolver.latest["alpha"])
    during = await core.open(bound, os.O_RDONLY)
    assert await core.read(during, 0, 100) == b"one"  # its own version while `reader` is open …
    assert core.direct_io(during)  # … but not through the page cache, so it holds nothing back
    assert (await core.getattr(bound)).size == 3
    assert kernel.dropped_attrs == []
    core.release(during)
    assert kernel.dropped_attrs == []

    core.release(reader)  # the last page-cache reader: the inode follows its name from now on
    assert kernel.dropped_attrs == [bound]
    attr = await core.getattr(bound)
    assert (attr.inode, attr.size, attr.attr_timeout) == (bound, len(b"two, longer"), 1.0)
    assert await core.getxattr(bound, "user.kvfs.version") == b"v2"
    after = await core.open(bound, os.O_RDONLY)
    assert core.direct_io(after)
    assert await core.read(after, 0, 100) == b"two, longer"

    resolver.latest["alpha"] = version(A, "v3", b"3")
    await core.on_change(A, resolver.latest["alpha"])  # it keeps following
    assert kernel.dropped_attrs == [bound, bound]
    assert (await core.getattr(bound)).size == 1
    assert await core.read(after, 0, 100) == b"two, longer"  # an open file keeps its bytes
    third = await core.open(bound, os.O_RDONLY)
    assert await core.read(third, 0, 100) == b"3"
    path_open = await core.open((await core.lookup(ROOT_INODE, "alpha")).inode, os.O_RDONLY)
    assert not core.direct_io(path_open)  # the name's own inode still uses the page cache


async def test_an_open_of_a_following_inode_is_answered_after_the_kernel_dropped_its_old_attributes() -> None:
    core, resolver, kernel = make_core(A)
    kernel.immediate = False
    resolver.latest["alpha"] = version(A, "v1", b"one")
    bound = (await core.lookup(ROOT_INODE, "alpha")).inode
    resolver.latest["alpha"] = version(A, "v2", b"two")
    await core.on_change(A, resolver.latest["alpha"])
    assert kernel.dropped_attrs == [bound]
    opened: list[int] = []

    async def open_bound() -> None:
        opened.append(await core.open(bound, os.O_RDONLY))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_bound)
        await trio.testing.wait_all_tasks_blocked()
        assert opened == []  # `fstat` right after would still get the old size from the kernel
        kernel.settle()
    assert await core.read(opened[0], 0, 100) == b"two"


async def test_superseded_inode_is_dropped_after_forget_and_release() -> None:
    core, resolver, _ = make_core(A)
    resolver.latest["alpha"] = version(A, "v1", b"one")
    first = await core.lookup(ROOT_INODE, "alpha")
    fh = await core.open(first.inode, os.O_RDONLY)
    resolver.latest["alpha"] = version(A, "v2", b"two")
    await core.lookup(ROOT_INODE, "alpha")
    core.forget(first.inode, 1)
    assert first.inode in set(core.known_inodes())  # still open
    core.release(fh)
    assert first.inode not in set(core.known_inodes())


async def test_rotation_retires_the_old_inode_without_another_lookup() -> None:
    """The old bytes go once the kernel forgets them, even if the name is never looked up again."""
    core, resolver, _ = make_core(A)
    resolver.latest["alpha"] = version(A, "v1", b"one")
    first = await core.lookup(ROOT_INODE, "alpha")
    resolver.latest["alpha"] = version(A, "v2", b"two")
    await core.on_change(A, resolver.latest["alpha"])
    assert (await core.getattr(first.inode)).size == 3  # the kernel still knows it
    core.forget(first.inode, 1)
    assert first.inode not in set(core.known_inodes())


async def test_same_version_keeps_the_same_inode() -> None:
    core, resolver, _ = make_core(A)
    resolver.latest["alpha"] = version(A, "v1", b"one")
    assert (await core.lookup(ROOT_INODE, "alpha")).inode == (await core.lookup(ROOT_INODE, "alpha")).inode


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_APPEND])
async def test_write_access_is_refused(flags: int) -> None:
    core, resolver, _ = make_core(A)
    resolver.latest["alpha"] = version(A, "v1", b"x")
    attr = await core.lookup(ROOT_INODE, "alpha")
    with pytest.raises(FsError) as info:
        await core.open(attr.inode, flags)
    assert info.value.errno == errno.EROFS


@pytest.mark.parametrize(
    ("status", "expected"),
    [(404, errno.ENOENT), (403, errno.EACCES), (401, errno.EACCES), (429, errno.EIO), (0, errno.EIO)],
)
async def test_vault_errors_map_to_errno_per_object(status: int, expected: int) -> None:
    core, resolver, _ = make_core(A, ObjectSpec(name="gamma", type="secret"))
    resolver.errors["alpha"] = VaultError("boom", status=status, code="SecretNotFound")
    resolver.latest["gamma"] = FakeVersion(ObjectSpec(name="gamma", type="secret"), "v1", {"": b"fine"})
    with pytest.raises(FsError) as info:
        await core.lookup(ROOT_INODE, "alpha")
    assert info.value.errno == expected
    assert (await core.lookup(ROOT_INODE, "gamma")).size == 4


async def test_unknown_names_and_inodes_are_enoent() -> None:
    core, _, _ = make_core(A)
    for call in (core.lookup(ROOT_INODE, "nope"), core.getattr(999), core.readdir(999)):
        with pytest.raises(FsError) as info:
            await call
        assert info.value.errno == errno.ENOENT


async def test_history_folder_has_exactly_the_available_versions() -> None:
    core, resolver, _ = make_core(H)
    resolver.versions["hist"] = [version(H, f"v{i}", f"value {i}".encode()) for i in range(5)]
    folder = await core.lookup(ROOT_INODE, "hist")
    assert stat.S_ISDIR(folder.mode)
    entries = await core.readdir(folder.inode)
    assert [name for name, _ in entries] == ["0", "1", "2"]
    assert [attr.size for _, attr in entries] == [7, 7, 7]
    newest = await core.lookup(folder.inode, "0")
    fh = await core.open(newest.inode, os.O_RDONLY)
    assert await core.read(fh, 0, 100) == b"value 0"
    for bad in ("3", "01", "-1", "x"):
        with pytest.raises(FsError):
            await core.lookup(folder.inode, bad)


@pytest.mark.parametrize("history", [0, 1])
async def test_history_of_one_version_is_a_plain_file(history: int) -> None:
    single = ObjectSpec(name="hist", type="secret", version_history=history)
    core, resolver, _ = make_core(single)
    resolver.latest["hist"] = version(single, "v1", b"newest")
    attr = await core.lookup(ROOT_INODE, "hist")
    assert stat.S_ISREG(attr.mode) and attr.size == len(b"newest")


@pytest.mark.parametrize("name", ["²", "١", "０", "𝟘", "1²", "٣"])
async def test_history_names_are_ascii_digits_only(name: str) -> None:
    assert name[0].isdigit()  # Python's idea of a digit; not a history file name
    core, resolver, _ = make_core(H)
    resolver.versions["hist"] = [version(H, f"v{i}", b"x") for i in range(5)]
    folder = await core.lookup(ROOT_INODE, "hist")
    with pytest.raises(FsError) as info:
        await core.lookup(folder.inode, name)
    assert info.value.errno == errno.ENOENT
    assert resolver.fetches == []  # refused before asking the cache


async def test_history_rotation_deletes_exactly_the_shown_entries_whose_inode_changed() -> None:
    wide = ObjectSpec(name="wide", type="secret", version_history=100)
    core, resolver, kernel = make_core(wide)
    resolver.versions["wide"] = [version(wide, f"v{i}", b"x") for i in range(4)]
    folder = (await core.lookup(ROOT_INODE, "wide")).inode
    shown = {name: attr.inode for name, attr in await core.readdir(folder)}
    assert sorted(shown) == ["0", "1", "2", "3"]
    core.forget(shown["3"], 1)  # the kernel forgot "3": nothing of it is cached

    resolver.versions["wide"].insert(0, version(wide, "v9", b"new"))  # every index moves on
    await core.on_change(wide, resolver.versions["wide"][0])
    assert sorted(kernel.deleted) == [(folder, str(i), shown[str(i)]) for i in range(3)]

    kernel.deleted.clear()
    resolver.versions["wide"] = resolver.versions["wide"][:2]  # only the oldest ones went away
    await core.on_change(wide, resolver.versions["wide"][0])
    assert kernel.deleted == []  # the kernel never saw the inodes of 2 and 3 after the move
    assert (await core.lookup(folder, "0")).size == 3
    with pytest.raises(FsError) as info:
        await core.lookup(folder, "2")
    assert info.value.errno == errno.ENOENT


async def test_core_over_the_real_cache_and_a_fake_vault() -> None:
    """FilesystemCore depends on the ObjectCache protocol: the real cache fits it."""
    vault = FakeVault()
    vault.add("secret", "alpha", "first")
    for i in range(4):
        vault.add("secret", "hist", f"h{i}")
    config = make_config(A, H)
    core = FilesystemCore(config, Resolver(vault, config, render=fake_render))
    assert sorted(name for name, _ in await core.readdir(ROOT_INODE)) == ["..data", "alpha", "hist"]
    assert vault.calls["get"] == 0
    fh = await core.open((await core.lookup(ROOT_INODE, "alpha")).inode, os.O_RDONLY)
    assert await core.read(fh, 0, 100) == b"first"
    folder = (await core.lookup(ROOT_INODE, "hist")).inode
    assert [name for name, _ in await core.readdir(folder)] == ["0", "1", "2"]
    newest = await core.open((await core.lookup(folder, "0")).inode, os.O_RDONLY)
    assert await core.read(newest, 0, 100) == b"h3"
    assert (vault.calls["get"], vault.calls["list"]) == (1 + 3, 1)


async def test_split_companions_exist_only_for_certificate_backed_secrets() -> None:
    cert = ObjectSpec(name="tls", type="secret")
    plain = ObjectSpec(name="plain", type="secret")
    core, resolver, _ = make_core(cert, plain, split=True)
    resolver.latest["tls"] = version(cert, "v1", b"KEY+CERT", crt=b"CERT", key=b"KEY")
    resolver.latest["plain"] = version(plain, "v1", b"just a value")
    assert (await core.lookup(ROOT_INODE, "tls.crt")).size == 4
    assert (await core.lookup(ROOT_INODE, "tls.key")).size == 3
    with pytest.raises(FsError) as info:
        await core.lookup(ROOT_INODE, "plain.crt")
    assert info.value.errno == errno.ENOENT


async def test_listing_after_a_read_carries_attributes_and_counts_lookups() -> None:
    core, resolver, _ = make_core(A)
    resolver.latest["alpha"] = version(A, "v1", b"abc")
    await core.lookup(ROOT_INODE, "alpha")
    listed = dict(await core.readdir(ROOT_INODE))
    assert listed["alpha"].inode != 0 and listed["alpha"].size == 3
    assert resolver.fetches == ["alpha"]


async def test_xattrs_describe_the_version() -> None:
    core, resolver, _ = make_core(A)
    resolver.latest["alpha"] = FakeVersion(
        A, "0123456789abcdef0123456789abcdef", {"": b"x"}, kv_id="https://demo/secrets/alpha/0123", content_type="text/plain", expires=1_800_000_000
    )
    attr = await core.lookup(ROOT_INODE, "alpha")
    names = await core.listxattr(attr.inode)
    assert "user.kvfs.version" in names and "user.kvfs.expires" in names
    assert await core.getxattr(attr.inode, "user.kvfs.version") == b"0123456789abcdef0123456789abcdef"
    assert await core.getxattr(attr.inode, "user.kvfs.content_type") == b"text/plain"
    assert await core.getxattr(attr.inode, "user.kvfs.object") == b"secret/alpha"
    with pytest.raises(FsError):
        await core.getxattr(attr.inode, "user.other")


async def test_unfetched_files_are_listed_with_an_expiring_placeholder() -> None:
    core, resolver, _ = make_core(A)
    resolver.latest["alpha"] = version(A, "v1", b"abc")
    placeholder = dict(await core.readdir(ROOT_INODE))["alpha"]
    assert placeholder.inode != 0
    assert placeholder.entry_timeout == 0 and placeholder.attr_timeout == 0
    assert resolver.fetches == []
    assert (await core.getattr(placeholder.inode)).inode == placeholder.inode
    real = await core.lookup(ROOT_INODE, "alpha")
    assert real.inode != placeholder.inode and real.size == 3
    # A kernel that opens through a stale placeholder still gets the real bytes.
    fh = await core.open(placeholder.inode, os.O_RDONLY)
    assert await core.read(fh, 0, 10) == b"abc"
