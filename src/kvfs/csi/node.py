"""CSI Node service over a unix socket, and the `kvfs csi node` process around it.

Only translates: gRPC requests → `Volumes` calls, `RequestError` → status codes. Requests are
never logged whole: `secrets` and the service account tokens in `volume_context` must not leak
(CVE-2023-2878).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from concurrent import futures
from typing import Any

import grpc

from kvfs.csi import syscalls
from kvfs.csi.identity import IdentityServicer
from kvfs.csi.metrics import NodeMetrics
from kvfs.csi.proto import load
from kvfs.csi.request import RequestError
from kvfs.csi.volumes import DEFAULT_HEALTH_INTERVAL, NodeConfig, PublishRequest, Volumes

log = logging.getLogger(__name__)
pb2, pb2_grpc = load()


def _abort(context: grpc.ServicerContext, exc: RequestError) -> None:
    context.abort(getattr(grpc.StatusCode, exc.code), str(exc))


class NodeServicer(pb2_grpc.NodeServicer):  # type: ignore[misc, name-defined]
    def __init__(self, volumes: Volumes, metrics: NodeMetrics) -> None:
        self.volumes = volumes
        self.publish = metrics.observe_publish(volumes.publish)

    def NodePublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        cap = request.volume_capability if request.HasField("volume_capability") else None
        req = PublishRequest(
            volume_id=request.volume_id,
            target_path=request.target_path,
            readonly=request.readonly,
            has_capability=cap is not None,
            is_block=cap is not None and cap.WhichOneof("access_type") == "block",
            volume_context=dict(request.volume_context),
            secrets=dict(request.secrets),
            volume_mount_group=cap.mount.volume_mount_group if cap is not None and cap.HasField("mount") else "",
        )
        log.debug("NodePublishVolume volume=%s target=%s", req.volume_id, req.target_path)
        self._call(context, self.publish, req)
        return pb2.NodePublishVolumeResponse()

    def NodeUnpublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        log.debug("NodeUnpublishVolume volume=%s target=%s", request.volume_id, request.target_path)
        self._call(context, self.volumes.unpublish, request.volume_id, request.target_path)
        return pb2.NodeUnpublishVolumeResponse()

    def NodeGetCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        rpc = pb2.NodeServiceCapability.RPC(type=pb2.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP)
        return pb2.NodeGetCapabilitiesResponse(capabilities=[pb2.NodeServiceCapability(rpc=rpc)])

    def NodeGetInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        cfg = self.volumes.config
        return pb2.NodeGetInfoResponse(node_id=cfg.node_id, max_volumes_per_node=cfg.max_volumes)

    @staticmethod
    def _call(context: grpc.ServicerContext, func: Any, *args: Any) -> None:
        try:
            func(*args)
        except RequestError as exc:
            log.warning("%s refused: %s %s", func.__name__, exc.code, exc)
            _abort(context, exc)
        except Exception:
            log.exception("%s failed unexpectedly", func.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{func.__name__} failed unexpectedly; see the plugin log")


def endpoint_path(endpoint: str) -> str:
    """`unix:///csi/csi.sock`, `unix:/csi/csi.sock` or a bare path → the socket path."""
    if endpoint.startswith("unix://"):
        return endpoint[len("unix://") :]
    if endpoint.startswith("unix:"):
        return endpoint[len("unix:") :]
    if "://" in endpoint:
        raise ValueError(f"--endpoint {endpoint!r}: only unix:// endpoints are supported")
    return endpoint


def serve(volumes: Volumes, endpoint: str, *, workers: int = 16, metrics: NodeMetrics | None = None) -> grpc.Server:
    """Start Identity + Node on `endpoint` (a stale socket file is removed first); `metrics`
    counts the publishes (a NodeMetrics of its own, not served, if None)."""
    path = endpoint_path(endpoint)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="csi"))
    pb2_grpc.add_IdentityServicer_to_server(
        IdentityServicer(volumes.config.driver_name, on_probe=volumes.check_health), server
    )
    pb2_grpc.add_NodeServicer_to_server(NodeServicer(volumes, metrics or NodeMetrics(volumes)), server)
    if server.add_insecure_port(f"unix://{path}") == 0:
        raise OSError(f"cannot listen on unix://{path}")
    server.start()
    return server


def run_node(
    config: NodeConfig, endpoint: str, *, health_interval: float = DEFAULT_HEALTH_INTERVAL, metrics_addr: str = ""
) -> int:
    """The `kvfs csi node` process: mounter up, state recovered, gRPC served until SIGTERM."""
    syscalls.set_dumpable(False)  # it holds requests' secrets and tokens
    volumes = Volumes(config)
    try:
        volumes.ensure_mounter()
    except RequestError as exc:
        log.error("%s (publishes will retry starting it)", exc)
    volumes.recover()
    metrics = NodeMetrics(volumes)
    if metrics_addr:
        metrics.serve(metrics_addr)
    server = serve(volumes, endpoint, metrics=metrics)
    stop_watching = volumes.watcher.start(config.watch_interval) if volumes.watcher.subscribers else None
    log.info("kvfs CSI node plugin %s serving on %s (node %s)", config.driver_name, endpoint, config.node_id)
    # the C-level handler writes to the wakeup fd from whichever thread got the signal, so the
    # main thread's select wakes at once; Python handlers here only set a flag (no locks)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    next_sweep = time.monotonic() + health_interval
    while not stopping:
        timeout = max(0.0, next_sweep - time.monotonic()) if health_interval > 0 else None
        if select.select([wake_r], [], [], timeout)[0]:
            os.read(wake_r, 512)
            continue
        next_sweep = time.monotonic() + health_interval
        try:
            volumes.check_health()
            volumes.restart_failed_pods(hung_for=health_interval)
        except Exception:  # noqa: BLE001 - keep serving
            log.exception("health sweep failed")
    log.info("stopping; mounted volumes keep being served by their daemons")
    if stop_watching is not None:
        stop_watching.set()
    server.stop(grace=5).wait()
    volumes.recorder.close()
    return 0
