"""An open `kvfs mount` survives a restart of a real `kvfs emulator` process with the same --dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from e2e.conftest import Mount, is_mounted, needs_fuse, objects_yaml, read, spc_manifest, wait_until
from emulator.test_cli import Served

pytestmark = [needs_fuse, pytest.mark.mount]


def test_an_open_mount_reads_old_and_new_objects_after_the_emulator_restarts(tmp_path: Path) -> None:
    folder = tmp_path / "emu"
    emulator = Served(folder)
    mount: Mount | None = None
    try:
        info = emulator.info
        for name, value in (("read-before", "a1"), ("first-read-after", "b1")):
            assert emulator.admin("POST", "secrets", json={"vault": "demo", "name": name, "value": value}).is_success
        spc = tmp_path / "spc.yaml"
        spc.write_text(spc_manifest({
            "clientID": info["app"]["client_id"], "tenantId": info["tenant_id"], "keyvaultName": "demo",
            "cloudName": "AzureStackCloud", "cloudEnvFileName": info["cloud_env_file"],
            "objects": objects_yaml(*({"objectName": n, "objectType": "secret"}
                                      for n in ("read-before", "first-read-after", "created-after"))),
        }))
        path, log = tmp_path / "mnt", tmp_path / "mount.log"
        path.mkdir()
        env = dict(os.environ, SSL_CERT_FILE=info["ca_file"], AZURE_FEDERATED_TOKEN_FILE=info["sa_token_file"],
                   PYTHONUNBUFFERED="1")
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "kvfs", "mount", "--spc", str(spc), str(path)],
                                    stdout=out, stderr=subprocess.STDOUT, env=env)
        mount = Mount(path, proc, log, env)
        wait_until(lambda: is_mounted(path) or proc.poll() is not None)
        assert is_mounted(path), mount.log()
        assert read(path / "read-before") == b"a1"

        emulator.stop()
        emulator = Served(folder)
        assert emulator.info["tenant_id"] == info["tenant_id"] and emulator.info["https_port"] == info["https_port"]
        assert emulator.admin("POST", "secrets", json={"vault": "demo", "name": "created-after", "value": "c1"}).is_success

        assert read(path / "first-read-after") == b"b1", mount.log()
        assert read(path / "created-after") == b"c1", mount.log()
        counts = emulator.admin("GET", "counts", params={"route": "get_secret"}).json()
        assert counts["count"] == 2, "both reads reached the restarted emulator"
        assert proc.poll() is None
    finally:
        if mount is not None:
            mount.stop()
            assert not is_mounted(mount.path)
        emulator.stop()
