"""`kvfs emulator` as a process: help, seed file, emulator.json, SIGTERM, restarts, --fresh, private files."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from inotify_simple import INotify
from inotify_simple import flags as Flags

from kvfs.emulator import cli
from kvfs.emulator.server import open_emulator

PLANTED = "planted-s3cret-value"

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


# -- the folder: restarts, --fresh, private files ---------------------------------------------------
class Served:
    """A `kvfs emulator` process (output in a log file) and its emulator.json once it serves."""

    def __init__(self, folder: Path, *args: str) -> None:
        self.log = folder.parent / f"{folder.name}.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "kvfs", "emulator", "--dir", str(folder), *args],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not (folder / "emulator.json").exists():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the emulator did not start:\n" + self.log.read_text()
            time.sleep(0.05)
        self.info: dict[str, Any] = json.loads((folder / "emulator.json").read_text())

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(method, f"{self.info['admin_url']}/{path}", verify=ssl.create_default_context(
            cafile=self.info["ca_file"]), headers={"Authorization": f"Bearer {self.info['admin_token']}"}, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                assert self.proc.wait(timeout=20) == 0, self.log.read_text()
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait()


class Watcher:
    """The mode of every file the moment it appears in a watched folder, and every chmod there."""

    def __init__(self, *folders: Path) -> None:
        self.inotify = INotify()
        self.folders = {self.inotify.add_watch(f, Flags.CREATE | Flags.MOVED_TO | Flags.ATTRIB): f for f in folders}
        self.modes: list[tuple[str, int]] = []
        self.chmods: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for event in self.inotify.read(timeout=50):
                path = self.folders[event.wd] / event.name
                if event.mask & (Flags.CREATE | Flags.MOVED_TO):
                    try:
                        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                    except FileNotFoundError:  # a temporary name, already renamed
                        continue
                    try:
                        self.modes.append((str(path), os.fstat(fd).st_mode))
                    finally:
                        os.close(fd)
                elif event.mask & Flags.ATTRIB and not event.mask & Flags.ISDIR:
                    self.chmods.append(str(path))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.inotify.close()


def _modes(folder: Path) -> dict[str, str]:
    return {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in folder.iterdir()}


def test_restart_keeps_identity_fresh_starts_over_and_files_are_private_at_every_instant(tmp_path: Path) -> None:
    folder = tmp_path / "emu"
    parent = Watcher(tmp_path)
    first = Served(folder)
    try:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert set(_modes(folder).values()) == {oct(0o600)}, _modes(folder)
        for name in ("emulator.json", "admin-token", "ca.pem", "ca-key.pem", "server.pem", "server-key.pem",
                     "cloud-env.json", "sa-token", "tenant.json", "vaults.jsonl"):
            assert (folder / name).exists(), name
    finally:
        first.stop()
        parent.close()
    created = [(p, m) for p, m in parent.modes if p == str(folder)]
    assert created and all(stat.S_IMODE(m) == 0o700 for _, m in created), parent.modes

    watcher = Watcher(folder)
    try:
        again = Served(folder)
        try:
            for key in ("tenant_id", "app", "managed_identity", "https_port", "http_port", "admin_token", "vaults"):
                assert again.info[key] == first.info[key], key
            assert again.admin("POST", "secrets", json={"vault": "demo", "name": "s", "value": "v"}).status_code == 200
            assert again.admin("POST", "sa-token").status_code == 200
        finally:
            again.stop()
        fresh = Served(folder, "--fresh")
        try:
            assert fresh.info["tenant_id"] != first.info["tenant_id"]
            assert fresh.info["app"] != first.info["app"] and fresh.info["admin_token"] != first.info["admin_token"]
            assert fresh.admin("POST", "secrets", json={"vault": "demo", "name": "t", "value": "v"}).status_code == 200
        finally:
            fresh.stop()
    finally:
        watcher.close()
    seen = {Path(p).name for p, _ in watcher.modes}
    assert {"emulator.json", "vaults.jsonl", "sa-token", "admin-token", "ca-key.pem", "server-key.pem",
            "tenant.json"} <= seen, seen
    loose = [(p, oct(m)) for p, m in watcher.modes if stat.S_IMODE(m) & 0o077]
    assert not loose, f"readable by others when it appeared: {loose}"
    assert not watcher.chmods, f"mode changed after creation: {watcher.chmods}"
    assert set(_modes(folder).values()) <= {oct(0o600)}


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder an emulator has served from and left, holding a planted secret."""
    folder = tmp_path_factory.mktemp("saved") / "emu"

    async def serve_once() -> None:
        async with open_emulator(folder) as emu:
            emu.set_secret("demo", "planted", PLANTED)

    trio.run(serve_once)
    return folder


def _copy(saved: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "emu"
    shutil.copytree(saved, folder)
    return folder


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda f: (f / "tenant.json").write_text("{not json"), "tenant.json is not valid JSON"),
        (lambda f: (f / "tenant.json").write_text('{"format": 1}'), "tenant.json is malformed (field 'tenant_id' is missing)"),
        (lambda f: (f / "vaults.jsonl").write_text('["a list"]\n'), "vaults.jsonl is not a kvfs emulator journal"),
        (lambda f: (f / "vaults.jsonl").write_text((f / "vaults.jsonl").read_text().replace('"created":', '"created":"' + PLANTED + '","x":')),
         "vaults.jsonl: line 3 is malformed (a field has the wrong type or value: ValueError)"),
        (lambda f: (f / "ca-key.pem").unlink(), "cannot read"),
        (lambda f: ((f / "vaults.jsonl").unlink(), (f / "vaults.jsonl").mkdir()), "cannot read"),
    ],
    ids=["tenant-not-json", "tenant-missing-field", "vaults-not-state", "vaults-bad-field", "ca-key-missing", "vaults-a-folder"],
)
def test_damaged_state_is_a_clear_error(saved_state: Path, tmp_path: Path, damage: Any, needle: str) -> None:
    folder = _copy(saved_state, tmp_path)
    damage(folder)
    proc = start("--dir", str(folder), "--port", _free_port(), "--http-port", _free_port())
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert needle in err and "--fresh" in err and "Traceback" not in err and PLANTED not in err
    assert len(err.strip().splitlines()) == 1, err


def test_a_taken_saved_port_names_the_port_and_the_ways_out(saved_state: Path, tmp_path: Path) -> None:
    folder = _copy(saved_state, tmp_path)
    port = json.loads((folder / "tenant.json").read_text())["https_port"]
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        proc = start("--dir", str(folder))
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert f"127.0.0.1:{port}" in err and "--fresh" in err and "--port" in err and "Traceback" not in err


def test_without_the_web_stack_it_names_the_extra(tmp_path: Path) -> None:
    blocked = "import sys; sys.modules['hypercorn'] = None; from kvfs.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", blocked, "emulator", "--dir", str(tmp_path / "emu")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("kvfs emulator: hypercorn is not installed; install the emulator's extra: "
                                   "pip install 'kvfs[emulator]' (in a kvfs checkout: pip install '.[emulator]')")
    assert not (tmp_path / "emu").exists()


def test_a_non_loopback_host_is_warned_about(tmp_path: Path) -> None:
    proc = start("--dir", str(tmp_path / "emu"), "--host", "192.0.2.1")  # TEST-NET-1: never assigned here
    _, err = proc.communicate(timeout=60)
    assert "192.0.2.1" in err and "serves credentials; keep it on loopback" in err
    assert proc.returncode == 1 and "cannot listen on 192.0.2.1" in err


def test_a_change_survives_a_killed_emulator(tmp_path: Path) -> None:
    """Each change is on disk once it is answered: SIGKILL, no clean stop, loses nothing."""
    folder = tmp_path / "emu"
    first = Served(folder)
    try:
        assert first.admin("POST", "secrets", json={"vault": "demo", "name": "kept", "value": "v1"}).is_success
        assert first.admin("POST", "grants", json={"vault": "demo", "client_id": "extra", "granted": True}).is_success
    finally:
        first.proc.kill()
        first.proc.wait()
    (folder / "emulator.json").unlink()  # left behind by the kill
    again = Served(folder)
    try:
        r = httpx.post(
            f"{again.info['authority_host']}/{again.info['tenant_id']}/oauth2/v2.0/token",
            verify=ssl.create_default_context(cafile=again.info["ca_file"]),
            data={"grant_type": "client_credentials", "client_id": again.info["app"]["client_id"],
                  "client_secret": again.info["app"]["client_secret"], "scope": again.info["kv_resource"] + "/.default"},
        )
        r = httpx.get(again.info["vaults"]["demo"] + "secrets/kept?api-version=7.4",
                      verify=ssl.create_default_context(cafile=again.info["ca_file"]),
                      headers={"Authorization": f"Bearer {r.json()['access_token']}"})
        assert r.status_code == 200 and r.json()["value"] == "v1"
    finally:
        again.stop()
