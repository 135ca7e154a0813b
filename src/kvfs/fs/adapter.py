"""The thin pyfuse3 adapter: translate requests to `FilesystemCore` and answers back.

pyfuse3 kills the whole mount when a handler raises anything but FUSEError, so every handler
is wrapped: a `KvfsError` becomes its errno, anything else EIO plus one log line.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from kvfs.errors import KvfsError
from kvfs.fs.core import Attr, FilesystemCore

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

FSNAME = "kvfs"


def fuse_options(*, allow_other: bool, debug: bool = False) -> set[str]:
    """Mount options: read-only, type `fuse.kvfs`, kernel permission checks on real modes."""
    options = set(pyfuse3.default_options) | {f"fsname={FSNAME}", f"subtype={FSNAME}", "ro"}
    if allow_other:
        options.add("allow_other")
    if debug:
        options.add("debug")
    return options


def _wrapped(handler: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    @functools.wraps(handler)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except KvfsError as err:
            raise pyfuse3.FUSEError(err.errno) from None
        except Exception:
            log.exception("internal error in %s; answering EIO", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return guarded


def to_entry(attr: Attr) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = attr.inode
    entry.generation = 0
    entry.entry_timeout = attr.entry_timeout
    entry.attr_timeout = attr.attr_timeout
    entry.st_mode = attr.mode
    entry.st_nlink = 2 if attr.mode & 0o040000 else 1
    entry.st_uid = attr.uid
    entry.st_gid = attr.gid
    entry.st_size = attr.size
    entry.st_blksize = 4096
    entry.st_blocks = (attr.size + 511) // 512
    entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = attr.mtime_ns
    return entry


class FuseAdapter(pyfuse3.Operations):
    """pyfuse3.Operations backed by a FilesystemCore."""

    supports_dot_lookup = False  # no NFS export; `.`/`..` never reach us

    def __init__(self, core: FilesystemCore, on_init: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.core = core
        self._on_init = on_init

    def init(self) -> None:
        """FUSE_INIT arrived: the mount is live. Must not raise (it would kill the session)."""
        if self._on_init is not None:
            try:
                self._on_init()
            except Exception:
                log.exception("readiness callback failed")

    @_wrapped
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return to_entry(await self.core.lookup(parent_inode, name.decode("utf-8", "surrogateescape")))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            for inode, count in inode_list:
                self.core.forget(inode, count)
        except Exception:  # forget must never raise
            log.exception("internal error in forget")

    @_wrapped
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return to_entry(await self.core.getattr(inode))

    @_wrapped
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        await self.core.getattr(inode)  # ENOENT for unknown inodes
        return inode

    @_wrapped
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = await self.core.readdir(fh)
        # next_id = position + 1: stable, since a directory's names never change.
        for index in range(start_id, len(entries)):
            name, attr = entries[index]
            if not pyfuse3.readdir_reply(token, name.encode("utf-8", "surrogateescape"), to_entry(attr), index + 1):
                for _, unused in entries[index:]:
                    self.core.unreaddir(unused)
                return
        for _, unused in entries[:start_id]:
            self.core.unreaddir(unused)

    async def releasedir(self, fh: int) -> None:
        return None

    @_wrapped
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fh = await self.core.open(inode, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_wrapped
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.core.read(fh, off, size)

    async def release(self, fh: int) -> None:
        try:
            await self.core.release(fh)
        except Exception:
            log.exception("internal error in release")

    @_wrapped
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        data.f_files = len(self.core.config.objects)
        return data

    @_wrapped
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return [name.encode() for name in await self.core.listxattr(inode)]

    @_wrapped
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return await self.core.getxattr(inode, name.decode("utf-8", "surrogateescape"))
        except KvfsError as err:
            if err.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise


def invalidate_entry(parent_inode: int, name: str) -> None:
    """Ask the kernel to drop a dentry, from pyfuse3's own queue thread (never blocks trio).

    A name the kernel never looked up is already "invalidated": ENOENT is ignored.
    """
    pyfuse3.invalidate_entry_async(parent_inode, name.encode("utf-8", "surrogateescape"), ignore_enoent=True)
