"""Mounts at a target that kvfs did not make: what the upstream driver leaves when a node switches.

A node that ran the Secrets Store CSI driver and now runs kvfs under the upstream driver name gets
kubelet's calls for volumes the upstream driver published: their targets hold its tmpfs. Unpublish
removes them as upstream's NodeUnpublishVolume does: first the files (upstream found deleting them
before the unmount necessary, its issue #546), then the unmount, then the folder. Only what lies
on the target's own filesystem is deleted (a file system mounted inside it is never entered) and
nothing is read or followed outside the target: the caller checked that the target lies in
kubelet's pod folders. A mount of another type (not a tmpfs) is only detached, never read: it may
be a dead FUSE mount that would hang a reader.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from kvfs.csi import syscalls
from kvfs.csi.mountinfo import KVFS_FSTYPE, MountEntry, find_mount

log = logging.getLogger(__name__)

UPSTREAM_FSTYPES = frozenset({"tmpfs"})  # what the upstream driver mounts at each target
_MAX_STACKED = 8
# Folders deeper than this are left to the unmount, which frees a tmpfs whole: a tenant's objectAlias
# can nest far deeper than Python recurses (or than the plugin has fds for one open folder per level).
_MAX_DEPTH = 64


def foreign_mount(target: str) -> MountEntry | None:
    """The mount visible at `target` when it is not a kvfs mount, else None."""
    entry = find_mount(target)
    return entry if entry is not None and entry.fstype != KVFS_FSTYPE else None


def remove_foreign_mounts(target: str) -> int:
    """Unmount every foreign mount stacked at `target`, a tmpfs after deleting its files; how many.

    Raises OSError when one cannot be unmounted even lazily.
    """
    removed = 0
    while removed < _MAX_STACKED and (entry := foreign_mount(target)) is not None:
        if entry.fstype in UPSTREAM_FSTYPES:
            _delete_contents(target)
        log.info("unmounting the %s mount at %s (not made by kvfs: the driver before it)", entry.fstype, target)
        try:
            syscalls.umount(target)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            syscalls.umount(target, detach=True)
        removed += 1
    return removed


def _delete_contents(target: str) -> None:
    """Delete what lies on the target's own filesystem, below it; failures are logged, not raised."""
    try:
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("cannot open %s to delete its files before unmounting: %s", target, exc.strerror)
        return
    try:
        _clear(fd, os.fstat(fd).st_dev, target)
    finally:
        os.close(fd)


def _clear(dir_fd: int, device: int, where: str, depth: int = 0) -> bool:
    """Delete the folder's entries on `device`; whether it is empty now (so its parent may remove it)."""
    if depth >= _MAX_DEPTH:
        log.warning("not deleting below %s (over %d folders deep): the unmount frees it", where, _MAX_DEPTH)
        return False
    with os.scandir(dir_fd) as entries:
        names = [(e.name, e.stat(follow_symlinks=False)) for e in entries]
    emptied = True
    for name, info in names:
        if info.st_dev != device:
            emptied = False
            continue  # a file system mounted inside the target: not the target's files
        try:
            if stat.S_ISDIR(info.st_mode):
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    cleared = _clear(sub, device, os.path.join(where, name), depth + 1)
                finally:
                    os.close(sub)
                if not cleared:
                    emptied = False
                    continue  # said already, once
                os.rmdir(name, dir_fd=dir_fd)
            else:
                os.unlink(name, dir_fd=dir_fd)
        except OSError as exc:
            emptied = False
            log.warning("cannot delete %s before unmounting: %s", os.path.join(where, name), exc.strerror)
    return emptied
