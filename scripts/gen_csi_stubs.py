"""Regenerate the CSI gRPC stubs committed under src/kvfs/csi/proto/ from its csi.proto.

Run after editing csi.proto, with the grpcio-tools the `test` extra pins (the version the
committed stubs were made with):

    .venv/bin/python scripts/gen_csi_stubs.py

tests/test_packaging.py runs `generate()` into a temporary folder and fails when the result
differs from the committed files. kvfs itself never needs grpcio-tools.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parents[1] / "src" / "kvfs" / "csi" / "proto"
GENERATED = ("csi_pb2.py", "csi_pb2_grpc.py", "csi_pb2.pyi")
_PACKAGE = Path("kvfs", "csi", "proto")  # the import path the stubs refer to each other by


def generate(out_dir: Path) -> None:
    """Write GENERATED into `out_dir`, made by grpc_tools.protoc from PROTO_DIR/csi.proto."""
    from grpc_tools import protoc

    include = str(Path(protoc.__file__).resolve().parent / "_proto")  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory(prefix="kvfs-protoc-") as tmp:
        src, out = Path(tmp, "src"), Path(tmp, "out")
        (src / _PACKAGE).mkdir(parents=True)
        out.mkdir()
        shutil.copyfile(PROTO_DIR / "csi.proto", src / _PACKAGE / "csi.proto")
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{src}",
                f"-I{include}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                f"--pyi_out={out}",
                str(src / _PACKAGE / "csi.proto"),
            ]
        )
        if rc != 0:
            raise RuntimeError(f"grpc_tools.protoc failed on {PROTO_DIR / 'csi.proto'} (exit {rc})")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            shutil.copyfile(out / _PACKAGE / name, out_dir / name)


if __name__ == "__main__":
    generate(PROTO_DIR)
    print(f"wrote {', '.join(GENERATED)} in {PROTO_DIR}", file=sys.stderr)
