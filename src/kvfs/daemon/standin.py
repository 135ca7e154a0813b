"""A stand-in volume daemon: a tiny read-only pyfuse3 filesystem that speaks the daemon contract.

For tests, benchmarks and smoke-testing a deployment without Key Vault
(`--daemon-entry kvfs.daemon.standin:run`). It serves the files named by `standin.file.<name>`
parameters (default: one file `hello`), signals ready from `Operations.init()` (FUSE_INIT),
and serves the control protocol (kvfs.daemon.control) like the real daemon.
Test knobs: `standin.fail=<message>` reports a start-up error; `standin.hang=true` never
serves the connection (the plugin's ready timeout must fire).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import signal
import socket
import stat
from collections.abc import Sequence
from typing import Any

import pyfuse3
import trio

from kvfs.config.parameters import SA_TOKENS_KEY, token_for_audience
from kvfs.daemon.control import ControlServer, FileError
from kvfs.daemon.entry import DaemonSpec, report_error
from kvfs.daemon.events import EventRing
from kvfs.daemon.session import serve_session

log = logging.getLogger(__name__)


class _Fs(pyfuse3.Operations):
    def __init__(self, files: dict[str, bytes], ready_fd: int) -> None:
        super().__init__()
        self.names = sorted(files)
        self.data = [files[n] for n in self.names]
        self.ready_fd: int | None = ready_fd

    def init(self) -> None:
        if self.ready_fd is not None:
            try:
                os.write(self.ready_fd, b"ready\n")
                os.close(self.ready_fd)
            except OSError:
                pass
            self.ready_fd = None

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_size = 0
        else:
            attr.st_mode = stat.S_IFREG | 0o644
            attr.st_size = len(self.data[inode - 2])
        attr.st_uid = attr.st_gid = 0
        attr.attr_timeout = attr.entry_timeout = 300.0
        return attr

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE and not 2 <= inode < 2 + len(self.names):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        decoded = os.fsdecode(name)
        if parent_inode != pyfuse3.ROOT_INODE or decoded not in self.names:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(2 + self.names.index(decoded))

    async def opendir(self, inode: int, ctx: Any) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        for i in range(start_id, len(self.names)):
            if not pyfuse3.readdir_reply(token, os.fsencode(self.names[i]), self._attr(2 + i), i + 1):
                break

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.data[fh - 2][off : off + size]

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        return data


class _Control:
    """The stand-in's answers to the control protocol: it keeps a hash of the last pushed token."""

    def __init__(self, spec: DaemonSpec, files: dict[str, bytes], token: str) -> None:
        self.volume_id = spec.volume_id
        self.contents = files
        self.files = sorted(files)
        self.events = EventRing()  # nothing is ever fetched, so nothing happens
        self.token_hash = _token_hash(token)
        self.token_updates = 0

    def push_token(self, token: str) -> None:
        self.token_hash = _token_hash(token)
        self.token_updates += 1

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "volume_id": self.volume_id,
            "mountpoint": None,
            "vault_url": None,
            "identity": None,
            "objects": [{"file": name, "version": None, "error": None} for name in self.files],
            "errors": {},
            "token_sha256": self.token_hash,
            "token_updates": self.token_updates,
        }

    async def fetch(self, files: Sequence[str]) -> tuple[dict[str, bytes], dict[str, FileError]]:
        missing = {"code": "NoSuchFile", "errno": "ENOENT", "message": "no such file in this volume"}
        return (
            {name: self.contents[name] for name in files if name in self.contents},
            {name: missing for name in files if name not in self.contents},
        )

    def metrics(self) -> dict[str, Any]:
        return {"counters": {}, "histograms": {}}  # it never reads Key Vault

    def stop(self) -> None:
        pyfuse3.terminate()


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:12] if token else ""


def run(spec: DaemonSpec) -> int:
    """DaemonEntry: serve the stand-in filesystem on spec.fuse_fd until stop/SIGTERM/unmount."""
    if spec.params.get("standin.fail"):
        report_error(spec.ready_fd, spec.params["standin.fail"])
        return 2
    if spec.params.get("standin.hang", "").lower() == "true":
        signal.pause()
        return 1
    files = {
        k.removeprefix("standin.file."): v.encode() for k, v in spec.params.items() if k.startswith("standin.file.")
    } or {"hello": f"hello from {spec.volume_id}\n".encode()}
    if spec.params.get("standin.show_env"):  # shows the daemon's value of one variable
        files["env"] = os.environ.get(spec.params["standin.show_env"], "").encode()
    fs = _Fs(files, spec.ready_fd)
    control = _Control(spec, files, token_for_audience(spec.params.get(SA_TOKENS_KEY, "")))
    pyfuse3.init(fs, spec.mountpoint, {"fsname=kvfs"})
    try:
        trio.run(serve_session, ControlServer(control, socket.socket(fileno=spec.control_fd)))
    finally:
        pyfuse3.close(unmount=False)
    return 0
