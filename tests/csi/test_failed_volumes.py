"""Issue 10: dead and hung volumes are visible (recorded, logged once naming the pod, a VolumeFailed
event) and, with --restart-pods-with-failed-volumes, healed by deleting the pod so that its controller
makes a fresh one: never a pod without a controller, never the same pod twice within 5 minutes.

An in-process plugin with stand-in daemons (killed to make a volume dead, stopped to make it hung)
against the fake Kubernetes API; the pod deletion limit runs on a fake wall clock.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import INLINE
from csi_harness import Kubelet, inline_params, wait_for
from fakekube import FakeKube
from kvfs.config.parameters import POD_NAME_KEY, POD_NAMESPACE_KEY, POD_UID_KEY
from kvfs.csi.health import FAILURE_FILE, RESTART_INTERVAL
from kvfs.csi.kube import KubeClient
from kvfs.csi.state import VolumeState, process_alive
from kvfs.csi.status import collect, render
from kvfs.csi.volumes import Volumes

pytestmark = INLINE

NS = "shop"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _failed_volumes_are_logged(expect_logs: Callable[..., None], caplog: pytest.LogCaptureFixture) -> None:
    expect_logs(r"is (dead: its daemon \(pid \d+\) exited|hung: statfs did not answer within 1s)", level=logging.ERROR)
    caplog.set_level(logging.INFO, logger="kvfs.csi")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def plugin(csi_plugin: Any, fake_kube: FakeKube, tmp_path: Path, clock: Clock) -> Callable[..., Kubelet]:
    """`plugin(restart=...)`: a plugin reading the fake API, deleting pods only with `restart`, on the
    fake wall clock."""
    config = str(fake_kube.kubeconfig(tmp_path / "kubeconfig"))

    def make(*, restart: bool) -> Kubelet:
        kubelet: Kubelet = csi_plugin.make(
            kube_factory=lambda: KubeClient.from_kubeconfig(config), restart_failed_pods=restart
        )
        volumes(kubelet).failures.clock = clock
        return kubelet

    return make


def volumes(kubelet: Kubelet) -> Volumes:
    return kubelet.volumes  # type: ignore[attr-defined, no-any-return]


def dead_volume(kubelet: Kubelet, fake: FakeKube, tmp_path: Path, name: str, **pod: Any) -> str:
    """A pod in the fake API (`pod`: add_pod's options), its volume published, its daemon killed; the target."""
    uid = fake.add_pod(NS, name, **pod)["metadata"]["uid"]
    target = kubelet.target(tmp_path, f"{name}-{uid[:8]}")
    params = inline_params(**{POD_NAMESPACE_KEY: NS, POD_NAME_KEY: name, POD_UID_KEY: uid})
    kubelet.publish(f"vol-{name}-{uid[:8]}", target, params)
    daemon = kubelet.state(target)
    os.kill(daemon.pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(daemon.pid, daemon.pid_start), 10, "the daemon to die")
    return target


def stopped_volume(kubelet: Kubelet, fake: FakeKube, tmp_path: Path, name: str) -> tuple[str, VolumeState]:
    """A pod in the fake API, its volume published, its daemon stopped (SIGSTOP: the caller sends
    SIGCONT or SIGKILL); the target and the volume's state."""
    uid = fake.add_pod(NS, name)["metadata"]["uid"]
    target = kubelet.target(tmp_path, name)
    kubelet.publish(f"vol-{name}", target, inline_params(**{POD_NAMESPACE_KEY: NS, POD_NAME_KEY: name, POD_UID_KEY: uid}))
    daemon = kubelet.state(target)
    os.kill(daemon.pid, signal.SIGSTOP)
    return target, daemon


def sweep(kubelet: Kubelet) -> list[str]:
    """What the plugin's sweep loop does: probe every volume, then heal; the pods deleted."""
    volumes(kubelet).check_health()
    return volumes(kubelet).restart_failed_pods()


def events(fake: FakeKube, kubelet: Kubelet, name: str) -> list[str]:
    assert volumes(kubelet).recorder.flush(30)
    return [e["reason"] + ": " + e["message"] for e in fake.events_for(NS, name)]


def failure_logs(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"of pod {NS}/{name} " in r.getMessage()]


def test_a_dead_volumes_pod_owned_by_a_replicaset_is_deleted_once(
    plugin: Callable[..., Kubelet], fake_kube: FakeKube, tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    kubelet = plugin(restart=True)
    dead_volume(kubelet, fake_kube, tmp_path, "web-7d9f-abcde")
    assert sweep(kubelet) == [f"{NS}/web-7d9f-abcde"]
    assert fake_kube.get("pods", NS, "web-7d9f-abcde") is None
    [event] = events(fake_kube, kubelet, "web-7d9f-abcde")
    assert event.startswith("VolumeFailed: kvfs volume vol-web-7d9f-abcde") and "exited" in event
    assert "kvfs deletes this pod" in event
    [logged] = failure_logs(caplog, "web-7d9f-abcde")
    assert "is dead: its daemon (pid" in logged
    # until kubelet unpublishes the volume, later sweeps find it failed still: nothing more happens
    for _ in range(3):
        clock.now += RESTART_INTERVAL
        assert sweep(kubelet) == []
    assert len(failure_logs(caplog, "web-7d9f-abcde")) == 1 and len(events(fake_kube, kubelet, "web-7d9f-abcde")) == 1
    [delete] = [r for r in fake_kube.requests if r.method == "DELETE"]
    assert delete.path.endswith(f"/namespaces/{NS}/pods/web-7d9f-abcde")


def test_without_the_flag_a_dead_volume_is_only_reported(
    plugin: Callable[..., Kubelet], fake_kube: FakeKube, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kubelet = plugin(restart=False)
    target = dead_volume(kubelet, fake_kube, tmp_path, "web-1")
    for _ in range(3):
        assert sweep(kubelet) == []
    assert fake_kube.get("pods", NS, "web-1") is not None
    assert not [r for r in fake_kube.requests if r.method == "DELETE"]
    [event] = events(fake_kube, kubelet, "web-1")
    assert "--restart-pods-with-failed-volumes" in event
    [logged] = failure_logs(caplog, "web-1")
    assert "recreate the pod, or run the plugin with --restart-pods-with-failed-volumes" in logged
    # recorded beside the volume's state, for `kvfs csi status`
    assert (volumes(kubelet).store.volume_dir(target) / FAILURE_FILE).exists()
    [row] = [v for v in collect(kubelet.state_dir)["volumes"] if v["target"] == target]
    assert (row["health"], row["pod"]["name"]) == ("dead", "web-1") and row["failed_since"]


def test_a_pod_without_a_controller_is_never_deleted(
    plugin: Callable[..., Kubelet], fake_kube: FakeKube, tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    kubelet = plugin(restart=True)
    dead_volume(kubelet, fake_kube, tmp_path, "bare", controller=None)
    for _ in range(3):
        assert sweep(kubelet) == []
        clock.now += RESTART_INTERVAL
    assert fake_kube.get("pods", NS, "bare") is not None
    assert not [r for r in fake_kube.requests if r.method == "DELETE"]
    refusals = [r.getMessage() for r in caplog.records if "no controller" in r.getMessage()]
    assert len(refusals) == 1 and f"{NS}/bare" in refusals[0]
    assert len(events(fake_kube, kubelet, "bare")) == 1  # still reported


def test_a_second_failure_within_five_minutes_does_not_delete_again_even_after_a_plugin_restart(
    plugin: Callable[..., Kubelet], fake_kube: FakeKube, tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A StatefulSet's pod keeps its name: its next pod's volume dies too, within 5 minutes."""
    kubelet = plugin(restart=True)
    first = dead_volume(kubelet, fake_kube, tmp_path, "db-0", controller="StatefulSet")
    assert sweep(kubelet) == [f"{NS}/db-0"]
    kubelet.unpublish(kubelet.state(first).volume_id, first)
    second = dead_volume(kubelet, fake_kube, tmp_path, "db-0", controller="StatefulSet")
    clock.now += 60
    assert sweep(kubelet) == [] and fake_kube.get("pods", NS, "db-0") is not None
    # a restarted plugin remembers both the deletion and the failure it reported
    caplog.clear()
    restarted = Volumes(volumes(kubelet).config, kube_factory=volumes(kubelet).kube)
    restarted.failures.clock = clock
    restarted.check_health()
    assert restarted.restart_failed_pods() == [] and fake_kube.get("pods", NS, "db-0") is not None
    assert failure_logs(caplog, "db-0") == []
    clock.now += RESTART_INTERVAL
    assert restarted.restart_failed_pods() == [f"{NS}/db-0"]
    assert fake_kube.get("pods", NS, "db-0") is None
    assert kubelet.state(second) is not None  # kubelet unpublishes it once the pod is gone


def test_a_pod_replaced_under_its_name_is_not_deleted(
    plugin: Callable[..., Kubelet], fake_kube: FakeKube, tmp_path: Path
) -> None:
    kubelet = plugin(restart=True)
    dead_volume(kubelet, fake_kube, tmp_path, "db-1", controller="StatefulSet")
    fake_kube.delete_pod(NS, "db-1")
    replacement = fake_kube.add_pod(NS, "db-1", controller="StatefulSet")
    assert sweep(kubelet) == []
    assert fake_kube.get("pods", NS, "db-1") == replacement


def test_a_stopped_daemons_volume_is_reported_hung_its_reads_wait_and_it_recovers(
    plugin: Callable[..., Kubelet], fake_kube: FakeKube, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGSTOP on the daemon (a stuck process): statfs gets no answer, so the sweep reports the
    volume hung, not dead. A read waits for the daemon instead of failing, and gets its bytes once
    the daemon runs again; the next sweep finds the volume healthy."""
    kubelet = plugin(restart=False)
    uid = fake_kube.add_pod(NS, "stuck")["metadata"]["uid"]
    target = kubelet.target(tmp_path, "stuck")
    params = inline_params(**{POD_NAMESPACE_KEY: NS, POD_NAME_KEY: "stuck", POD_UID_KEY: uid, "standin.file.a": "A"})
    kubelet.publish("vol-stuck", target, params)
    daemon = kubelet.state(target)
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        # a file never looked up: its read must reach the daemon (a process of its own: it may hang)
        reader = subprocess.Popen(["cat", os.path.join(target, "a")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert sweep(kubelet) == []
        assert reader.poll() is None  # waiting, not failed
        [row] = [v for v in collect(kubelet.state_dir)["volumes"] if v["target"] == target]
        assert (row["health"], row["detail"]) == ("hung", "statfs did not answer within 1s") and row["failed_since"]
        assert "hung: statfs did not answer within 1s (since " in render(collect(kubelet.state_dir))
        [logged] = failure_logs(caplog, "stuck")
        assert " is hung: " in logged and "reads of its files wait" in logged and "fail until" not in logged
        [event] = events(fake_kube, kubelet, "stuck")
        assert event.startswith("VolumeFailed: kvfs volume vol-stuck") and "Reads of its files wait" in event
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    out, err = reader.communicate(timeout=30)
    assert (reader.returncode, out, err) == (0, b"A", b"")  # the read waited, then got its bytes
    volumes(kubelet).check_health()
    assert volumes(kubelet).health[target].health.value == "healthy"
    assert not (volumes(kubelet).store.volume_dir(target) / FAILURE_FILE).exists()
    assert any(f"volume vol-stuck at {target} is healthy again" in r.getMessage() for r in caplog.records)


def test_a_hung_volumes_pod_is_deleted_only_once_its_mount_stayed_silent_for_a_health_interval(
    plugin: Callable[..., Kubelet], fake_kube: FakeKube, tmp_path: Path
) -> None:
    """One unanswered statfs may be a busy node, and two checks may come seconds apart (kubelet's
    liveness probe, then the sweep): the pod stays. A statfs unanswered for a whole health interval
    means the mount is stuck: the pod is deleted so its controller makes a fresh one."""
    kubelet = plugin(restart=True)
    target, daemon = stopped_volume(kubelet, fake_kube, tmp_path, "frozen")
    try:
        assert sweep(kubelet) == []  # its own statfs timed out: maybe only slow
        assert volumes(kubelet).health[target].health.value == "hung"
        assert sweep(kubelet) == []  # the first statfs is still stuck, but for seconds, not 60 s
        assert fake_kube.get("pods", NS, "frozen") is not None
        # the first statfs started before that first sweep's 1 s wait: stuck for at least 1 s now
        assert volumes(kubelet).restart_failed_pods(hung_for=1.0) == [f"{NS}/frozen"]
        assert fake_kube.get("pods", NS, "frozen") is None
    finally:
        os.kill(daemon.pid, signal.SIGCONT)


def test_a_hung_volume_whose_daemon_then_dies_is_told_again(
    plugin: Callable[..., Kubelet], fake_kube: FakeKube, tmp_path: Path
) -> None:
    """Hung, then dead: the second finding changes what the pod's reads do (wait → fail), so it gets
    its own event within the events' rate-limit interval."""
    kubelet = plugin(restart=False)
    target, daemon = stopped_volume(kubelet, fake_kube, tmp_path, "worse")
    try:
        sweep(kubelet)
    finally:
        os.kill(daemon.pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(daemon.pid, daemon.pid_start), 10, "the daemon to die")
    sweep(kubelet)
    assert volumes(kubelet).health[target].health.value == "dead"
    hung, dead = events(fake_kube, kubelet, "worse")
    assert " is hung: " in hung and "Reads of its files wait" in hung
    assert " is dead: " in dead and "Reads of its files fail" in dead
