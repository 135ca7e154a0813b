"""Packaging: committed CSI stubs match csi.proto, and the run-time dependencies stay lean."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from scripts.gen_csi_stubs import GENERATED, PROTO_DIR, generate

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _minimum(requirements: list[str], name: str) -> str:
    (spec,) = [r for r in requirements if re.match(rf"{re.escape(name)}\b", r)]
    found = re.search(r">=([0-9.]+)", spec)
    assert found, spec
    return found.group(1)


def test_committed_stubs_match_csi_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools comes with the test extra")
    generate(tmp_path)
    for name in GENERATED:
        assert (tmp_path / name).read_bytes() == (PROTO_DIR / name).read_bytes(), (
            f"src/kvfs/csi/proto/{name} is not what csi.proto generates: run scripts/gen_csi_stubs.py"
        )


def test_stubs_import_without_grpcio_tools() -> None:
    from kvfs.csi.proto import load

    pb2, pb2_grpc = load()
    assert pb2.NodePublishVolumeRequest(target_path="/t").target_path == "/t"
    assert hasattr(pb2_grpc, "NodeServicer")
    source = (PROTO_DIR / "__init__.py").read_text() + (PROTO_DIR / "csi_pb2.py").read_text()
    assert "grpc_tools" not in source


def test_dependency_pins_admit_the_committed_stubs() -> None:
    runtime = PYPROJECT["project"]["dependencies"]
    grpc_made = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", (PROTO_DIR / "csi_pb2_grpc.py").read_text())
    protobuf_made = re.search(r"# Protobuf Python Version: ([0-9.]+)", (PROTO_DIR / "csi_pb2.py").read_text())
    assert grpc_made and protobuf_made
    assert _minimum(runtime, "grpcio") == grpc_made.group(1)
    assert _minimum(runtime, "protobuf") == protobuf_made.group(1)
    major = protobuf_made.group(1).split(".")[0]
    assert any(r.startswith("protobuf") and f"<{int(major) + 1}" in r for r in runtime)
    tools = [r for r in PYPROJECT["project"]["optional-dependencies"]["test"] if r.startswith("grpcio-tools")]
    assert tools == [f"grpcio-tools=={grpc_made.group(1)}"]


def test_runtime_needs_neither_grpcio_tools_nor_the_emulator_web_stack() -> None:
    runtime = {re.split(r"[<>=\[; ]", r)[0].lower() for r in PYPROJECT["project"]["dependencies"]}
    assert not runtime & {"grpcio-tools", "hypercorn", "starlette"}
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {re.split(r"[<>=]", r)[0] for r in extras["emulator"]} == {"hypercorn", "starlette"}


def test_license_file_matches_pyproject() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert PYPROJECT["project"]["license"] == "MIT" and PYPROJECT["project"]["license-files"] == ["LICENSE"]
    assert text.startswith("MIT License\n") and "Copyright (c) 2026 the kvfs authors" in text
