"""Daemon entries: the default one, the stand-in, and that a mounter runs the entry it was given."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from kvfs.config.parameters import parse_parameters
from kvfs.csi.mounter import MounterClient, SpawnError
from kvfs.daemon import entry
from kvfs.daemon import standin
from kvfs.errors import ConfigError



def test_an_entry_brings_its_own_root_step() -> None:
    default = entry.load_entry(entry.DEFAULT_ENTRY)
    assert (default.run, default.prepare, default.warm_up) == (entry.run_volume, entry.prepare, entry.warm_up)
    stand_in = entry.load_entry("kvfs.daemon.standin:run")
    assert (stand_in.run, stand_in.prepare, stand_in.warm_up) == (standin.run, None, None)  # nor its warm-up
    with pytest.raises(ValueError, match="expected MODULE:FUNCTION"):
        entry.load_entry("kvfs.daemon.standin")


def _spawn_error(entry_name: str, folder: str, params: dict[str, str], secrets: dict[str, str], cloud_env_dir: str = "") -> str:
    """Start a mounter running `entry_name` (tests/daemon on PYTHONPATH), spawn one volume; its start-up error."""
    path = os.path.join(folder, "mounter.sock")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    with open(os.path.join(folder, "mounter.log"), "wb") as log:
        mounter = subprocess.Popen(
            [sys.executable, "-m", "kvfs.csi.cli", "mounter", "--socket", path, "--daemon-entry", entry_name],
            stdout=log, stderr=log, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        info: dict[str, Any] | None = None
        while info is None and mounter.poll() is None and time.monotonic() < deadline:
            info = MounterClient(path).ping(timeout=0.5) or time.sleep(0.05)
        assert info is not None and info["entry"] == entry_name
        control, other = socket.socketpair()
        other.close()
        with pytest.raises(SpawnError) as failed:
            MounterClient(path).spawn(
                volume_id="vol-probe", params=params, secrets=secrets, uid=1_900_999_000, gid=1_900_999_000,
                allow_node_identity=False, cloud_env_dir=cloud_env_dir, fuse_fd=os.open(os.devnull, os.O_RDONLY),
                control_fd=control.detach(), timeout=20,
            )  # fmt: skip
        return str(failed.value)
    finally:
        mounter.terminate()
        mounter.wait(10)


@pytest.mark.skipif(os.geteuid() != 0, reason="the zygote drops to the volume's uid only as root")
def test_the_mounter_runs_the_configured_entry_with_its_own_prepare_step() -> None:
    """Not the default entry's prepare: the configured module's, as root, then its run as the volume's uid."""
    folder = tempfile.mkdtemp(prefix="kvfsent-", dir="/tmp")
    try:
        error = _spawn_error("probe_entry:run", folder, {}, {})
        assert error == "probe entry: prepared as uid [0], ran as uid 1900999000"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="the zygote drops to the volume's uid only as root")
def test_the_default_entry_reads_the_cloud_env_file_as_root_and_parses_only_after_the_drop() -> None:
    """Nothing a tenant wrote is parsed as root: the parameters (objects YAML and the file's JSON
    included) are parsed as the volume's uid, from a cloud env file only root could read."""
    folder = tempfile.mkdtemp(prefix="kvfsent-", dir="/tmp")
    clouds = os.path.join(folder, "clouds")
    os.mkdir(clouds, 0o700)
    env_file = os.path.join(clouds, "stack.json")
    with open(os.open(env_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as out:
        json.dump(
            {
                "activeDirectoryEndpoint": "https://adfs.local/adfs/",
                "keyVaultEndpoint": "https://vault.local/",
                "keyVaultDNSSuffix": "vault.local",
            },
            out,
        )
    params = {
        "csi.storage.k8s.io/pod.name": "web-0",
        "csi.storage.k8s.io/pod.namespace": "shop",
        "keyvaultName": "testkv",
        "tenantID": "72f988bf-86f1-41af-91ab-2d7cd011db47",
        "cloudName": "AzureStackCloud",
        "cloudEnvFileName": env_file,
        "objects": "array:\n  - |\n    objectName: secret1\n    objectType: secret\n",
    }
    secrets = {"clientid": "11111111-2222-3333-4444-555555555555", "clientsecret": "probe-secret"}
    try:
        error = _spawn_error("parse_probe_entry:run", folder, params, secrets, cloud_env_dir=clouds)
        assert error == "parsed as uid [1900999000], Key Vault at vault.local"
        # a refusal comes the same way, worded as the plugin words it when it checks a publish
        bad = {**params, "objects": "array: [a"}
        with pytest.raises(ConfigError) as refused:
            parse_parameters(bad, secrets, context="csi", cloud_env_dir=clouds)
        assert _spawn_error("parse_probe_entry:run", folder, bad, secrets, clouds) == str(refused.value)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
