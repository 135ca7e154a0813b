"""FilesystemCore driven directly (no mount), with an in-memory resolver (or the real one)."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

import pytest

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


def make_core(*objects: ObjectSpec, split: bool = False) -> tuple[FilesystemCore, FakeResolver, list]:
    resolver = FakeResolver()
    invalidated: list[tuple[int, str]] = []
    core = FilesystemCore(
        make_config(*objects, split=split),
        resolver,  # type: ignore[arg-type]
        invalidate_entry=lambda parent, name: invalidated.append((parent, name)),
    )
    return core, resolver, invalidated


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
    core, resolver, invalidated = make_core(A)
    resolver.latest["alpha"] = version(A, "v1", b"old value")
    first = await core.lookup(ROOT_INODE, "alpha")
    fh = await core.open(first.inode, os.O_RDONLY)

    resolver.latest["alpha"] = version(A, "v2", b"brand new value")
    await core.on_change(A, resolver.latest["alpha"])
    data_dir = (await core.lookup(ROOT_INODE, "..data")).inode
    assert set(invalidated) == {(ROOT_INODE, "alpha"), (data_dir, "alpha")}

    second = await core.lookup(ROOT_INODE, "alpha")
    assert second.inode != first.inode
    assert second.size == len(b"brand new value")
    assert await core.read(fh, 0, 100) == b"old value"
    fh2 = await core.open(second.inode, os.O_RDONLY)
    assert await core.read(fh2, 4, 3) == b"d n"
    # The old inode still answers getattr while the kernel knows it.
    assert (await core.getattr(first.inode)).size == len(b"old value")


async def test_superseded_inode_is_dropped_after_forget_and_release() -> None:
    core, resolver, _ = make_core(A)
    resolver.latest["alpha"] = version(A, "v1", b"one")
    first = await core.lookup(ROOT_INODE, "alpha")
    fh = await core.open(first.inode, os.O_RDONLY)
    resolver.latest["alpha"] = version(A, "v2", b"two")
    await core.lookup(ROOT_INODE, "alpha")
    core.forget(first.inode, 1)
    assert first.inode in set(core.known_inodes())  # still open
    await core.release(fh)
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


async def test_rotation_invalidates_only_history_names_that_were_shown() -> None:
    wide = ObjectSpec(name="wide", type="secret", version_history=100)
    core, resolver, invalidated = make_core(wide)
    resolver.versions["wide"] = [version(wide, f"v{i}", b"x") for i in range(3)]
    folder = (await core.lookup(ROOT_INODE, "wide")).inode
    await core.readdir(folder)
    await core.on_change(wide, resolver.versions["wide"][0])
    assert sorted(name for parent, name in invalidated if parent == folder) == ["0", "1", "2"]
    assert len(invalidated) == 3 + 2  # and the folder's own name in the root and in ..data


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
