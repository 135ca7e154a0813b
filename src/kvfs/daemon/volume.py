"""One volume's daemon: wire the layers together, mount, serve, unmount cleanly.

`run_mount` is `kvfs mount`: it mounts by itself and makes its own control socket
(kvfs.daemon.control.socket_path_for). The CSI daemon entry (kvfs.daemon.entry) calls
`serve_volume` with an already mounted `/dev/fd/N` and the control socket the plugin made; then
the daemon never mounts or unmounts, the privileged side does.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

import pyfuse3
import trio

from kvfs.auth.cache import CachingCredential
from kvfs.auth.factory import build_credential
from kvfs.auth.tokensource import PushedTokenSource
from kvfs.cache.base import CacheStats, Version
from kvfs.cache.resolver import Resolver
from kvfs.config.model import MountConfig, ObjectSpec
from kvfs.daemon.control import ControlServer, FileError, Refused, listen_for_mount
from kvfs.daemon.events import EventRing, wall_time
from kvfs.daemon.files import VolumeFiles
from kvfs.daemon.jsonline import AddressInUse
from kvfs.daemon.metrics import (
    CountedCredential,
    CountingTransport,
    DaemonMetrics,
    MeteredCore,
    MountCollector,
    serve_mount_metrics,
)
from kvfs.daemon.preflight import PreflightError, check_volume, ready_line
from kvfs.daemon.session import serve_session
from kvfs.daemon.status import ObjectWatch
from kvfs.fs.adapter import FuseAdapter, KernelNotifier, fuse_options
from kvfs.fs.core import FilesystemCore
from kvfs.logsafe import register_secret
from kvfs.net.http import make_http_client, make_transport
from kvfs.vault.client import VaultClient

log = logging.getLogger(__name__)


def run_mount(
    config: MountConfig, mountpoint: str, *, allow_other: bool = False, preflight: bool = True, metrics_addr: str = ""
) -> int:
    """`kvfs mount`: serve `config` at `mountpoint` until SIGTERM/SIGINT, a control `stop` or an unmount.

    The control socket is removed at the end; a mount without one (its folder unusable) still serves.
    PreflightError: the identity preflight refused the volume (nothing was mounted). `metrics_addr`
    (HOST:PORT): Prometheus metrics served there while the mount lives.
    """
    control: socket.socket | None = None
    path = ""
    try:
        control, path = listen_for_mount(mountpoint)
    except (OSError, AddressInUse) as exc:
        log.warning("no control socket for %s (%s); the mount serves without one", mountpoint, exc)
    try:
        return serve_volume(
            config,
            mountpoint,
            control=control,
            control_path=path,
            allow_other=allow_other,
            preflight=preflight,
            metrics_addr=metrics_addr,
        )
    finally:
        if control is not None:
            control.close()
            try:
                os.unlink(path)
            except OSError:
                pass


def serve_volume(
    config: MountConfig,
    mountpoint: str,
    *,
    ready_fd: int | None = None,
    control: socket.socket | None = None,
    control_path: str = "",
    allow_other: bool = False,
    owner: tuple[int, int] | None = None,
    volume_id: str | None = None,
    preflight: bool = True,
    metrics_addr: str = "",
) -> int:
    """Serve `config` at `mountpoint` (a folder, or a handed-over `/dev/fd/N`); the exit code.

    `ready_fd` (a pipe) receives ``ready\\n`` once the kernel's FUSE_INIT arrived, or
    ``error <message>\\n``. `control` is a listening unix socket for kvfs.daemon.control;
    `control_path`, if given, is advertised as the root's `user.kvfs.control`. `owner` is the
    uid and gid files and folders show (CSI: root and the pod's fsGroup); None: this process's
    user, and `config.file_group` or this process's group. With `preflight`, the volume's token
    is fetched before mounting (kvfs.daemon.preflight): a definitive refusal is sent as the ready
    line and raised as PreflightError, nothing mounted. `metrics_addr`: serve Prometheus metrics
    there (`kvfs mount`; a CSI daemon's counters reach the plugin's endpoint through `metrics`).
    """
    for value in (config.auth.client_secret, config.auth.sa_token):
        register_secret(value)
    volume = Volume(
        config,
        mountpoint,
        ready_fd=ready_fd,
        control=control,
        control_path=control_path,
        allow_other=allow_other,
        owner=owner,
        volume_id=volume_id,
        preflight=preflight,
    )
    stop_metrics = None
    if metrics_addr:
        stop_metrics = serve_mount_metrics(metrics_addr, MountCollector(volume.metrics, volume.ready_after))
    try:
        return trio.run(volume.run)
    finally:
        if stop_metrics is not None:
            stop_metrics()


def empty_volume_warning(config: MountConfig) -> str:
    """The warning for a volume with no objects: upstream mounts it empty without a word, which
    reads as "kvfs lost my secrets" until someone looks at the class."""
    if config.secret_provider_class:
        where = f'SecretProviderClass "{config.secret_provider_class}"'
        where += f' in namespace "{config.pod_namespace}"' if config.pod_namespace else ""
    else:
        where = "the volume's parameters"
    return (
        f"{where}: spec.parameters.objects lists no objects (its array is empty), so the volume is empty"
        " (upstream mounts it empty too); add an entry per object to objects.array"
    )


class Volume:
    """One mounted volume: its layers, its FUSE session, and the answers to its control socket."""

    def __init__(
        self,
        config: MountConfig,
        mountpoint: str,
        *,
        ready_fd: int | None,
        control: socket.socket | None,
        control_path: str,
        allow_other: bool,
        owner: tuple[int, int] | None,
        volume_id: str | None,
        preflight: bool = True,
    ) -> None:
        self.config = config
        self.owner = owner
        self.mountpoint = mountpoint
        self.handed_over = mountpoint.startswith("/dev/fd/")
        self.ready_fd = ready_fd
        self.control = control
        self.control_path = control_path
        self.allow_other = allow_other
        self.volume_id = volume_id
        self.preflight = preflight
        self.token_source = PushedTokenSource(config.auth.sa_token) if config.auth.sa_token else None
        self.events = EventRing()
        self.watch = ObjectWatch(config.objects, self.events)
        self.core: FilesystemCore | None = None
        self.files: VolumeFiles | None = None
        self.credential: CachingCredential | None = None
        self.resolver: Resolver | None = None
        self.counters = DaemonMetrics()
        self._started = time.monotonic()
        self._ready_after: float | None = None  # seconds from start to FUSE_INIT

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
        self._ready_after = time.monotonic() - self._started
        log.info("mounted %s at %s", self.config.vault_url, self.mountpoint)
        self._signal_ready("ready")

    async def run(self) -> int:
        log.info("mount config: %s", self.config.summary())
        if not self.config.objects:
            log.warning("%s", empty_volume_warning(self.config))
        async with AsyncExitStack() as stack:
            http = make_http_client(transport=CountingTransport(make_transport(), self.config.vault_url, self.counters))
            stack.push_async_callback(http.aclose)
            self.credential = credential = build_credential(self.config, http, token_source=self.token_source)
            credential.inner = CountedCredential(credential.inner, self.counters)
            stack.push_async_callback(credential.aclose)
            client = VaultClient(
                self.config.vault_url, credential, self.config.cloud.scope, http, tenant_id=self.config.auth.tenant_id
            )
            self.resolver = resolver = Resolver(client, self.config, on_change=self._on_change, listener=self.watch)
            self.files = VolumeFiles(self.config, resolver)
            uid, gid = self.owner or (None, self.config.file_group)
            self.core = MeteredCore(
                self.config,
                resolver,
                kernel=KernelNotifier(),
                uid=uid,
                gid=gid,
                root_xattrs={"control": self.control_path} if self.control_path else None,
                metrics=self.counters,
            )
            if self.preflight:
                refusal = await check_volume(credential, self.config.cloud.scope, self.config.vault_url, http)
                if refusal is not None:
                    self._signal_ready(ready_line(refusal))
                    raise PreflightError(refusal)
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
                control = ControlServer(self, self.control) if self.control is not None else None
                await serve_session(control, [("background refresh", resolver.run_refresh)])
            finally:
                # A handed-over fd is unmounted by the privileged side that mounted it.
                pyfuse3.close(unmount=not self.handed_over)
        log.info("unmounted %s", self.mountpoint)
        return 0

    async def _on_change(self, spec: ObjectSpec, version: Version) -> None:
        assert self.core is not None
        await self.core.on_change(spec, version)

    # ----- kvfs.daemon.control.ControlHandler ---------------------------------------------

    def push_token(self, token: str) -> None:
        if self.token_source is None:
            raise Refused("this volume does not use workload identity: it takes no service account token")
        register_secret(token)
        self.token_source.push(token)

    def status(self) -> dict[str, Any]:
        config, auth = self.config, self.config.auth
        return {
            "pid": os.getpid(),
            "volume_id": self.volume_id,
            "mountpoint": None if self.handed_over else self.mountpoint,
            "pod": {"namespace": config.pod_namespace, "name": config.pod_name} if config.pod_name else None,
            "vault_url": config.vault_url,
            "identity": {
                "mode": auth.mode,
                "client_id": auth.client_id or auth.user_assigned_identity_id or None,
                "tenant_id": auth.tenant_id or None,
                "token_expires_at": wall_time(self._token_expiry()),
            },
            "objects": self.watch.to_json(),
            "errors": dict(self.core.errors) if self.core is not None else {},
        }

    async def fetch(self, files: Sequence[str]) -> tuple[dict[str, bytes], dict[str, FileError]]:
        if self.files is None:
            raise Refused("the volume is not serving yet: ask again once it is ready")
        return await self.files.read(files)

    def _token_expiry(self) -> float | None:
        """The Key Vault access token's expiry, as wall-clock time."""
        expires = self.credential.expires_at(self.config.cloud.scope) if self.credential is not None else None
        return None if expires is None else time.time() + (expires - trio.current_time())

    def metrics(self) -> dict[str, Any]:
        stats = self.resolver.statistics if self.resolver is not None else CacheStats()
        return self.counters.snapshot(stats, self.watch.rotations)

    def ready_after(self) -> float | None:
        """Seconds from start to FUSE_INIT (the mount's publish duration); None before."""
        return self._ready_after

    def stop(self) -> None:
        log.info("stop requested on the control socket; unmounting")
        pyfuse3.terminate()
