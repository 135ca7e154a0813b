"""Real mounts: `kvfs mount` in a subprocess, talking HTTPS to the emulator (in a thread)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from guards import LogCheck
from kvfs.emulator.server import Emulator, EmulatorThread

needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="real mounts need /dev/fuse and root"
)


def read(path: Path) -> bytes:
    """The whole file, through the mount."""
    with open(path, "rb") as f:
        return f.read()


def errno_of(path: Path) -> int:
    """The errno reading `path` fails with; reading it successfully fails the test."""
    try:
        read(path)
    except OSError as err:
        return err.errno
    raise AssertionError(f"{path} was readable")


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as mounts:
        return any(line.split()[4] == str(path) for line in mounts)


def objects_yaml(*objects: dict) -> str:
    """The upstream `objects` shape: a mapping with `array`, each item a YAML string."""
    return yaml.safe_dump({"array": [yaml.safe_dump(o, sort_keys=False) for o in objects]}, sort_keys=False)


def spc_manifest(parameters: dict[str, str]) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "secrets-store.csi.x-k8s.io/v1",
            "kind": "SecretProviderClass",
            "metadata": {"name": "test"},
            "spec": {"provider": "azure", "parameters": parameters},
        },
        sort_keys=False,
    )


def workload_parameters(emu: Emulator, *objects: dict, vault: str = "demo", **extra: str) -> dict[str, str]:
    params = {
        "clientID": emu.identity.default_app.client_id,
        "tenantId": emu.tenant_id,
        "keyvaultName": vault,
        "cloudName": "AzureStackCloud",
        "cloudEnvFileName": str(emu.cloud_env_file),
        "objects": objects_yaml(*objects),
    }
    params.update(extra)
    return params


@dataclass
class Mount:
    path: Path
    process: subprocess.Popen[bytes]
    log_file: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                subprocess.run(["umount", "-l", str(self.path)], check=False)
        return self.process.returncode


class Mounter:
    """Starts `kvfs mount` processes and guarantees they are gone after the test.

    Their output goes through checklogs when they stop: the test's own check when given one,
    else (module-scoped mounts) a check of their own that fails the fixture's teardown.
    """

    def __init__(self, emu: Emulator, tmp: Path, checklogs: LogCheck | None = None) -> None:
        self.emu = emu
        self.tmp = tmp
        self.mounts: list[Mount] = []
        self.checklogs = checklogs

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            SSL_CERT_FILE=str(self.emu.ca_file),
            AZURE_FEDERATED_TOKEN_FILE=str(self.emu.sa_token_file),
            KVFS_LOG_LEVEL="DEBUG",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def start(
        self,
        parameters: dict[str, str],
        *args: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> Mount:
        index = len(self.mounts)
        path = self.tmp / f"mnt{index}"
        path.mkdir()
        spc = self.tmp / f"spc{index}.yaml"
        spc.write_text(spc_manifest(parameters))
        log_file = self.tmp / f"mount{index}.log"
        env = env or self.env()
        with open(log_file, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "kvfs", "mount", "--spc", str(spc), str(path), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        mount = Mount(path, process, log_file, env)
        self.mounts.append(mount)
        if wait:
            deadline = time.monotonic() + 30
            while not is_mounted(path):
                if process.poll() is not None:
                    raise AssertionError(f"kvfs mount exited with {process.returncode}:\n{mount.log()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"kvfs mount did not mount in time:\n{mount.log()}")
                time.sleep(0.05)
        return mount

    def close(self) -> None:
        check = self.checklogs or LogCheck()
        for mount in self.mounts:
            mount.stop()
            assert not is_mounted(mount.path), f"{mount.path} still mounted"
            check.check_output(mount.log(), f"kvfs mount {mount.path.name}")
        if self.checklogs is None and check.verdict():
            pytest.fail(f"checklogs:\n{check.verdict()}", pytrace=False)


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[Emulator]:
    with EmulatorThread(tmp_path / "emulator") as emulator:
        yield emulator


@pytest.fixture
def mounter(emu: Emulator, tmp_path: Path, checklogs: LogCheck) -> Iterator[Mounter]:
    mounter = Mounter(emu, tmp_path, checklogs)
    try:
        yield mounter
    finally:
        mounter.close()


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll a condition of the outside world (a real mount); never used to assert timings."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def rotation_content(k: int) -> str:
    """Version k of a secret rotated fast; sizes differ, so a torn or clamped read shows as a wrong length."""
    return f"v{k:06d}:" + ("ab" if k % 2 else "abcdef") * (20 + k % 7)


def read_during_rapid_rotations(emu: Emulator, name: str, path: Path, readers: int) -> tuple[list[bytes], list[bytes]]:
    """Rotate secret `name` 119 times, 20 ms apart, while `readers` threads read `path` in a loop.

    Returns what was read: (whole versions, anything else). `name` must show `rotation_content(0)`.
    """
    valid = {rotation_content(k).encode() for k in range(200)}
    stop = threading.Event()
    seen: list[bytes] = []
    torn: list[bytes] = []

    def reader() -> None:
        while not stop.is_set():
            data = read(path)
            (seen if data in valid else torn).append(data)

    threads = [threading.Thread(target=reader) for _ in range(readers)]
    for thread in threads:
        thread.start()
    try:
        for k in range(1, 120):
            emu.set_secret("demo", name, rotation_content(k))
            threading.Event().wait(0.02)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return seen, torn
