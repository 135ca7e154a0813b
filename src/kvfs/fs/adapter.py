"""The thin pyfuse3 adapter: translate requests to `FilesystemCore` and answers back.

pyfuse3 kills the whole mount when a handler raises anything but FUSEError, so every handler
is guarded: a `KvfsError` becomes its errno, anything else EIO plus one log line.

Every open and close of a file costs OPEN and RELEASE round trips (FLUSH is answered ENOSYS
once, and the kernel stops sending it). Both run without awaiting anything when the file's
bytes are cached. docs/ARCHITECTURE.md says what fewer round trips would take.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

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


def _fuse_error(err: Exception, handler: str) -> pyfuse3.FUSEError:
    """The answer to a handler's exception: its errno, or EIO with a log line if unexpected."""
    if isinstance(err, pyfuse3.FUSEError):
        return err
    if isinstance(err, KvfsError):
        return pyfuse3.FUSEError(err.errno)
    log.error("internal error in %s; answering EIO", handler, exc_info=err)
    return pyfuse3.FUSEError(errno.EIO)


def _wrapped(handler: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    @functools.wraps(handler)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await handler(*args, **kwargs)
        except Exception as err:
            raise _fuse_error(err, handler.__name__) from None

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

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        """Guarded by hand: a cached file's open runs without a single await."""
        try:
            fh = self.core.open_cached(inode, flags)
            if fh is None:
                fh = await self.core.open(inode, flags)
            direct_io = self.core.direct_io(fh)
        except Exception as err:
            raise _fuse_error(err, "open") from None
        return pyfuse3.FileInfo(fh=fh, direct_io=direct_io, keep_cache=True)

    @_wrapped
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.core.read(fh, off, size)

    async def flush(self, fh: int) -> None:
        """ENOSYS: the kernel then stops sending FLUSH on every close (a read-only file has
        nothing to flush), one round trip fewer per open. Never answer it with success."""
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def release(self, fh: int) -> None:
        try:
            self.core.release(fh)
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


class KernelNotifier:
    """`kvfs.fs.core.KernelCache` on a mounted session: the kernel calls, off the trio thread.

    The calls block: a deletion waits until operations in its folder finish, and one made from
    the trio thread while a handler of that folder is pending would deadlock. Deletions go
    through pyfuse3's own queue thread, attribute drops through trio's worker threads.
    "The kernel does not know it" (ENOENT) means nothing is cached: done.
    """

    def entry_deleted(self, parent_inode: int, name: str, inode: int) -> None:
        pyfuse3.invalidate_entry_async(
            parent_inode, name.encode("utf-8", "surrogateescape"), deleted=inode, ignore_enoent=True
        )

    def attrs_changed(self, inode: int, done: Callable[[], None]) -> None:
        token = trio.lowlevel.current_trio_token()

        def deliver(_: object) -> None:  # on the worker thread, with _drop_attrs's outcome
            try:
                token.run_sync_soon(done)
            except trio.RunFinishedError:  # unmounted meanwhile
                pass

        trio.lowlevel.start_thread_soon(functools.partial(_drop_attrs, inode), deliver)


def _drop_attrs(inode: int) -> None:
    try:
        pyfuse3.invalidate_inode(inode, attr_only=True)
    except FileNotFoundError:
        pass
    except OSError:
        log.exception("cannot drop the kernel's attributes of inode %d", inode)
