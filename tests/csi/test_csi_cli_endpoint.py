"""`kvfs csi node` refuses endpoints and flags it cannot serve, before starting anything."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from kvfs.config.model import RenderDefaults


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


@pytest.mark.parametrize(
    ("args", "split", "chain"),
    [
        ([], False, True),  # upstream's provider defaults
        (["--write-cert-and-key-in-separate-files"], True, True),  # a bare boolean flag is true, as in Go
        (["--write-cert-and-key-in-separate-files=false", "--construct-pem-chain=0"], False, False),
        (["--write-cert-and-key-in-separate-files=T", "--construct-pem-chain", "--node-id=n2"], True, True),
        (["--construct-pem-chain=FALSE"], False, False),
    ],
)
def test_upstream_provider_flags_set_the_node_wide_defaults(
    monkeypatch: pytest.MonkeyPatch, args: list[str], split: bool, chain: bool
) -> None:
    import kvfs.csi.cli
    import kvfs.csi.node

    seen: list[Any] = []
    monkeypatch.setattr(kvfs.csi.node, "run_node", lambda config, *a, **kw: seen.append(config) or 0)
    monkeypatch.setattr(kvfs.csi.cli, "setup_logging", lambda *a, **kw: None)  # this process's logging stays
    assert kvfs.csi.cli.main(["node", "--node-id=n1", "--endpoint=unix:///tmp/kvfs-x/csi.sock", *args]) == 0
    assert seen[0].render_defaults == RenderDefaults(split_cert_key=split, construct_pem_chain=chain)


def test_a_provider_flag_with_a_bad_value_is_named_with_the_fix() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvfs", "csi", "node", "--node-id", "n1", "--construct-pem-chain=yes"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "--construct-pem-chain: invalid go_bool value" not in result.stderr
    assert "'yes': expected true or false" in result.stderr and "--FLAG=false" in result.stderr


def test_a_bad_metrics_address_is_refused_with_the_fix() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvfs", "csi", "node", "--node-id", "n1", "--metrics-addr", "8095", "--no-start-mounter"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "kvfs csi node: --metrics-addr '8095': expected HOST:PORT (e.g. 127.0.0.1:8095" in result.stderr
    assert "Traceback" not in result.stderr
