"""Real mounts (root + /dev/fuse) with the stand-in daemon: the publish/unpublish lifecycle,
fd ownership, republish, plugin restarts and daemon crashes."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import grpc
import pytest

from conftest import INLINE
from csi_harness import Kubelet, PluginProcess, inline_params, wait_for
from kvfs.csi.mountinfo import Health, is_kvfs_mount, probe_mount
from kvfs.csi.state import process_alive
from kvfs.csi.volumes import DEFAULT_DAEMON_UID_RANGE

pytestmark = [pytest.mark.mount, INLINE]


def _fuse_holders() -> dict[int, int]:
    """pid -> number of open /dev/fuse fds, for every process."""
    holders: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        n = 0
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                    n += 1
            except OSError:
                pass
        if n:
            holders[int(pid)] = n
    return holders


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def test_publish_serves_files_at_once_and_unpublish_removes_everything(csi_plugin: Kubelet, tmp_path: Path) -> None:
    target = csi_plugin.target(tmp_path, "p")
    csi_plugin.publish("vol-a", target, inline_params(**{"standin.file.demo-secret": "s3cret-bytes"}))
    # ready means FUSE_INIT is done: the first access answers (it would hang before INIT)
    assert Path(target, "demo-secret").read_text() == "s3cret-bytes"
    assert is_kvfs_mount(target)
    state = csi_plugin.state(target)
    assert state.phase == "ready" and state.pid > 0
    assert (state.pod, state.pod_uid) == ("default/demo", "7c1d2f7e-0000-4000-8000-000000000001")  # whose volume
    pid = state.pid
    assert "vol-a" in _cmdline(pid)
    assert _uid(pid) == state.uid == DEFAULT_DAEMON_UID_RANGE[0]  # the lowest free uid of the range
    assert os.stat(target).st_mode & 0o777 == 0o755
    csi_plugin.unpublish("vol-a", target)
    assert not is_kvfs_mount(target)
    assert not os.path.exists(target)
    wait_for(lambda: not process_alive(pid, state.pid_start), 5, "daemon exit")
    assert csi_plugin.state(target) is None
    assert os.listdir(Path(csi_plugin.state_dir, "volumes")) == []


def test_only_the_daemon_holds_the_fuse_fd(csi_process: Callable[..., PluginProcess], tmp_path: Path) -> None:
    plugin = csi_process(allow_inline_parameters=True)
    kubelet = plugin.kubelet
    assert kubelet is not None
    targets = [kubelet.target(tmp_path, f"p{i}") for i in range(2)]
    for i, target in enumerate(targets):
        kubelet.publish(f"vol-{i}", target)
    daemons = {kubelet.state(t).pid for t in targets}
    holders = _fuse_holders()
    assert plugin.proc is not None
    assert plugin.proc.pid not in holders
    assert plugin.mounter_pid() not in holders
    for pid in daemons:
        assert holders.get(pid) == 1


def test_republish_passes_the_fresh_token_quickly(csi_plugin: Kubelet, tmp_path: Path) -> None:
    target = csi_plugin.target(tmp_path, "p")
    csi_plugin.publish("vol-a", target, token="first-token")
    first = csi_plugin.control(target).status()
    assert first["token_sha256"] == hashlib.sha256(b"first-token").hexdigest()[:12]
    pid = csi_plugin.state(target).pid
    csi_plugin.publish("vol-a", target, token="second-token", token_in_secrets=True)
    second = csi_plugin.control(target).status()
    assert second["token_sha256"] == hashlib.sha256(b"second-token").hexdigest()[:12]
    assert second["token_updates"] == 1
    assert csi_plugin.state(target).pid == pid  # same daemon, same mount


def test_ready_timeout_kills_the_daemon_and_unmounts(csi_plugin: Kubelet, tmp_path: Path) -> None:
    kubelet = csi_plugin.make(publish_timeout=0.5)  # type: ignore[attr-defined]
    target = kubelet.target(tmp_path, "p")
    with pytest.raises(grpc.RpcError) as info:
        kubelet.publish("vol-a", target, inline_params(**{"standin.hang": "true"}))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not report ready in time" in info.value.details()
    assert not is_kvfs_mount(target)
    assert kubelet.state(target) is None


def test_daemon_start_error_is_reported_and_cleaned_up(csi_plugin: Kubelet, tmp_path: Path) -> None:
    target = csi_plugin.target(tmp_path, "p")
    with pytest.raises(grpc.RpcError) as info:
        csi_plugin.publish("vol-a", target, inline_params(**{"standin.fail": "vault exploded (test)"}))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "vault exploded (test)" in info.value.details()
    assert not is_kvfs_mount(target)
    assert csi_plugin.state(target) is None
    csi_plugin.publish("vol-a", target)  # kubelet's retry starts clean
    assert Path(target, "hello").exists()


def test_killed_plugin_restarts_and_keeps_volumes(csi_process: Callable[..., PluginProcess], tmp_path: Path) -> None:
    plugin = csi_process(allow_inline_parameters=True)
    kubelet = plugin.kubelet
    assert kubelet is not None
    targets = [kubelet.target(tmp_path, f"p{i}") for i in range(2)]
    for i, target in enumerate(targets):
        kubelet.publish(f"vol-{i}", target, token="t0")
    daemons = [(kubelet.state(t).pid, kubelet.state(t).pid_start) for t in targets]
    pids = [pid for pid, _ in daemons]
    mounter = plugin.mounter_pid()
    plugin.kill()
    for target in targets:  # still served while no plugin runs
        assert Path(target, "hello").read_text().startswith("hello from vol-")
    uids = [kubelet.state(t).uid for t in targets]
    kubelet = plugin.start()
    assert plugin.mounter_pid() == mounter  # the old mounter was found, not replaced
    third = kubelet.target(tmp_path, "p2")
    kubelet.publish("vol-2", third)  # the state folder still holds the living volumes' uids
    assert kubelet.state(third).uid not in uids and _uid(kubelet.state(third).pid) == kubelet.state(third).uid
    kubelet.unpublish("vol-2", third)
    kubelet.publish("vol-0", targets[0], token="after-restart")  # republish by the new plugin
    status = kubelet.control(targets[0]).status()
    assert status["token_sha256"] == hashlib.sha256(b"after-restart").hexdigest()[:12]
    assert kubelet.state(targets[0]).pid == pids[0]
    for i, target in enumerate(targets):
        kubelet.unpublish(f"vol-{i}", target)
        assert not is_kvfs_mount(target) and not os.path.exists(target)
    for pid, start in daemons:
        wait_for(lambda pid=pid, start=start: not process_alive(pid, start), 5, "daemon exit")


def test_one_dead_daemon_hurts_only_its_volume(csi_process: Callable[..., PluginProcess], tmp_path: Path) -> None:
    plugin = csi_process(allow_inline_parameters=True)
    kubelet = plugin.kubelet
    assert kubelet is not None
    dead, alive = kubelet.target(tmp_path, "dead"), kubelet.target(tmp_path, "alive")
    kubelet.publish("vol-dead", dead)
    kubelet.publish("vol-alive", alive)
    os.kill(kubelet.state(dead).pid, signal.SIGKILL)
    with pytest.raises(OSError) as info:
        wait_for(lambda: os.listdir(dead) and False, 5, "ENOTCONN")  # raises once the connection is gone
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    assert probe_mount(dead).health is Health.DEAD
    status = subprocess.run(
        [sys.executable, "-m", "kvfs", "status", "--state-dir", kubelet.state_dir, dead],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 1 and "Traceback" not in status.stderr, status.stderr
    assert f"kvfs status: {dead}: a dead mount: the process that served it is gone" in status.stderr
    assert "recreate its pod" in status.stderr and "fusermount3" not in status.stderr
    assert Path(alive, "hello").read_text() == "hello from vol-alive\n"
    assert kubelet.probe() is True
    log = wait_for(lambda: "vol-dead" in plugin.log() and plugin.log(), 5, "the report")
    dead_lines = [line for line in log.splitlines() if " is dead" in line]
    assert dead_lines and all("vol-dead" in line for line in dead_lines)
    # republish of the broken volume: reported, not unmounted, and kubelet gets OK
    kubelet.publish("vol-dead", dead, token="fresh")
    assert is_kvfs_mount(dead)
    kubelet.unpublish("vol-dead", dead)  # detached unmount of a dead mount
    assert not is_kvfs_mount(dead) and not os.path.exists(dead)


def test_many_volumes_publish_concurrently(csi_plugin: Kubelet, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    targets = [csi_plugin.target(tmp_path, f"p{i}") for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda it: csi_plugin.publish(f"vol-{it[0]}", it[1]), enumerate(targets)))
    for i, target in enumerate(targets):
        assert Path(target, "hello").read_text() == f"hello from vol-{i}\n"
    pids = {csi_plugin.state(t).pid for t in targets}
    assert len(pids) == 6
    health: dict[str, Any] = csi_plugin.volumes.check_health()  # type: ignore[attr-defined]
    assert {p.health for p in health.values()} == {Health.HEALTHY}
    for i, target in enumerate(targets):
        csi_plugin.unpublish(f"vol-{i}", target)
    assert csi_plugin.volumes._locks == {}  # type: ignore[attr-defined]  # no entry outlives its use


def test_each_volume_gets_the_lowest_free_uid_of_the_range(csi_plugin: Kubelet, tmp_path: Path) -> None:
    kubelet = csi_plugin.make(daemon_uid_range=(5000, 5001))  # type: ignore[attr-defined]
    a, b, c = (kubelet.target(tmp_path, name) for name in "abc")
    kubelet.publish("vol-a", a)
    kubelet.publish("vol-b", b)
    assert (kubelet.state(a).uid, kubelet.state(b).uid) == (5000, 5001)
    assert (kubelet.state(a).gid, kubelet.state(b).gid) == (5000, 5001)
    assert _uid(kubelet.state(b).pid) == 5001
    with pytest.raises(grpc.RpcError) as info:
        kubelet.publish("vol-c", c)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--daemon-uid-range" in info.value.details()
    assert not is_kvfs_mount(c) and kubelet.state(c) is None and not os.path.exists(c)
    kubelet.unpublish("vol-a", a)
    kubelet.publish("vol-c", c)  # a's uid is free again once its volume is gone
    assert kubelet.state(c).uid == 5000
    assert Path(c, "hello").read_text() == "hello from vol-c\n"


def test_sigterm_stops_the_plugin_but_not_the_volumes(csi_process: Callable[..., PluginProcess], tmp_path: Path) -> None:
    plugin = csi_process(allow_inline_parameters=True)
    kubelet = plugin.kubelet
    assert kubelet is not None and plugin.proc is not None
    target = kubelet.target(tmp_path, "p")
    kubelet.publish("vol-a", target)
    plugin.proc.terminate()
    assert plugin.proc.wait(10) == 0
    assert Path(target, "hello").read_text() == "hello from vol-a\n"
    plugin.start().unpublish("vol-a", target)
    assert not is_kvfs_mount(target)


def test_a_reused_mounter_gives_daemons_the_current_plugins_environment(
    csi_process: Callable[..., PluginProcess], tmp_path: Path
) -> None:
    """The mounter outlives plugins; a restarted plugin's settings (CA file, IMDS/NMI URL,
    proxies) must reach new daemons, not the settings the mounter was started with."""
    env = dict(os.environ, KVFS_NMI_URL="http://first.invalid")
    plugin = csi_process(env=env, allow_inline_parameters=True)
    assert plugin.kubelet is not None and plugin.proc is not None
    shown = {"standin.show_env": "KVFS_NMI_URL"}
    first = plugin.kubelet.target(tmp_path, "first")
    plugin.kubelet.publish("vol-first", first, {**inline_params(), **shown})
    assert Path(first, "env").read_text() == "http://first.invalid"
    plugin.proc.terminate()
    assert plugin.proc.wait(10) == 0
    plugin.env = dict(os.environ, KVFS_NMI_URL="http://second.invalid")
    kubelet = plugin.start()
    second = kubelet.target(tmp_path, "second")
    kubelet.publish("vol-second", second, {**inline_params(), **shown})
    assert Path(second, "env").read_text() == "http://second.invalid"
    assert Path(first, "env").read_text() == "http://first.invalid"
    for volume_id, target in (("vol-first", first), ("vol-second", second)):
        kubelet.unpublish(volume_id, target)
