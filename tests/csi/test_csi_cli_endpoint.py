"""`kvfs csi node` refuses endpoints and flags it cannot serve, before starting anything."""

from __future__ import annotations

import subprocess
import sys


def test_tcp_endpoint_is_refused_with_the_fix() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvfs", "csi", "node", "--endpoint", "tcp://127.0.0.1:1", "--node-id", "n1",
         "--no-start-mounter"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "only unix:// endpoints are supported" in result.stderr and "unix:///PATH/csi.sock" in result.stderr
    assert "Traceback" not in result.stderr


def test_socket_path_too_long_for_unix_sockets_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    long_dir = tmp_path / ("d" * 120)
    result = subprocess.run(
        [sys.executable, "-m", "kvfs", "csi", "node", "--endpoint", f"unix://{long_dir}/csi.sock",
         "--node-id", "n1", "--no-start-mounter"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "longer than unix sockets allow" in result.stderr and "Traceback" not in result.stderr


def test_removed_daemon_uid_flags_name_their_replacement() -> None:
    for flag in ("--daemon-uid", "--daemon-gid"):
        result = subprocess.run(
            [sys.executable, "-m", "kvfs", "csi", "node", "--node-id", "n1", flag, "65534", "--no-start-mounter"],
            capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 2
        assert f"{flag} was removed" in result.stderr and "--daemon-uid-range" in result.stderr


def test_log_level_is_a_choice() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvfs.csi.cli", "mounter", "--log-level", "LOUD"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "'LOUD' is not a log level: use one of DEBUG, INFO, WARNING, ERROR" in result.stderr


def test_a_bad_metrics_address_is_refused_with_the_fix() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvfs", "csi", "node", "--node-id", "n1", "--metrics-addr", "8095", "--no-start-mounter"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "kvfs csi node: --metrics-addr '8095': expected HOST:PORT (e.g. 127.0.0.1:8095" in result.stderr
    assert "Traceback" not in result.stderr
