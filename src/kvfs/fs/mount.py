"""One volume's daemon: wire the layers together, mount, serve, unmount cleanly.

Used by `kvfs mount` (mounts by itself) and by the CSI mounter (hands over an already mounted
`/dev/fd/N`; then the daemon never mounts or unmounts, the privileged side does).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pyfuse3
import trio

from kvfs.auth.factory import build_credential
from kvfs.auth.tokensource import PushedTokenSource
from kvfs.cache.base import Version
from kvfs.cache.resolver import Resolver
from kvfs.config.model import MountConfig, ObjectSpec
from kvfs.fs.adapter import FuseAdapter, KernelNotifier, fuse_options
from kvfs.fs.core import FilesystemCore
from kvfs.logsafe import register_secret
from kvfs.net.http import make_http_client
from kvfs.vault.client import VaultClient

log = logging.getLogger(__name__)


def run_mount(
    config: MountConfig,
    mountpoint: str,
    *,
    ready_fd: int | None = None,
    control_fd: int | None = None,
    allow_other: bool = False,
    owner: tuple[int, int] | None = None,
) -> int:
    """Serve `config` at `mountpoint` until SIGTERM/SIGINT or a control `stop`; the exit code.

    `ready_fd` (a pipe) receives ``ready\\n`` once the kernel's FUSE_INIT arrived, or
    ``error <message>\\n``. `control_fd` is a listening unix socket taking JSON lines
    (``token``, ``status``, ``stop``) from the CSI plugin. `owner` is the uid and gid files
    and folders show (CSI: root and the pod's fsGroup); None: this process's user, and
    `config.file_group` or this process's group.
    """
    for value in (config.auth.client_secret, config.auth.sa_token):
        register_secret(value)
    daemon = _Daemon(
        config, mountpoint, ready_fd=ready_fd, control_fd=control_fd, allow_other=allow_other, owner=owner
    )
    return trio.run(daemon.run)


class _Daemon:
    def __init__(
        self,
        config: MountConfig,
        mountpoint: str,
        *,
        ready_fd: int | None,
        control_fd: int | None,
        allow_other: bool,
        owner: tuple[int, int] | None,
    ) -> None:
        self.config = config
        self.owner = owner
        self.mountpoint = mountpoint
        self.handed_over = mountpoint.startswith("/dev/fd/")
        self.ready_fd = ready_fd
        self.control_fd = control_fd
        self.allow_other = allow_other
        self.token_source = PushedTokenSource(config.auth.sa_token) if config.auth.sa_token else None
        self.core: FilesystemCore | None = None
        self._stop_requested = False

    def _signal_ready(self, message: str) -> None:
        if self.ready_fd is None:
            return
        try:
            os.write(self.ready_fd, message.encode() + b"\n")
            os.close(self.ready_fd)
        except OSError:
            pass
        self.ready_fd = None

    def _on_init(self) -> None:
        log.info("mounted %s at %s", self.config.vault_url, self.mountpoint)
        self._signal_ready("ready")

    async def run(self) -> int:
        log.info("mount config: %s", self.config.summary())
        async with AsyncExitStack() as stack:
            http = make_http_client()
            stack.push_async_callback(http.aclose)
            credential = build_credential(self.config, http, token_source=self.token_source)
            stack.push_async_callback(credential.aclose)
            client = VaultClient(
                self.config.vault_url, credential, self.config.cloud.scope, http, tenant_id=self.config.auth.tenant_id
            )
            resolver = Resolver(client, self.config, on_change=self._on_change)
            uid, gid = self.owner or (None, self.config.file_group)
            self.core = FilesystemCore(self.config, resolver, kernel=KernelNotifier(), uid=uid, gid=gid)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                try:
                    pyfuse3.init(
                        FuseAdapter(self.core, on_init=self._on_init),
                        self.mountpoint,
                        fuse_options(allow_other=self.allow_other),
                    )
                except Exception as err:  # mount failures are RuntimeError from libfuse
                    log.error("cannot mount at %s: %s", self.mountpoint, err)
                    self._signal_ready(f"error cannot mount at {self.mountpoint}: {err}")
                    return 1
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._watch_signals, signals)
                        await nursery.start(resolver.run_refresh)
                        if self.control_fd is not None:
                            nursery.start_soon(self._serve_control)
                        await pyfuse3.main()
                        nursery.cancel_scope.cancel()
                finally:
                    # A handed-over fd is unmounted by the privileged side that mounted it.
                    pyfuse3.close(unmount=not self.handed_over)
        log.info("unmounted %s", self.mountpoint)
        return 0

    async def _on_change(self, spec: ObjectSpec, version: Version) -> None:
        assert self.core is not None
        await self.core.on_change(spec, version)

    async def _watch_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            log.info("received %s; unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return

    # ----- control socket (CSI republish) ---------------------------------------------------

    async def _serve_control(self) -> None:
        assert self.control_fd is not None
        listener = trio.socket.from_stdlib_socket(socket.socket(fileno=self.control_fd))
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(self._handle_control, trio.SocketStream(conn))

    async def _handle_control(self, stream: trio.SocketStream) -> None:
        buffer = b""
        async with stream:
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    reply = self._control_request(line)
                    await stream.send_all(json.dumps(reply).encode() + b"\n")
                    if self._stop_requested:
                        pyfuse3.terminate()
                        return

    def _control_request(self, line: bytes) -> dict[str, object]:
        try:
            request = json.loads(line)
            op = request["op"]
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": "expected a JSON object with an 'op' field"}
        if op == "token":
            token = request.get("token")
            if not isinstance(token, str) or not token.strip():
                return {"ok": False, "error": "'token' must be a non-empty string"}
            if self.token_source is None:
                return {"ok": False, "error": "this volume does not use workload identity"}
            self.token_source.push(token.strip())
            return {"ok": True}
        if op == "status":
            assert self.core is not None
            return {
                "ok": True,
                "pid": os.getpid(),
                "objects": len(self.config.objects),
                "errors": dict(self.core.errors),
            }
        if op == "stop":
            self._stop_requested = True
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}
