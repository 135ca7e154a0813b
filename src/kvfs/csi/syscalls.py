"""The privileged part of a publish: open /dev/fuse and mount(2) it at the target; unmount; prctl;
the OOM killer's preference; what a failed system call means for a publish.

Python has no os.mount, so libc is called through ctypes. The data string is what libfuse's own
`fuse_mount_sys` (lib/mount.c) passes: `fd=N,rootmode=40000,user_id=U,group_id=G` and the kernel
options `allow_other,default_permissions` (a privileged caller needs no `user_allow_other` for
them). So the daemon can serve `/dev/fd/N` without any mount privilege.
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

# The OOM killer picks the process with the highest score: a daemon (one volume) before the
# mounter (every new volume of its generation). Lowering a score needs CAP_SYS_RESOURCE.
MOUNTER_OOM_SCORE_ADJ = -900
DAEMON_OOM_SCORE_ADJ = 500

# errno → what ran out, and where its limit is set
_EXHAUSTED = {
    errno.EAGAIN: "processes (the pids.max of its cgroup, the node's kernel.pid_max and kernel.threads-max)",
    errno.EMFILE: "file descriptors (its RLIMIT_NOFILE: the container runtime's nofile limit)",
    errno.ENFILE: "file descriptors of the whole node (fs.file-max)",
    errno.ENOMEM: "memory (its container's memory limit)",
}

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


def set_oom_score_adj(value: int) -> None:
    """This process's /proc/self/oom_score_adj; PermissionError when lowering it without CAP_SYS_RESOURCE."""
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(value))


def failure(what: str, exc: OSError, process: str) -> tuple[str, str]:
    """(gRPC code, message) for a system call of `process` that failed while starting a volume:
    RESOURCE_EXHAUSTED naming the limit and the fix when something ran out, else INTERNAL."""
    number = exc.errno or 0
    text = f"{what} failed: {os.strerror(number)} ({errno.errorcode.get(number, number)})"
    limit = _EXHAUSTED.get(number)
    if limit is None:
        return "INTERNAL", text
    return (
        "RESOURCE_EXHAUSTED",
        f"{text}: the {process} ran out of {limit}; raise that limit or run fewer volumes on this node"
        " (kvfs csi node --max-volumes); the volumes already mounted keep serving",
    )
