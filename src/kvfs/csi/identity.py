"""CSI Identity service: who this plugin is, and that it is alive."""

from __future__ import annotations

import logging
from typing import Any, Callable

import grpc

import kvfs
from kvfs.csi.proto import load

log = logging.getLogger(__name__)
pb2, pb2_grpc = load()


class IdentityServicer(pb2_grpc.IdentityServicer):  # type: ignore[misc, name-defined]
    """Node-only driver: no plugin capabilities. Probe runs a bounded health sweep of the volumes
    (dead ones are logged and counted) but stays ready: restarting the plugin cannot repair them."""

    def __init__(self, driver_name: str, on_probe: Callable[[], Any] | None = None) -> None:
        self.driver_name = driver_name
        self.on_probe = on_probe

    def GetPluginInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb2.GetPluginInfoResponse(
            name=self.driver_name, vendor_version=kvfs.__version__, manifest={"project": "kvfs"}
        )

    def GetPluginCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb2.GetPluginCapabilitiesResponse(capabilities=[])

    def Probe(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self.on_probe is not None:
            try:
                self.on_probe()
            except Exception:  # noqa: BLE001 - a failed sweep must not fail liveness
                log.exception("health sweep failed")
        response = pb2.ProbeResponse()
        response.ready.value = True
        return response
