"""Outages on a real mount: Key Vault or Entra ID refusing connections fails cold reads fast, and heals.

Key Vault is reached through a TCP forwarder in front of the emulator's HTTPS port (the cloud's
keyVaultDNSSuffix names the forwarder's port; Entra ID stays on the emulator's), so the test can
take the vault host down and bring it back on the same port while everything else keeps working.
Timings are printed, and bounded only loosely: enough to catch a return to retrying every cold
read until its deadline (~20 s each), never tight enough to flake on a busy machine.
"""

from __future__ import annotations

import errno
import json
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from e2e.conftest import Mounter, errno_of, needs_fuse, read, wait_until, workload_parameters
from kvfs.emulator.server import Emulator

pytestmark = [needs_fuse, pytest.mark.mount]

# Regression guard only (see the module docstring); the measured figures are in README.md.
NOT_THE_OLD_WAY = 60.0


class Forwarder:
    """127.0.0.1:`port` → 127.0.0.1:`target`. `down()` refuses new connections and cuts open ones."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.up()

    def up(self) -> None:
        """Listen again, on the same port as before."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """Nothing listens any more (connections are refused); established ones are reset."""
        if self._listener is not None:
            _cut(self._listener)  # wakes the accept() of its thread
            self._listener = None
        with self._lock:
            for sock in self._open:
                _cut(sock)
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._open.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            for sock in (src, dst):
                self._open.discard(sock)
                _cut(sock)


def _cut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def cloud_env(emu: Emulator, path: Path, **changes: str) -> Path:
    """The emulator's cloud file with some endpoints changed."""
    values = json.loads(emu.cloud_env_file.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))
    return path


def unused_port() -> int:
    """A loopback port nothing listens on: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def readable(path: Path) -> bytes | None:
    try:
        return read(path)
    except OSError:
        return None


def fail_one_after_another(paths: list[Path]) -> float:
    """Read each (cold) file in turn; each must fail with EIO. The total wall time."""
    started = time.monotonic()
    for path in paths:
        assert errno_of(path) == errno.EIO, path
    return time.monotonic() - started


def test_key_vault_refusing_connections_fails_cold_reads_fast_keeps_cached_ones_and_recovers(
    emu: Emulator, mounter: Mounter, tmp_path: Path
) -> None:
    values = {f"s{i:02}": f"value {i} " + "x" * (10 * i) for i in range(22)}
    for name, value in values.items():
        emu.set_secret("demo", name, value)
    forwarder = Forwarder(emu.https_port)
    try:
        env_file = cloud_env(emu, tmp_path / "cloud-fwd.json", keyVaultDNSSuffix=f"vault.localhost:{forwarder.port}")
        objects = [{"objectName": name, "objectType": "secret"} for name in values]
        mount = mounter.start(workload_parameters(emu, *objects, cloudEnvFileName=str(env_file)))
        cached, cold = list(values)[:2], list(values)[2:]
        for name in cached:
            assert read(mount.path / name) == values[name].encode()

        forwarder.down()
        cold_total = fail_one_after_another([mount.path / name for name in cold])
        started = time.monotonic()
        listing = subprocess.run(["ls", "-la", str(mount.path)], capture_output=True, text=True, timeout=300)
        ls_total = time.monotonic() - started
        print(
            f"\nKey Vault refusing connections: {len(cold)} cold reads, one after another, all EIO in"
            f" {cold_total:.2f} s; `ls -la` of {len(values)} files in {ls_total:.2f} s"
        )
        assert cold_total < NOT_THE_OLD_WAY and ls_total < NOT_THE_OLD_WAY
        sizes = {parts[-1]: int(parts[4]) for parts in map(str.split, listing.stdout.splitlines()) if len(parts) == 9}
        assert {name: sizes.get(name) for name in cached} == {name: len(values[name]) for name in cached}
        for name in cold:  # listed, but their attributes cannot be had
            assert f"cannot access '{mount.path / name}': Input/output error" in listing.stderr
        for name in cached:  # cached reads do not change at all
            assert read(mount.path / name) == values[name].encode()
        host = f"https://demo.vault.localhost:{forwarder.port}"
        assert f"code=HostUnreachable: secret '{cold[0]}': vault {host} unreachable (circuit open since" in mount.log()

        forwarder.up()
        started = time.monotonic()
        wait_until(lambda: readable(mount.path / cold[0]) == values[cold[0]].encode(), timeout=120, interval=0.2)
        print(f"Key Vault back: the first cold read worked {time.monotonic() - started:.2f} s after recovery")
        wait_until(lambda: all(readable(mount.path / n) == values[n].encode() for n in cold), timeout=60)
        log = mount.log()
        assert len(re.findall(rf"{re.escape(host)} unreachable \(.*\): requests to it fail at once", log)) == 1
        assert f"{host} reachable again after" in log
    finally:
        forwarder.down()


def test_entra_id_refusing_connections_fails_cold_reads_fast(emu: Emulator, mounter: Mounter, tmp_path: Path) -> None:
    names = [f"t{i}" for i in range(20)]
    for name in names:
        emu.set_secret("demo", name, f"value of {name}")
    authority = f"https://localhost:{unused_port()}"
    env_file = cloud_env(emu, tmp_path / "cloud-no-entra.json", activeDirectoryEndpoint=authority + "/")
    objects = [{"objectName": name, "objectType": "secret"} for name in names]
    mount = mounter.start(workload_parameters(emu, *objects, cloudEnvFileName=str(env_file)))
    total = fail_one_after_another([mount.path / name for name in names])
    print(f"\nEntra ID refusing connections: {len(names)} cold reads, one after another, all EIO in {total:.2f} s")
    assert total < NOT_THE_OLD_WAY
    log = mount.log()
    assert f"cannot reach Entra ID at {authority} (HostUnreachable: {authority} unreachable (circuit open since" in log
    assert emu.count(route="get_secret") == 0
