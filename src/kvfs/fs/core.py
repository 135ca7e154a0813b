"""The filesystem core: FUSE semantics as plain async methods, without importing pyfuse3.

Tests drive this class directly; `kvfs.fs.adapter` only translates to and from pyfuse3.

Semantics (docs/SEMANTICS.md states them for users; tests check each):
- One inode per (name, version) holding immutable bytes. A name's lookup returns the inode of
  the version it shows now. When a name moves on, the kernel is told its old inode was deleted
  at every place the name appears (FUSE notify_delete): an inotify watch on the file gets
  IN_DELETE_SELF, as with kubelet's atomic writer.
- `open()` pins bytes in the handle, so an open file keeps reading its version.
- A superseded inode can still be opened: a bind mount of one file (kubelet's `subPath`) holds
  the inode it was made on. While a handle opened before the rotation is open, the inode keeps
  its own attributes and version, because those handles read through the kernel's page cache,
  which clamps reads to the cached size. Once the last such handle is released, the inode
  *follows its name*: its attributes become the name's current version's (the kernel is told
  to drop the cached ones) and each open pins the current version's bytes, read with direct
  I/O (no page cache, no clamping to a cached size).
- Memory: an inode holds its version weakly, with its size, mtime and xattrs. The cache decides
  how long bytes stay (its byte limit); an open handle holds them. Opening an inode whose bytes
  the cache let go fetches them again (or, if its name moved on meanwhile, follows its name).
- Sizes are exact; mtime is the version's `updated` time.
- Listing the root or an alias folder never fetches: an unfetched file is listed with a
  placeholder inode that expires at once. Listing a history folder fetches its versions: its
  names depend on which versions exist.

Concurrency (trio, one thread): every method runs as its own task. State changes happen only
between awaits: `_version_inode`, `_supersede` and `_forget` contain no await, so the inode
table is never seen half-updated. The awaits are the cache calls, whose results are applied
afterwards, and an open of a following inode waiting until the kernel dropped its attributes.
Kernel notifications (`KernelCache`) return at once; their work runs off the trio thread.

The core knows the cache only as `kvfs.cache.base.ObjectCache`, so its tests can run it over
the real cache (with a fake vault) or over a fake cache.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import re
import stat
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

import trio

from kvfs.cache.base import ObjectCache, Version
from kvfs.config.model import MountConfig, ObjectSpec
from kvfs.errors import KvfsError, error_code
from kvfs.fs.tree import ROOT_INODE, DirNode, FileNode, HistoryNode, Node, Tree, build_tree

T = TypeVar("T")

log = logging.getLogger(__name__)

# Version inodes never change, so the kernel may cache their attributes for long. Names that
# follow "latest" are re-validated often to bound staleness if an invalidation is lost; so are
# the attributes of an inode that follows its name.
IMMUTABLE_TIMEOUT = 3600.0
NAME_TIMEOUT = 1.0
DIR_TIMEOUT = 1.0
XATTR_PREFIX = "user.kvfs."
# A history folder's file names: 0 … N-1 in ASCII digits, without leading zeros.
_HISTORY_NAME = re.compile(r"0|[1-9][0-9]*")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT

_Key = tuple[int, int]  # a name: (node identity, history index or -1)


class KernelCache(Protocol):
    """What the core tells the kernel (kvfs.fs.adapter.KernelNotifier on a real mount).

    Both return at once: the kernel calls block, so they run off the trio thread.
    """

    def entry_deleted(self, parent_inode: int, name: str, inode: int) -> None:
        """`name` in `parent_inode` no longer shows `inode` (FUSE notify_delete)."""
        ...

    def attrs_changed(self, inode: int, done: Callable[[], None]) -> None:
        """Drop the kernel's cached attributes of `inode`; `done` runs on the trio thread after."""
        ...


class FsError(KvfsError):
    """A filesystem-level failure with an errno (ENOENT for unknown names, ...)."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or os.strerror(err))
        self.errno = err


@dataclass(frozen=True)
class Attr:
    """What the adapter turns into pyfuse3.EntryAttributes."""

    inode: int
    mode: int
    size: int = 0
    mtime_ns: int = 0
    uid: int = 0
    gid: int = 0
    entry_timeout: float = NAME_TIMEOUT
    attr_timeout: float = IMMUTABLE_TIMEOUT


@dataclass(eq=False)
class _VersionInode:
    """An immutable file: one version of one name, its bytes held only while someone needs them."""

    inode: int
    node: FileNode | HistoryNode
    index: int  # history index, -1 for a plain file
    suffix: str  # which of the version's files: "" or a split ".crt" / ".key"
    version_id: str
    size: int
    mtime_ns: int
    mode: int
    xattrs: dict[str, str]
    bytes_of: weakref.ref[Version]  # alive while the cache or an open handle holds the version
    lookups: int = 0
    opens: int = 0  # every open handle on this inode
    cached_opens: int = 0  # those that read through the kernel's page cache (its own size)
    current: bool = True  # still what its name points to
    follows: bool = False  # superseded, with no page-cache handle left: shows its name's version
    attrs_settled: trio.Event | None = None  # unset while the kernel may hold old attributes

    @property
    def key(self) -> _Key:
        return (id(self.node), self.index)


class _Handle:
    __slots__ = ("vinode", "version", "data", "cached")

    def __init__(self, vinode: _VersionInode, version: Version, data: bytes, cached: bool) -> None:
        self.vinode = vinode  # the inode the kernel opened
        self.version = version  # keeps the bytes alive while the file is open
        self.data = data
        self.cached = cached  # read through the page cache (else direct I/O)


def _xattrs_of(version: Version) -> dict[str, str]:
    """The `user.kvfs.*` attributes of a version's files (without the prefix)."""
    attrs = {
        "object": version.spec.object_id,
        "id": version.kv_id,
        "version": version.version,
        "content_type": version.content_type,
        "updated": str(version.updated),
    }
    if version.expires is not None:
        attrs["expires"] = str(version.expires)
    return attrs


class FilesystemCore:
    """Names → versions → inodes, for one volume."""

    def __init__(
        self,
        config: MountConfig,
        cache: ObjectCache,
        *,
        kernel: KernelCache | None = None,
        uid: int | None = None,
        gid: int | None = None,
        root_xattrs: Mapping[str, str] | None = None,
    ) -> None:
        """`root_xattrs`: `user.kvfs.<name>` attributes of the mount's root (the daemon's control socket)."""
        self.config = config
        self.cache = cache
        self.tree: Tree = build_tree(config)
        self._kernel = kernel  # None: nothing to tell (no mount, as in most tests)
        self._root_xattrs = dict(root_xattrs or {})
        self._uid = os.getuid() if uid is None else uid
        self._gid = os.getgid() if gid is None else gid
        self._next_inode = max(self.tree.dirs) + 1
        self._mounted_ns = time.time_ns()
        self._inodes: dict[int, _VersionInode] = {}
        self._current: dict[_Key, _VersionInode] = {}  # the inode each name shows now
        self._superseded: dict[_Key, set[_VersionInode]] = {}  # older inodes the kernel still knows
        self._handles: dict[int, _Handle] = {}
        self._placeholders: dict[int, FileNode] = {}
        self._placeholder_inodes: dict[int, int] = {}
        self._next_fh = 1
        self.errors: collections.Counter[str] = collections.Counter()  # failed fetches by file name

    # ----- attributes ---------------------------------------------------------------------

    def _dir_attr(self, inode: int) -> Attr:
        return Attr(
            inode=inode,
            mode=stat.S_IFDIR | 0o755,
            mtime_ns=self._mounted_ns,
            uid=self._uid,
            gid=self._gid,
            entry_timeout=DIR_TIMEOUT,
            attr_timeout=DIR_TIMEOUT,
        )

    def _file_attr(self, vinode: _VersionInode, entry_timeout: float) -> Attr:
        if vinode.follows:
            shown = self._current.get(vinode.key)
            if shown is not None:
                return replace(self._file_attr(shown, entry_timeout), inode=vinode.inode, attr_timeout=NAME_TIMEOUT)
        return Attr(
            inode=vinode.inode,
            mode=stat.S_IFREG | vinode.mode,
            size=vinode.size,
            mtime_ns=vinode.mtime_ns,
            uid=self._uid,
            gid=self._gid,
            entry_timeout=entry_timeout,
            attr_timeout=IMMUTABLE_TIMEOUT,
        )

    # ----- names and their inodes -----------------------------------------------------------

    def _version_inode(self, node: FileNode | HistoryNode, index: int, version: Version) -> _VersionInode:
        """The inode showing `version` at `node` (history `index`, -1 for plain files)."""
        key = (id(node), index)
        old = self._current.get(key)
        if old is not None and old.version_id == version.version:
            if old.bytes_of() is None:
                old.bytes_of = weakref.ref(version)
            return old
        suffix = node.suffix if isinstance(node, FileNode) else ""
        vinode = _VersionInode(
            inode=self._next_inode,
            node=node,
            index=index,
            suffix=suffix,
            version_id=version.version,
            size=len(version.files.get(suffix, b"")),
            mtime_ns=version.updated * 1_000_000_000,
            mode=version.spec.file_mode,
            xattrs=_xattrs_of(version),
            bytes_of=weakref.ref(version),
        )
        self._next_inode += 1
        self._inodes[vinode.inode] = vinode
        self._current[key] = vinode
        if old is not None:
            self._supersede(old)
        return vinode

    def _retire(self, key: _Key) -> None:
        """The name no longer exists (a shorter history, a companion file that went away)."""
        old = self._current.pop(key, None)
        if old is not None:
            self._supersede(old)

    def _supersede(self, old: _VersionInode) -> None:
        """`old`'s name moved on: the kernel hears it was deleted; inodes that follow it change."""
        old.current = False
        if old.lookups > 0:
            for parent_inode, name in self._names_of(old):
                if self._kernel is not None:
                    self._kernel.entry_deleted(parent_inode, name, old.inode)
        followers = self._superseded.setdefault(old.key, set())
        followers.add(old)
        if old.cached_opens == 0:
            old.follows = True
        for follower in followers:
            if follower.follows:
                self._attrs_changed(follower)
        self._maybe_drop(old)

    def _names_of(self, vinode: _VersionInode) -> list[tuple[int, str]]:
        """Every (parent inode, name) the kernel may know `vinode` by (the root and ..data, ...)."""
        node = vinode.node
        if isinstance(node, HistoryNode):
            return [(node.inode, str(vinode.index))]
        return [(parent, name) for parent, name, other in self.tree.locations[node.spec] if other is node]

    def _attrs_changed(self, vinode: _VersionInode) -> None:
        """Have the kernel drop `vinode`'s attributes; opens of it wait until that is done."""
        if self._kernel is None or vinode.lookups <= 0:
            return
        settled = trio.Event()
        vinode.attrs_settled = settled
        self._kernel.attrs_changed(vinode.inode, settled.set)

    def _maybe_drop(self, vinode: _VersionInode) -> None:
        if not vinode.current and vinode.lookups <= 0 and vinode.opens <= 0:
            self._inodes.pop(vinode.inode, None)
            followers = self._superseded.get(vinode.key)
            if followers is not None:
                followers.discard(vinode)
                if not followers:
                    del self._superseded[vinode.key]

    async def _resolve(self, node: FileNode | HistoryNode, index: int) -> tuple[_VersionInode, Version]:
        """The inode and version a name shows now, fetched if not cached."""
        if isinstance(node, HistoryNode):
            versions = await self._resolve_history(node)
            if index >= len(versions):
                self._retire((id(node), index))
                raise FsError(errno.ENOENT)
            return self._version_inode(node, index, versions[index]), versions[index]
        version = await self._fetch(node.spec, self.cache.current(node.spec))
        if node.suffix not in version.files:  # a split companion of a secret that is not certificate-backed
            self._retire((id(node), -1))
            raise FsError(errno.ENOENT, f"{node.spec.file_name}{node.suffix}: not a certificate")
        return self._version_inode(node, -1, version), version

    async def _resolve_history(self, node: HistoryNode) -> list[Version]:
        return await self._fetch(node.spec, self.cache.history(node.spec))

    async def _fetch(self, spec: ObjectSpec, fetch: Awaitable[T]) -> T:
        try:
            return await fetch
        except KvfsError as err:
            self.errors[spec.file_name] += 1
            raise FsError(err.errno, f"{spec.file_name}: {error_code(err)}") from err

    # ----- operations ---------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: str) -> Attr:
        """Resolve one name; fetches that object (only) when it is not cached."""
        parent = self.tree.dirs.get(parent_inode)
        if isinstance(parent, HistoryNode):
            if not _HISTORY_NAME.fullmatch(name):  # not str.isdigit(): "²" is a digit to Python
                raise FsError(errno.ENOENT)
            index = int(name)
            if index >= parent.spec.version_history:
                raise FsError(errno.ENOENT)
            vinode, _ = await self._resolve(parent, index)
            vinode.lookups += 1
            return self._file_attr(vinode, NAME_TIMEOUT)
        child = parent.children.get(name) if parent is not None else None
        if child is None:
            raise FsError(errno.ENOENT)
        if isinstance(child, (DirNode, HistoryNode)):
            return self._dir_attr(child.inode)
        vinode, _ = await self._resolve(child, -1)
        vinode.lookups += 1
        entry_timeout = IMMUTABLE_TIMEOUT if child.spec.pinned else NAME_TIMEOUT
        return self._file_attr(vinode, entry_timeout)

    def forget(self, inode: int, count: int) -> None:
        vinode = self._inodes.get(inode)
        if vinode is not None:
            vinode.lookups -= count
            self._maybe_drop(vinode)

    async def getattr(self, inode: int) -> Attr:
        if inode in self.tree.dirs:
            return self._dir_attr(inode)
        vinode = self._inodes.get(inode)
        if vinode is not None:
            return self._file_attr(vinode, NAME_TIMEOUT)
        node = self._placeholders.get(inode)
        if node is not None:
            return self._placeholder_attr(node)
        raise FsError(errno.ENOENT)

    async def readdir(self, inode: int) -> list[tuple[str, Attr]]:
        """Entries with attributes where known without fetching (placeholders otherwise).

        An entry returned with a real inode counts as a lookup (READDIRPLUS); the adapter calls
        `unreaddir` for entries the kernel did not accept.
        """
        node = self.tree.dirs.get(inode)
        if node is None:
            raise FsError(errno.ENOENT)
        if isinstance(node, HistoryNode):
            return await self._readdir_history(node)
        entries: list[tuple[str, Attr]] = []
        for name, child in node.children.items():
            attr = self._peek_attr(child)
            if attr is not None:
                entries.append((name, attr))
        return entries

    async def _readdir_history(self, node: HistoryNode) -> list[tuple[str, Attr]]:
        versions = await self._resolve_history(node)
        entries = []
        for index, version in enumerate(versions[: node.spec.version_history]):
            vinode = self._version_inode(node, index, version)
            vinode.lookups += 1
            entries.append((str(index), self._file_attr(vinode, NAME_TIMEOUT)))
        return entries

    def _peek_attr(self, child: Node) -> Attr | None:
        """A listing entry's attributes from the cache; None for a name known not to exist.

        That is a split `.crt`/`.key` of a secret fetched and found not certificate-backed: its
        lookup is ENOENT, and a listed name that cannot be opened breaks `cp -r`. Before the
        first fetch the content type is unknown and the name is listed with a placeholder.
        """
        if isinstance(child, (DirNode, HistoryNode)):
            return self._dir_attr(child.inode)
        version = self.cache.peek(child.spec)
        if version is None:
            return self._placeholder_attr(child)
        if child.suffix not in version.files:
            return None
        vinode = self._version_inode(child, -1, version)
        vinode.lookups += 1
        timeout = IMMUTABLE_TIMEOUT if child.spec.pinned else NAME_TIMEOUT
        return self._file_attr(vinode, timeout)

    def _placeholder_attr(self, node: FileNode) -> Attr:
        """Attributes for a listed but unfetched file.

        The kernel drops entries without an inode from listings, so an unfetched file is listed
        with a per-name placeholder inode whose entry and attributes expire at once: any
        access (stat, open) then looks the name up again and gets the real version's inode.
        """
        inode = self._placeholder_inodes.get(id(node))
        if inode is None:
            inode = self._next_inode
            self._next_inode += 1
            self._placeholder_inodes[id(node)] = inode
            self._placeholders[inode] = node
        return Attr(
            inode=inode,
            mode=stat.S_IFREG | node.spec.file_mode,
            uid=self._uid,
            gid=self._gid,
            entry_timeout=0.0,
            attr_timeout=0.0,
        )

    def unreaddir(self, attr: Attr) -> None:
        """Undo the lookup count of a readdir entry the kernel did not take."""
        self.forget(attr.inode, 1)

    def open_cached(self, inode: int, flags: int) -> int | None:
        """`open` without awaiting anything: a handle, or None when `open` must fetch or wait.

        That is the path of every open of a cached file (the adapter calls it first).
        """
        if flags & _WRITE_FLAGS:
            raise FsError(errno.EROFS)
        vinode = self._inodes.get(inode)
        if vinode is None or vinode.follows:
            return None
        version = vinode.bytes_of()
        if version is None:
            return None
        # A superseded inode not following yet still has page-cache readers: new opens get its
        # own version too, but with direct I/O, so they do not hold the switch to the name back.
        return self._new_handle(vinode, version, cached=vinode.current)

    async def open(self, inode: int, flags: int) -> int:
        """Pin bytes to a new handle; write access is refused.

        The bytes are the inode's own version, or for an inode that follows its name (and a
        listing's placeholder) the name's current one, read with direct I/O (see `direct_io`).
        """
        fh = self.open_cached(inode, flags)
        if fh is not None:
            return fh
        vinode = self._inodes.get(inode)
        node = vinode.node if vinode is not None else self._placeholders.get(inode)
        if node is None:
            raise FsError(errno.EISDIR if inode in self.tree.dirs else errno.ENOENT)
        index = vinode.index if vinode is not None else -1
        while True:
            shown, version = await self._resolve(node, index)
            if shown is vinode:  # the cache had let the bytes go; the name still shows them
                return self._new_handle(shown, version, cached=True)
            settled = vinode.attrs_settled if vinode is not None else None
            if settled is None or settled.is_set():
                return self._new_handle(vinode or shown, version, cached=False)
            # Answering now would let `fstat` show the kernel's old size; the name may move
            # on again meanwhile, so resolve it again after.
            await settled.wait()

    def _new_handle(self, vinode: _VersionInode, version: Version, *, cached: bool) -> int:
        vinode.opens += 1
        if cached:
            vinode.cached_opens += 1
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(vinode, version, version.files.get(vinode.suffix, b""), cached)
        return fh

    def direct_io(self, fh: int) -> bool:
        """Whether reads of `fh` must bypass the kernel's page cache: its bytes are not its inode's own."""
        return not self._handles[fh].cached

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        return handle.data[offset : offset + size]

    def release(self, fh: int) -> None:
        """Never waits: the kernel sends RELEASE after every close."""
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        vinode = handle.vinode
        vinode.opens -= 1
        if handle.cached:
            vinode.cached_opens -= 1
            if vinode.cached_opens == 0 and not vinode.current:
                # The last reader clamped to the old size is gone: follow the name from now on.
                vinode.follows = True
                self._attrs_changed(vinode)
        self._maybe_drop(vinode)

    # ----- extended attributes ------------------------------------------------------------

    def _xattrs(self, inode: int) -> dict[str, str]:
        if inode == ROOT_INODE:
            return self._root_xattrs
        vinode = self._inodes.get(inode)
        if vinode is None:
            return {}
        if vinode.follows:
            vinode = self._current.get(vinode.key, vinode)
        return vinode.xattrs

    async def listxattr(self, inode: int) -> list[str]:
        return [XATTR_PREFIX + name for name in self._xattrs(inode)]

    async def getxattr(self, inode: int, name: str) -> bytes:
        if not name.startswith(XATTR_PREFIX):
            raise FsError(errno.ENODATA)
        value = self._xattrs(inode).get(name[len(XATTR_PREFIX) :])
        if value is None:
            raise FsError(errno.ENODATA)
        return value.encode()

    # ----- rotation -----------------------------------------------------------------------

    async def on_change(self, spec: ObjectSpec, version: Version) -> None:
        """A new version of `spec` appeared: re-point its names the kernel knows, now.

        The cache already serves the new version. Each name moves to a new inode; the kernel
        hears that the old one was deleted (see `_supersede`); open handles keep their bytes.
        """
        done: set[int] = set()
        for _, _, node in self.tree.locations.get(spec, []):
            if id(node) in done:  # the root's names appear in ..data too: same node
                continue
            done.add(id(node))
            if isinstance(node, HistoryNode):
                self._history_changed(node)
            elif isinstance(node, FileNode) and self._known((id(node), -1)):
                if node.suffix in version.files:
                    self._version_inode(node, -1, version)
                else:
                    self._retire((id(node), -1))

    def _history_changed(self, node: HistoryNode) -> None:
        versions = self.cache.peek_history(node.spec)
        if versions is None:  # not cached (any more): the next lookup re-points the names
            return
        for index in range(node.spec.version_history):
            if not self._known((id(node), index)):
                continue
            if index < len(versions):
                self._version_inode(node, index, versions[index])
            else:
                self._retire((id(node), index))

    def _known(self, key: _Key) -> bool:
        """Whether the kernel may know the name: an inode shows it, or follows it."""
        return key in self._current or key in self._superseded

    def known_inodes(self) -> Iterator[int]:
        """For tests: file inodes the core still holds."""
        return iter(self._inodes)
