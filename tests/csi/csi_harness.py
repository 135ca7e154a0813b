"""The kubelet side of CSI tests: gRPC stubs, publish/unpublish helpers, a plugin process.

Reusable by end-to-end tests: `csi_plugin` runs the plugin in-process (fast, injectable);
`csi_process` runs `python -m kvfs.csi.cli node` as a real process that can be killed and
restarted. Both default to the stand-in daemon; pass `daemon_entry="kvfs.daemon.entry:run_volume"`
(and emulator parameters) for the real one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from kvfs.csi.mounter import MounterClient
from kvfs.csi.mounters import MounterRegistry
from kvfs.csi.proto import load
from kvfs.csi.state import StateStore, process_alive
from kvfs.daemon.control import ControlClient

pb2, pb2_grpc = load()

STANDIN = "kvfs.daemon.standin:run"
TOKENS_KEY = "csi.storage.k8s.io/serviceAccount.tokens"
AUDIENCE = "api://AzureADTokenExchange"
FUSE_OK = os.path.exists("/dev/fuse") and os.geteuid() == 0


def tokens_json(token: str) -> str:
    return json.dumps({AUDIENCE: {"token": token, "expirationTimestamp": "2030-01-01T00:00:00Z"}})


def inline_params(**overrides: str) -> dict[str, str]:
    """A complete workload-identity volume given inline (no SecretProviderClass), as kubelet sends it."""
    params = {
        "keyvaultName": "kvfs-test",
        "tenantID": "72f988bf-86f1-41af-91ab-2d7cd011db47",
        "clientID": "00000000-0000-0000-0000-0000000000c1",
        "objects": "array:\n  - |\n    objectName: demo-secret\n    objectType: secret\n",
        "csi.storage.k8s.io/pod.name": "demo",
        "csi.storage.k8s.io/pod.namespace": "default",
        "csi.storage.k8s.io/pod.uid": "7c1d2f7e-0000-4000-8000-000000000001",
        "csi.storage.k8s.io/serviceAccount.name": "demo-sa",
        "csi.storage.k8s.io/ephemeral": "true",
    }
    params.update(overrides)
    return params


class Clock:
    """A clock the test moves (the event recorder's rate limit)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def short_tmpdir() -> str:
    """unix socket paths are limited to 107 bytes: keep state folders short."""
    return tempfile.mkdtemp(prefix="kvfscsi-", dir="/tmp")


class Kubelet:
    """gRPC stubs plus the calls kubelet makes."""

    def __init__(self, endpoint: str, state_dir: str) -> None:
        self.endpoint = endpoint
        self.state_dir = state_dir
        self.channel = grpc.insecure_channel(endpoint)
        self.node = pb2_grpc.NodeStub(self.channel)
        self.identity = pb2_grpc.IdentityStub(self.channel)
        self.published: dict[str, str] = {}  # target -> volume id

    def target(self, base: str | Path, name: str) -> str:
        """A kubelet-like target: the parent exists, the target itself does not."""
        path = Path(base, "pods", name, "volumes", "kubernetes.io~csi", "vol", "mount")
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(path)

    def publish(
        self,
        volume_id: str,
        target: str,
        params: dict[str, str] | None = None,
        secrets: dict[str, str] | None = None,
        token: str | None = "eyJhbGciOiJSUzI1NiJ9.test-sa-token.sig",
        *,
        readonly: bool = True,
        capability: Any = "mount",
        token_in_secrets: bool = False,
        volume_mount_group: str = "",
        timeout: float = 30.0,
    ) -> Any:
        context = dict(inline_params() if params is None else params)
        secrets = dict(secrets or {})
        if token is not None:
            (secrets if token_in_secrets else context)[TOKENS_KEY] = tokens_json(token)
        req = pb2.NodePublishVolumeRequest(
            volume_id=volume_id,
            target_path=target,
            readonly=readonly,
            volume_context=context,
            secrets=secrets,
        )
        if capability == "mount":
            req.volume_capability.CopyFrom(
                pb2.VolumeCapability(
                    mount=pb2.VolumeCapability.MountVolume(volume_mount_group=volume_mount_group),
                    access_mode=pb2.VolumeCapability.AccessMode(mode=pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
                )
            )
        elif capability == "block":
            req.volume_capability.CopyFrom(pb2.VolumeCapability(block=pb2.VolumeCapability.BlockVolume()))
        resp = self.node.NodePublishVolume(req, timeout=timeout)
        self.published[target] = volume_id
        return resp

    def unpublish(self, volume_id: str, target: str, timeout: float = 30.0) -> Any:
        resp = self.node.NodeUnpublishVolume(
            pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target), timeout=timeout
        )
        self.published.pop(target, None)
        return resp

    def probe(self) -> bool:
        return bool(self.identity.Probe(pb2.ProbeRequest(), timeout=10).ready.value)

    def control(self, target: str) -> ControlClient:
        """The client of a volume's daemon, on the socket the plugin uses."""
        return ControlClient(str(StateStore(self.state_dir).control_socket(target)))

    def state(self, target: str) -> Any:
        return StateStore(self.state_dir).load(target)

    def cleanup(self) -> None:
        for target, volume_id in list(self.published.items()):
            try:
                self.unpublish(volume_id, target, timeout=15)
            except grpc.RpcError:
                pass
        self.channel.close()


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll a real-world condition (a process, a socket) with a deadline; not a fixed sleep."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def newest_mounter(state_dir: str) -> MounterClient:
    """The client of the most recently started live mounter registered in the state folder."""
    registry = MounterRegistry(state_dir)
    live = registry.live()
    assert live, f"no live mounter registered in {state_dir}"
    return MounterClient(registry.socket_path(live[0].id))


def _stop_mounters(state_dir: str) -> None:
    for info in MounterRegistry(state_dir).live():
        os.kill(info.pid, signal.SIGTERM)


def _kill_leftover_daemons(state_dir: str) -> None:
    """Daemons a failed test left behind: unmount their targets and kill them (by recorded pid)."""
    from kvfs.csi import syscalls

    for state in StateStore(state_dir).all():
        try:
            syscalls.umount(state.target_path, detach=True)
        except OSError:
            pass
        if process_alive(state.pid, state.pid_start):
            os.kill(state.pid, signal.SIGKILL)


class PluginProcess:
    """`python -m kvfs.csi.cli node ...` as a real process; it starts its own mounter."""

    def __init__(
        self,
        daemon_entry: str = STANDIN,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        *,
        kubelet_dir: str,
        allow_inline_parameters: bool = False,
    ) -> None:
        self.env = env  # None: inherit this process's environment
        self.state_dir = short_tmpdir()
        self.endpoint = f"unix://{self.state_dir}/csi.sock"
        self.log_path = os.path.join(self.state_dir, "plugin.log")
        self.mounter_log = os.path.join(self.state_dir, "mounter.log")
        self.daemon_entry = daemon_entry
        self.extra_args = (
            "--kubelet-dir", kubelet_dir, *(("--allow-inline-parameters",) if allow_inline_parameters else ()), *extra_args
        )  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.kubelet: Kubelet | None = None

    def start(self) -> Kubelet:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvfs.csi.cli",
                "node",
                "--endpoint",
                self.endpoint,
                "--node-id",
                "node-1",
                "--state-dir",
                self.state_dir,
                "--daemon-entry",
                self.daemon_entry,
                "--mounter-log",
                self.mounter_log,
                "--publish-timeout",
                "10",
                *self.extra_args,
            ],
            stdout=log,
            stderr=log,
            env=self.env,
        )
        log.close()
        kubelet = Kubelet(self.endpoint, self.state_dir)
        grpc.channel_ready_future(kubelet.channel).result(timeout=20)
        if self.kubelet is not None:
            kubelet.published = self.kubelet.published
        self.kubelet = kubelet
        return kubelet

    def kill(self) -> None:
        """SIGKILL: the plugin gets no chance to clean up."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def mounter_pid(self) -> int:
        """The pid of the newest live mounter of its state folder, 0 when none."""
        live = MounterRegistry(self.state_dir).live()
        return live[0].pid if live else 0

    def close(self) -> None:
        if self.kubelet is not None and self.proc is not None and self.proc.poll() is None:
            self.kubelet.cleanup()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        _kill_leftover_daemons(self.state_dir)
        _stop_mounters(self.state_dir)
        shutil.rmtree(self.state_dir, ignore_errors=True)


