"""`kvfs status` on a live `kvfs mount` (issue 11): what the daemon serves, from its live state; and
`kvfs mount` on a folder a kvfs mount already serves names that process.

On a node (a CSI target path and --state-dir): tests/csi/test_operability.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from e2e.conftest import Mounter, errno_of, needs_fuse, read, spc_manifest, workload_parameters
from kvfs.emulator.server import Emulator

pytestmark = [needs_fuse, pytest.mark.mount]

OBJECTS = ({"objectName": "app", "objectType": "secret"}, {"objectName": "missing", "objectType": "secret"})


def kvfs(mounter: Mounter, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvfs", *args], capture_output=True, text=True, timeout=60, env=mounter.env()
    )


def test_status_shows_the_served_version_of_a_read_object_and_the_last_error_of_a_missing_one(
    emu: Emulator, mounter: Mounter
) -> None:
    version = emu.set_secret("demo", "app", "value one")
    mount = mounter.start(workload_parameters(emu, *OBJECTS))
    assert read(mount.path / "app") == b"value one"
    assert errno_of(mount.path / "missing") == 2

    shown = kvfs(mounter, "status", str(mount.path))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"{mount.path}: served by pid {mount.process.pid} from {emu.vault_url('demo')}"
    assert f"identity: workload_identity, client id {emu.identity.default_app.client_id}, tenant {emu.tenant_id}" in lines
    assert any(line.startswith("token:    valid until 20") for line in lines)
    [app] = [line.split() for line in lines if line.startswith("app ")]
    assert app[:3] == ["app", "secret/app", version] and app[-1] == "-"
    [missing] = [line.split() for line in lines if line.startswith("missing ")]
    assert missing[:5] == ["missing", "secret/missing", "-", "-", "-"] and missing[-2:] == ["ENOENT", "SecretNotFound"]
    [error] = [line for line in lines if line.startswith("  missing: ")]
    assert "ENOENT SecretNotFound: secret 'missing': not found in vault" in error

    as_json = kvfs(mounter, "status", "--json", str(mount.path))
    assert as_json.returncode == 0, as_json.stderr
    status = json.loads(as_json.stdout)
    objects = {o["file"]: o for o in status["objects"]}
    assert objects["app"]["version"] == version and objects["app"]["error"] is None
    assert objects["app"]["fetched_at"] and objects["app"]["refreshed_at"]
    assert objects["missing"]["version"] is None
    assert (objects["missing"]["error"]["errno"], objects["missing"]["error"]["code"]) == ("ENOENT", "SecretNotFound")
    assert objects["missing"]["error"]["at"].endswith("Z")
    assert status["identity"]["token_expires_at"] and status["pid"] == mount.process.pid
    assert "value one" not in shown.stdout + as_json.stdout


def test_status_of_a_folder_that_is_no_kvfs_mount_is_refused(mounter: Mounter, tmp_path: Path) -> None:
    shown = kvfs(mounter, "status", str(tmp_path))
    assert shown.returncode == 2
    assert f"kvfs: error: MOUNTPOINT '{tmp_path}': is not a kvfs mount" in shown.stderr


def test_a_second_mount_on_a_live_kvfs_mount_names_the_process_serving_it(emu: Emulator, mounter: Mounter) -> None:
    emu.set_secret("demo", "app", "still served")
    mount = mounter.start(workload_parameters(emu, *OBJECTS))
    spc = mounter.tmp / "again.yaml"
    spc.write_text(spc_manifest(workload_parameters(emu, *OBJECTS)))
    again = kvfs(mounter, "mount", "--spc", str(spc), str(mount.path))
    assert again.returncode == 2
    assert (
        f"kvfs: error: MOUNTPOINT '{mount.path}': is already mounted by kvfs (pid {mount.process.pid})"
        f" (stop that mount first (Ctrl-C in its terminal, or kill {mount.process.pid}), or choose another folder)"
    ) in again.stderr
    assert "is not empty" not in again.stderr
    assert read(mount.path / "app") == b"still served"  # the first mount is untouched


def test_status_of_a_hung_mount_says_so_instead_of_hanging(emu: Emulator, mounter: Mounter) -> None:
    """Its daemon stopped (SIGSTOP): the root's extended attribute and the control socket get no
    answer; kvfs status gives up on both (bounded waits) and says the daemon did not answer."""
    mount = mounter.start(workload_parameters(emu, *OBJECTS))
    os.kill(mount.process.pid, signal.SIGSTOP)
    try:
        shown = kvfs(mounter, "status", str(mount.path))  # a hang fails here, on the 60 s subprocess timeout
    finally:
        os.kill(mount.process.pid, signal.SIGCONT)
    assert shown.returncode == 1
    assert f"kvfs status: {mount.path}: its daemon did not answer on " in shown.stderr
