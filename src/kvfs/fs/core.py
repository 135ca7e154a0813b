"""The filesystem core: FUSE semantics as plain async methods, without importing pyfuse3.

Tests drive this class directly; `kvfs.fs.adapter` only translates to and from pyfuse3.

Semantics (docs/SEMANTICS.md states them for users; tests check each):
- One inode per (name, version) holding immutable bytes. A name's lookup returns the inode of
  the version it shows now; rotation re-points the name and asks the kernel to drop the dentry.
- `open()` pins the inode's bytes in the handle, so an open file keeps reading its version.
- Memory: an inode holds its version weakly, with its size, mtime and xattrs. The cache decides
  how long bytes stay (its byte limit); an open handle holds them. Opening an inode whose bytes
  the cache let go fetches them again; if its name shows another version by then, the open
  fails with ESTALE and the kernel looks the name up again.
- Sizes are exact; mtime is the version's `updated` time.
- Listing the root or an alias folder never fetches: an unfetched file is listed with a
  placeholder inode that expires at once. Listing a history folder fetches its versions: its
  names depend on which versions exist.

Concurrency (trio, one thread): every method runs as its own task. State changes happen only
between awaits: `_version_inode` and `_forget` contain no await, so the inode table is never
seen half-updated. The only awaits are the cache calls, whose results are applied afterwards.

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
from dataclasses import dataclass
from typing import TypeVar

from kvfs.cache.base import ObjectCache, Version
from kvfs.config.model import MountConfig, ObjectSpec
from kvfs.errors import KvfsError, error_code
from kvfs.fs.tree import ROOT_INODE, DirNode, FileNode, HistoryNode, Node, Tree, build_tree

T = TypeVar("T")

log = logging.getLogger(__name__)

# Version inodes never change, so the kernel may cache their attributes for long. Names that
# follow "latest" are re-validated often to bound staleness if an invalidation is lost.
IMMUTABLE_TIMEOUT = 3600.0
NAME_TIMEOUT = 1.0
DIR_TIMEOUT = 1.0
XATTR_PREFIX = "user.kvfs."
# A history folder's file names: 0 … N-1 in ASCII digits, without leading zeros.
_HISTORY_NAME = re.compile(r"0|[1-9][0-9]*")


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
    """An immutable file: one version of one node, its bytes held only while someone needs them."""

    inode: int
    node: FileNode | HistoryNode
    suffix: str  # which of the version's files: "" or a split ".crt" / ".key"
    version_id: str
    size: int
    mtime_ns: int
    mode: int
    xattrs: dict[str, str]
    bytes_of: weakref.ref[Version]  # alive while the cache or an open handle holds the version
    lookups: int = 0
    opens: int = 0
    current: bool = True  # still what its name points to


@dataclass(frozen=True)
class _Handle:
    vinode: _VersionInode
    version: Version  # keeps the bytes alive while the file is open
    data: bytes


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
        invalidate_entry: Callable[[int, str], None] | None = None,
        uid: int | None = None,
        gid: int | None = None,
        root_xattrs: Mapping[str, str] | None = None,
    ) -> None:
        """`root_xattrs`: `user.kvfs.<name>` attributes of the mount's root (the daemon's control socket)."""
        self.config = config
        self.cache = cache
        self.tree: Tree = build_tree(config)
        self._invalidate_entry = invalidate_entry or (lambda parent, name: None)
        self._root_xattrs = dict(root_xattrs or {})
        self._uid = os.getuid() if uid is None else uid
        self._gid = os.getgid() if gid is None else gid
        self._next_inode = max(self.tree.dirs) + 1
        self._mounted_ns = time.time_ns()
        self._inodes: dict[int, _VersionInode] = {}
        # (node identity, history index or -1) → the inode that name shows now.
        self._current: dict[tuple[int, int], _VersionInode] = {}
        # History folder inode → how many of its indices the kernel was told about (0 … n-1).
        self._history_shown: dict[int, int] = {}
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

    # ----- resolving names ----------------------------------------------------------------

    def _version_inode(self, node: FileNode | HistoryNode, index: int, version: Version) -> _VersionInode:
        """The inode showing `version` at `node` (history `index`, -1 for plain files)."""
        key = (id(node), index)
        vinode = self._current.get(key)
        if vinode is not None and vinode.version_id == version.version:
            if vinode.bytes_of() is None:
                vinode.bytes_of = weakref.ref(version)
            return vinode
        self._retire(key)
        suffix = node.suffix if isinstance(node, FileNode) else ""
        if isinstance(node, HistoryNode):
            self._history_shown[node.inode] = max(self._history_shown.get(node.inode, 0), index + 1)
        vinode = _VersionInode(
            inode=self._next_inode,
            node=node,
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
        return vinode

    def _retire(self, key: tuple[int, int]) -> None:
        """The name at `key` moves on; its old inode lives while the kernel or a handle knows it."""
        vinode = self._current.pop(key, None)
        if vinode is not None:
            vinode.current = False
            self._maybe_drop(vinode)

    def _maybe_drop(self, vinode: _VersionInode) -> None:
        if not vinode.current and vinode.lookups <= 0 and vinode.opens <= 0:
            self._inodes.pop(vinode.inode, None)

    async def _resolve_file(self, node: FileNode) -> _VersionInode:
        version = await self._fetch(node.spec, self.cache.current(node.spec))
        if node.suffix not in version.files:  # a split companion of a secret that is not certificate-backed
            raise FsError(errno.ENOENT, f"{node.spec.file_name}{node.suffix}: not a certificate")
        return self._version_inode(node, -1, version)

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
            vinode = await self._history_entry(parent, name)
            vinode.lookups += 1
            return self._file_attr(vinode, NAME_TIMEOUT)
        child = parent.children.get(name) if parent is not None else None
        if child is None:
            raise FsError(errno.ENOENT)
        if isinstance(child, (DirNode, HistoryNode)):
            return self._dir_attr(child.inode)
        vinode = await self._resolve_file(child)
        vinode.lookups += 1
        entry_timeout = IMMUTABLE_TIMEOUT if child.spec.pinned else NAME_TIMEOUT
        return self._file_attr(vinode, entry_timeout)

    async def _history_entry(self, node: HistoryNode, name: str) -> _VersionInode:
        if not _HISTORY_NAME.fullmatch(name):  # not str.isdigit(): "²" is a digit to Python
            raise FsError(errno.ENOENT)
        index = int(name)
        if index >= node.spec.version_history:
            raise FsError(errno.ENOENT)
        versions = await self._resolve_history(node)
        if index >= len(versions):
            raise FsError(errno.ENOENT)
        return self._version_inode(node, index, versions[index])

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

    async def open(self, inode: int, flags: int) -> int:
        """Pin the inode's bytes to a new handle; write access is refused."""
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT):
            raise FsError(errno.EROFS)
        vinode = self._inodes.get(inode)
        if vinode is None and inode in self._placeholders:
            vinode = await self._resolve_file(self._placeholders[inode])
        if vinode is None:
            raise FsError(errno.EISDIR if inode in self.tree.dirs else errno.ENOENT)
        version = vinode.bytes_of() or await self._refetch(vinode)
        vinode.opens += 1
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(vinode, version, version.files.get(vinode.suffix, b""))
        return fh

    async def _refetch(self, vinode: _VersionInode) -> Version:
        """The bytes of an inode the cache let go: its name's version now, if it is still this one."""
        node = vinode.node
        if isinstance(node, HistoryNode):
            shown = await self._resolve_history(node)
        else:
            shown = [await self._fetch(node.spec, self.cache.current(node.spec))]
        for version in shown:
            if version.version == vinode.version_id and len(version.files.get(vinode.suffix, b"")) == vinode.size:
                vinode.bytes_of = weakref.ref(version)
                return version
        # The name shows another version now: ESTALE makes the kernel look the name up again.
        raise FsError(errno.ESTALE, f"{node.spec.file_name}: version {vinode.version_id} is no longer shown")

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        return handle.data[offset : offset + size]

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None:
            handle.vinode.opens -= 1
            self._maybe_drop(handle.vinode)

    # ----- extended attributes ------------------------------------------------------------

    def _xattrs(self, inode: int) -> dict[str, str]:
        if inode == ROOT_INODE:
            return self._root_xattrs
        vinode = self._inodes.get(inode)
        return vinode.xattrs if vinode is not None else {}

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
        """A new version of `spec` appeared: drop the kernel's dentries for its names.

        The cache already serves the new version, so the next lookup of any of these names
        returns the new inode; open handles keep the old one.
        """
        folders: set[int] = set()  # a history folder is listed at the root and in ..data
        for parent_inode, name, node in self.tree.locations.get(spec, []):
            # Retire the inodes the names showed, so the old bytes go once nothing holds them
            # (not only at the next lookup, which may never come). Every history index moves.
            for index in range(node.spec.version_history) if isinstance(node, HistoryNode) else (-1,):
                shown = self._current.get((id(node), index))
                if shown is not None and (index >= 0 or shown.version_id != version.version):
                    self._retire((id(node), index))
            if isinstance(node, HistoryNode) and node.inode not in folders:
                folders.add(node.inode)
                # Only names the kernel was given can be in its cache (no negative entries).
                for index in range(self._history_shown.get(node.inode, 0)):
                    self._invalidate_entry(node.inode, str(index))
            self._invalidate_entry(parent_inode, name)

    def known_inodes(self) -> Iterator[int]:
        """For tests: file inodes the core still holds."""
        return iter(self._inodes)
