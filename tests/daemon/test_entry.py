"""Daemon entries: the default one, the stand-in, and that a mounter runs the entry it was given."""

from __future__ import annotations

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

from kvfs.csi.mounter import MounterClient, SpawnError
from kvfs.daemon import entry
from kvfs.daemon import standin



def test_an_entry_brings_its_own_root_step() -> None:
    default = entry.load_entry(entry.DEFAULT_ENTRY)
    assert (default.run, default.prepare, default.warm_up) == (entry.run_volume, entry.prepare, entry.warm_up)
    stand_in = entry.load_entry("kvfs.daemon.standin:run")
    assert (stand_in.run, stand_in.prepare, stand_in.warm_up) == (standin.run, None, None)  # nor its warm-up
    with pytest.raises(ValueError, match="expected MODULE:FUNCTION"):
        entry.load_entry("kvfs.daemon.standin")


@pytest.mark.skipif(os.geteuid() != 0, reason="the zygote drops to the volume's uid only as root")
def test_the_mounter_runs_the_configured_entry_with_its_own_prepare_step() -> None:
    """Not the default entry's prepare: the configured module's, as root, then its run as the volume's uid."""
    folder = tempfile.mkdtemp(prefix="kvfsent-", dir="/tmp")
    path = os.path.join(folder, "mounter.sock")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    with open(os.path.join(folder, "mounter.log"), "wb") as log:
        mounter = subprocess.Popen(
            [sys.executable, "-m", "kvfs.csi.cli", "mounter", "--socket", path, "--daemon-entry", "probe_entry:run"],
            stdout=log, stderr=log, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        info: dict[str, Any] | None = None
        while info is None and mounter.poll() is None and time.monotonic() < deadline:
            info = MounterClient(path).ping(timeout=0.5) or time.sleep(0.05)
        assert info is not None and info["entry"] == "probe_entry:run"
        control, other = socket.socketpair()
        other.close()
        with pytest.raises(SpawnError) as failed:
            MounterClient(path).spawn(
                volume_id="vol-probe", params={}, secrets={}, uid=1_900_999_000, gid=1_900_999_000,
                allow_node_identity=False, cloud_env_dir="", fuse_fd=os.open(os.devnull, os.O_RDONLY),
                control_fd=control.detach(), timeout=20,
            )  # fmt: skip
        assert str(failed.value) == "probe entry: prepared as uid [0], ran as uid 1900999000"
    finally:
        mounter.terminate()
        mounter.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
