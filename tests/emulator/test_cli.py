"""`kvfs emulator` as a process: help text, seed file, emulator.json, clean stop on SIGTERM."""

from __future__ import annotations

import argparse
import json
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kvfs.emulator import cli

RUNNER = (
    "import argparse, sys; from kvfs.emulator import cli; p = argparse.ArgumentParser(prog='kvfs emulator'); "
    "cli.add_arguments(p); sys.exit(cli.run(p.parse_args()))"
)


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_help_documents_every_option() -> None:
    parser = argparse.ArgumentParser(prog="kvfs emulator")
    cli.add_arguments(parser)
    text = parser.format_help()
    for action in parser._actions:
        for opt in action.option_strings:
            assert opt in text
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10
    for opt in ("--dir", "--port", "--http-port", "--seed", "--vault", "--token-lifetime", "--host"):
        assert opt in text
    assert "emulator.json" in text


def test_serves_seeded_content_and_stops_on_sigterm(tmp_path: Path) -> None:
    seed = tmp_path / "seed.yaml"
    seed.write_text(
        "vaults:\n  demo:\n    secrets:\n      - {name: greeting, value: hello, content_type: text/plain}\n"
        "  second:\n    keys:\n      - {name: k, kty: EC}\n"
    )
    out = tmp_path / "emu"
    proc = start("--dir", str(out), "--seed", str(seed), "--vault", "demo", "--token-lifetime", "600")
    try:
        assert proc.stdout is not None
        banner = [proc.stdout.readline() for _ in range(3)]
        assert banner[0].startswith("kvfs emulator ready"), banner + [proc.stderr.read() if proc.stderr else ""]
        info = json.loads((out / "emulator.json").read_text())
        assert set(info["vaults"]) == {"demo", "second"}
        assert any(info["vaults"]["demo"] in line for line in banner)
        verify = ssl.create_default_context(cafile=info["ca_file"])
        token = httpx.post(
            f"{info['authority_host']}/{info['tenant_id']}/oauth2/v2.0/token", verify=verify,
            data={"grant_type": "client_credentials", "client_id": info["app"]["client_id"],
                  "client_secret": info["app"]["client_secret"], "scope": info["kv_resource"] + "/.default"},
        ).json()["access_token"]
        r = httpx.get(info["vaults"]["demo"] + "secrets/greeting?api-version=7.4", verify=verify,
                      headers={"Authorization": f"Bearer {token}"})
        assert (r.status_code, r.json()["value"], r.json()["contentType"]) == (200, "hello", "text/plain")
        assert info["app"]["client_secret"] not in "".join(banner)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not (out / "emulator.json").exists(), "a stopped emulator must not look ready"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("vaults: [1, 2]", "'vaults' must be a mapping"),
        ("vaults:\n  demo:\n    secrets:\n      - {name: s, value: 5}\n", "vaults.demo.secrets[0].value"),
        ("vaults:\n  demo:\n    certificates:\n      - {name: c, format: der}\n", "format 'der' is not supported"),
        ("vaults: {demo: {: [}", "not valid YAML"),
    ],
)
def test_bad_seed_is_a_clear_error(tmp_path: Path, content: str, needle: str) -> None:
    seed = tmp_path / "seed.yaml"
    seed.write_text(content)
    proc = start("--dir", str(tmp_path / "emu"), "--seed", str(seed))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "emu" / "emulator.json").exists()


def test_bad_vault_name_and_missing_seed(tmp_path: Path) -> None:
    proc = start("--dir", str(tmp_path), "--vault", "x")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "vault name 'x' is invalid" in err and "Traceback" not in err
    proc = start("--dir", str(tmp_path), "--seed", str(tmp_path / "missing.yaml"))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "missing.yaml" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--port", "99999"], "99999 is not a port number"),
        (["--http-port", "x"], "'x' is not a port number"),
    ],
)
def test_bad_ports_are_refused_without_a_traceback(tmp_path: Path, args: list[str], fragment: str) -> None:
    proc = start("--dir", str(tmp_path / "emu"), *args)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and fragment in err and "Traceback" not in err


def test_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    proc = start("--dir", str(not_a_dir))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "--dir" in err and "is not a directory" in err and "Traceback" not in err
