"""A stand-in volume daemon: a tiny read-only pyfuse3 filesystem that speaks the daemon contract.

For tests, benchmarks and smoke-testing a deployment without Key Vault
(`--daemon-entry kvfs.csi.standin:run`). It serves the files named by `standin.file.<name>`
parameters (default: one file `hello`), signals ready from `Operations.init()` (FUSE_INIT),
and answers the control socket (`token`, `status`, `stop`) like the real daemon.
Test knobs: `standin.fail=<message>` reports a start-up error; `standin.hang=true` never
serves the connection (the plugin's ready timeout must fire).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import signal
import socket
import stat
from typing import Any

import pyfuse3
import trio

from kvfs.csi.daemon import DaemonSpec, report_error
from kvfs.csi.request import TOKENS_KEY, token_for_audience

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
    def __init__(self, control_fd: int, token: str) -> None:
        self.sock = trio.socket.from_stdlib_socket(socket.socket(fileno=control_fd))
        self.token_hash = hashlib.sha256(token.encode()).hexdigest()[:12] if token else ""
        self.token_updates = 0

    async def serve(self, nursery: trio.Nursery) -> None:
        while True:
            conn, _ = await self.sock.accept()
            nursery.start_soon(self._client, conn)

    async def _client(self, conn: trio.socket.SocketType) -> None:
        buf = b""
        with conn:
            while True:
                data = await conn.recv(65536)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    reply, stop = self._handle(line)
                    await conn.send(json.dumps(reply).encode() + b"\n")
                    if stop:
                        pyfuse3.terminate()
                        return

    def _handle(self, line: bytes) -> tuple[dict[str, Any], bool]:
        try:
            req = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "not JSON"}, False
        op = req.get("op")
        if op == "token":
            token = str(req.get("token", ""))
            self.token_hash = hashlib.sha256(token.encode()).hexdigest()[:12]
            self.token_updates += 1
            return {"ok": True}, False
        if op == "status":
            return {
                "ok": True,
                "pid": os.getpid(),
                "objects": 0,
                "errors": {},
                "token_sha256": self.token_hash,
                "token_updates": self.token_updates,
            }, False
        if op == "stop":
            return {"ok": True}, True
        return {"ok": False, "error": f"unknown op {op!r}"}, False


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
    control = _Control(spec.control_fd, token_for_audience(spec.params.get(TOKENS_KEY, "")))
    pyfuse3.init(fs, spec.mountpoint, {"fsname=kvfs"})

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(control.serve, nursery)

            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return

            nursery.start_soon(on_signals)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=False)
    return 0
