"""The privileged part of a publish: open /dev/fuse and mount(2) it at the target; unmount; prctl.

Python has no os.mount, so libc is called through ctypes. The data string is what libfuse's own
`fuse_mount_sys` passes (see csi-and-fuse.md §7.2), so the daemon can serve `/dev/fd/N` without
any mount privilege.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

from kvfs.csi.mountinfo import KVFS_FSTYPE as FSTYPE  # what mount(2) sets is what mountinfo checks

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

SOURCE = "kvfs"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def open_fuse_device() -> int:
    """A fresh FUSE connection fd (close-on-exec: only explicit handoffs pass it on)."""
    return os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)


def fuse_mount_data(fd: int, uid: int, gid: int) -> str:
    return f"fd={fd},rootmode=40000,user_id={uid},group_id={gid},allow_other,default_permissions"


def mount_fuse(fd: int, target: str, uid: int, gid: int) -> None:
    """mount(2) the FUSE connection `fd` read-only at `target`; raises OSError with errno."""
    data = fuse_mount_data(fd, uid, gid)
    flags = MS_NOSUID | MS_NODEV | MS_RDONLY
    if _libc.mount(SOURCE.encode(), os.fsencode(target), FSTYPE.encode(), flags, data.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {FSTYPE} at {target}: {os.strerror(err)}", target)


def umount(target: str, *, detach: bool = False) -> bool:
    """Unmount `target`; False when nothing was mounted there (EINVAL/ENOENT), raises otherwise."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH if detach else 0) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    raise OSError(err, f"umount {target}: {os.strerror(err)}", target)


def prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}, {value}): {os.strerror(err)}")


def set_dumpable(on: bool) -> None:
    """Off: other users' processes (and other daemons) can neither ptrace this one nor read its /proc files."""
    prctl(PR_SET_DUMPABLE, int(on))
