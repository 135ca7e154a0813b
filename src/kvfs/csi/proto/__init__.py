"""CSI v1 gRPC stubs, generated from `csi.proto` on first use.

Generated files are not committed (no maintained PyPI package ships current CSI stubs), so a fresh
checkout works without a build step: `load()` runs grpc_tools.protoc into this package's folder,
or into a per-user cache folder when the package is read-only (an installed wheel).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
_PROTO = _HERE / "csi.proto"
_REL = Path("kvfs", "csi", "proto")
_GENERATED = ("csi_pb2.py", "csi_pb2_grpc.py", "csi_pb2.pyi")
_lock = threading.Lock()


def _digest() -> str:
    return hashlib.sha256(_PROTO.read_bytes()).hexdigest()[:16]


def _stamp(digest: str) -> str:
    return f"\n# kvfs: generated from csi.proto sha256 {digest}\n"


def _is_fresh(folder: Path, digest: str) -> bool:
    try:
        return (folder / "csi_pb2.py").read_text().endswith(_stamp(digest)) and (
            folder / "csi_pb2_grpc.py"
        ).exists()
    except OSError:
        return False


def _generate(out_pkg: Path, digest: str) -> None:
    """Run protoc into a temporary tree, then move the files in atomically (concurrent loaders)."""
    from grpc_tools import protoc  # imported here: only needed when stubs are missing

    include = str(Path(protoc.__file__).resolve().parent / "_proto")
    out_pkg.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_pkg, prefix=".protoc-") as tmp:
        src = Path(tmp, "src")
        (src / _REL).mkdir(parents=True)
        shutil.copyfile(_PROTO, src / _REL / "csi.proto")
        out = Path(tmp, "out")
        out.mkdir()
        args = [
            "grpc_tools.protoc",
            f"-I{src}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--pyi_out={out}",
            str(src / _REL / "csi.proto"),  # under -I{src}: its name stays package-relative
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"grpc_tools.protoc failed on {_PROTO} (exit {rc})")
        with open(out / _REL / "csi_pb2.py", "a") as f:
            f.write(_stamp(digest))
        # csi_pb2.py last: its stamp marks the set complete
        for name in reversed(_GENERATED):
            os.replace(out / _REL / name, out_pkg / name)
    log.debug("generated CSI stubs in %s", out_pkg)


def _cache_pkg(digest: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "kvfs" / f"csi-proto-{digest}" / _REL


def load() -> tuple[ModuleType, ModuleType]:
    """Return the `(csi_pb2, csi_pb2_grpc)` modules, generating them first when missing or stale."""
    with _lock:
        name = __name__ + ".csi_pb2"
        if name in sys.modules and name + "_grpc" in sys.modules:
            return sys.modules[name], sys.modules[name + "_grpc"]
        digest = _digest()
        target = _HERE
        if not _is_fresh(target, digest):
            if os.access(_HERE, os.W_OK):
                _generate(_HERE, digest)
            else:
                target = _cache_pkg(digest)
                if not _is_fresh(target, digest):
                    _generate(target, digest)
                if str(target) not in __path__:
                    __path__.append(str(target))
        pb2 = importlib.import_module(name)
        pb2_grpc = importlib.import_module(name + "_grpc")
        return pb2, pb2_grpc
