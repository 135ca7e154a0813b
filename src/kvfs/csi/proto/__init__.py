"""CSI v1 gRPC stubs, generated from `csi.proto` and committed (csi_pb2*.py, csi_pb2.pyi).

No maintained PyPI package ships current CSI stubs, and generating them at install or first use
would make grpcio-tools a run-time dependency. After editing csi.proto, regenerate them with
scripts/gen_csi_stubs.py; tests/test_packaging.py fails while they differ from the .proto.
"""

from __future__ import annotations

from types import ModuleType


def load() -> tuple[ModuleType, ModuleType]:
    """The `(csi_pb2, csi_pb2_grpc)` modules (imported on first use: only the CSI side needs them)."""
    from kvfs.csi.proto import csi_pb2, csi_pb2_grpc

    return csi_pb2, csi_pb2_grpc
