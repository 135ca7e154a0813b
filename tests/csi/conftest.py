"""Fixtures acting as kubelet against a kvfs CSI plugin on a unix socket.

Reusable by end-to-end tests: `csi_plugin` runs the plugin in-process (fast, injectable);
`csi_process` runs `python -m kvfs.csi.cli node` as a real process that can be killed and
restarted. Both default to the stand-in daemon; pass `daemon_entry="kvfs.daemon.entry:run_volume"`
(and emulator parameters) for the real one. Helpers live in csi_harness.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # csi_harness, fakekube

from fakekube import FakeKube

from csi_harness import (
    Clock,
    FUSE_OK,
    STANDIN,
    Kubelet,
    PluginProcess,
    _kill_leftover_daemons,
    short_tmpdir,
    wait_for,
)
from kvfs.csi.events import EventRecorder
from kvfs.csi.kube import KubeClient
from kvfs.csi.mounter import MounterClient


@pytest.fixture(scope="session")
def csi_mounter() -> Iterator[str]:
    """One stand-in mounter for in-process plugins of the whole session; its socket path."""
    if not FUSE_OK:
        pytest.skip("needs root and /dev/fuse")
    folder = short_tmpdir()
    sock = os.path.join(folder, "mounter.sock")
    log = open(os.path.join(folder, "mounter.log"), "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvfs.csi.cli", "mounter", "--socket", sock, "--daemon-entry", STANDIN],
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    wait_for(lambda: MounterClient(sock).ping(timeout=0.5), 20, "the mounter")
    yield sock
    proc.terminate()
    proc.wait(10)
    log.close()
    shutil.rmtree(folder, ignore_errors=True)


# Tests that give parameters inline (stand-in files, quick identities) say so with this mark (on a
# module or a test); the plugin's default, SecretProviderClass-only volumes, is what
# tests/csi/test_tenant_attacks.py covers.
INLINE = pytest.mark.csi_plugin(allow_inline_parameters=True)


@pytest.fixture
def csi_plugin(csi_mounter: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """An in-process plugin (kvfs.csi.node.serve) using the session's stand-in mounter, kubelet's
    folder at `tmp_path` (publish to `kubelet.target(tmp_path, name)`).

    NodeConfig overrides come from a `csi_plugin(**overrides)` mark (see INLINE) or an indirect
    parameter and apply to every `make` too; build more plugins with `make(**overrides)`.
    """
    from kvfs.csi.node import serve
    from kvfs.csi.volumes import NodeConfig, Volumes

    made: list[tuple[Any, Kubelet, str]] = []
    marker = request.node.get_closest_marker("csi_plugin")
    base = {**(marker.kwargs if marker else {}), **getattr(request, "param", {})}

    def make(**overrides: Any) -> Kubelet:
        state_dir = short_tmpdir()
        kw: dict[str, Any] = dict(
            node_id="node-1",
            state_dir=state_dir,
            mounter_socket=csi_mounter,
            start_mounter=False,
            daemon_entry=STANDIN,
            publish_timeout=5.0,
            kubelet_dir=str(tmp_path),
        )
        kw.update(base)
        factories = {k: overrides.pop(k) for k in ("kube_factory",) if k in overrides}
        kw.update(overrides)
        volumes = Volumes(NodeConfig(**kw), **factories)
        endpoint = f"unix://{state_dir}/csi.sock"
        server = serve(volumes, endpoint, workers=8)
        kubelet = Kubelet(endpoint, state_dir)
        kubelet.volumes = volumes  # type: ignore[attr-defined]
        made.append((server, kubelet, state_dir))
        return kubelet

    kubelet = make()
    kubelet.make = make  # type: ignore[attr-defined]
    yield kubelet
    for server, k, state_dir in made:
        k.cleanup()
        server.stop(grace=1).wait()
        _kill_leftover_daemons(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture
def csi_process(tmp_path: Path) -> Iterator[Callable[..., PluginProcess]]:
    """Factory: `csi_process(daemon_entry=..., extra_args=(...), allow_inline_parameters=...)` → a
    started PluginProcess with kubelet's folder at `tmp_path`."""
    if not FUSE_OK:
        pytest.skip("needs root and /dev/fuse")
    started: list[PluginProcess] = []

    def start(**kw: Any) -> PluginProcess:
        kw.setdefault("kubelet_dir", str(tmp_path))
        plugin = PluginProcess(**kw)
        started.append(plugin)
        plugin.start()
        return plugin

    yield start
    for plugin in started:
        plugin.close()


@pytest.fixture
def fake_kube(tmp_path: Path) -> Iterator[FakeKube]:
    """A fake Kubernetes API server (fakekube.py), empty."""
    kube = FakeKube(tmp_path / "kube")
    yield kube
    kube.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def recorder(fake_kube: FakeKube, clock: Clock, tmp_path: Path) -> Iterator[EventRecorder]:
    """An EventRecorder posting to `fake_kube` as node `node-a`, on `clock`."""
    config = str(fake_kube.kubeconfig(tmp_path / "kubeconfig"))
    events = EventRecorder(lambda: KubeClient.from_kubeconfig(config), "node-a", clock=clock)
    yield events
    events.close()
