"""`kvfs mount --metrics-addr`: a real mount's scrape moves by exactly what its readers did.

The same scrape through the CSI plugin (summed over real daemons): tests/csi/test_operability.py.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from e2e.conftest import Mounter, errno_of, needs_fuse, read, spc_manifest, workload_parameters
from kvfs.daemon.metrics import CODES, KINDS, READ_RESULTS, REFRESH_RESULTS, TOKEN_RESULTS, VOLUME_STATES
from kvfs.emulator.server import Emulator
from scrape import REQUIRED, families, label_values, moved, scrape

pytestmark = [needs_fuse, pytest.mark.mount]

ALLOWED_LABEL_VALUES = {*CODES, *KINDS, *READ_RESULTS, *REFRESH_RESULTS, *TOKEN_RESULTS, *VOLUME_STATES}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_cold_read_a_cached_read_and_a_missing_object_move_the_counters_by_exactly_that(
    emu: Emulator, mounter: Mounter
) -> None:
    emu.set_secret("demo", "app-password", "s3cret value")
    url = f"http://127.0.0.1:{free_port()}/metrics"
    objects = ({"objectName": "app-password", "objectType": "secret"}, {"objectName": "missing", "objectType": "secret"})
    mount = mounter.start(workload_parameters(emu, *objects), "--metrics-addr", url.split("/")[2])
    before = scrape(url)
    assert before['kvfs_volumes{state="healthy"}'] == 1 and before['kvfs_publish_total{result="ok"}'] == 1
    assert before['kvfs_token_requests_total{result="ok"}'] == 1  # the preflight's exchange

    assert read(mount.path / "app-password") == b"s3cret value"  # cold: one GET
    assert read(mount.path / "app-password") == b"s3cret value"  # cached: no request
    assert errno_of(mount.path / "missing") == 2  # Key Vault says 404
    after = scrape(url)
    assert moved(before, after) == {
        'kvfs_reads_total{result="ok"}': 2,
        'kvfs_reads_total{result="enoent"}': 1,
        "kvfs_cache_hits_total{}": 1,
        'kvfs_keyvault_requests_total{code="2xx",kind="secret"}': 1,
        'kvfs_keyvault_requests_total{code="4xx",kind="secret"}': 1,
        "kvfs_keyvault_request_duration_seconds_count{}": 2,
    }
    assert set(REQUIRED) <= families(url)
    values = label_values(after)
    assert values <= ALLOWED_LABEL_VALUES
    assert not any(name in value for value in values for name in ("app-password", "missing", "demo", "default"))


def test_a_bad_or_taken_metrics_address_is_refused_before_mounting(emu: Emulator, mounter: Mounter) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        spc = mounter.tmp / "spc-metrics.yaml"
        spc.write_text(spc_manifest(workload_parameters(emu, {"objectName": "x", "objectType": "secret"})))
        mountpoint = mounter.tmp / "mnt-metrics"
        mountpoint.mkdir()
        for addr, problem in (("nine", "expected HOST:PORT"), (f"127.0.0.1:{taken.getsockname()[1]}", "cannot listen")):
            result = subprocess.run(
                [sys.executable, "-m", "kvfs", "mount", "--spc", str(spc), "--metrics-addr", addr, str(mountpoint)],
                capture_output=True, text=True, timeout=60, env=mounter.env(),
            )  # fmt: skip
            assert result.returncode == 2, result.stderr
            assert f"kvfs: error: --metrics-addr '{addr}': {problem}" in result.stderr
            assert "Traceback" not in result.stderr and list(mountpoint.iterdir()) == []
    finally:
        taken.close()
