"""Issue 10: mounter generations and a mounter that does not fall over, end to end.

The real plugin (`kvfs csi node --no-start-mounter`), mounters started beside it as
`kvfs csi mounter --state-dir DIR`, as the mounter DaemonSets of two versions run them, real
daemons reading the emulator over HTTPS, SecretProviderClasses served by the fake Kubernetes API.
`kvfs csi status --json` is run as a command and its answer checked at each step.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_harness import FUSE_OK, PluginProcess, wait_for
from kvfs.csi.mounter import MounterClient
from kvfs.csi.mounters import MounterRegistry
from kvfs.csi.state import process_alive
from test_real_daemon import REAL_DAEMON, Pod, World, assert_gone, publish, read_secret
from test_real_daemon import world as world  # the module's own emulator and fake Kubernetes API

pytestmark = [pytest.mark.mount, pytest.mark.skipif(not FUSE_OK, reason="needs root and /dev/fuse")]

_indices = itertools.count(300)  # pods of this module: their own namespaces, apps and vaults


@dataclass
class Node:
    """One node: a plugin that starts no mounter, and the mounters started beside it."""

    world: World
    plugin: PluginProcess
    mounters: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)  # id -> process

    @property
    def state_dir(self) -> str:
        return self.plugin.state_dir

    def start_mounter(self) -> str:
        """`kvfs csi mounter --state-dir DIR` in a session of its own, as a mounter pod runs it; its id
        once it is registered and answers."""
        log = open(os.path.join(self.state_dir, "mounters.log"), "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvfs.csi.cli", "mounter", "--state-dir", self.state_dir, "--daemon-entry", REAL_DAEMON],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        registry = MounterRegistry(self.state_dir)

        def registered() -> str:
            ids = [m.id for m in registry.live() if m.pid == proc.pid]
            return ids[0] if ids and MounterClient(registry.socket_path(ids[0])).ping(1.0) else ""

        mounter_id = str(wait_for(registered, 60, "the mounter to register"))
        self.mounters[mounter_id] = proc
        return mounter_id

    def new_pods(self, count: int) -> list[Pod]:
        assert self.plugin.kubelet is not None
        pods = [self.world.new_pod(next(_indices), managed=i % 2 == 1, spc=True) for i in range(count)]
        for pod in pods:
            pod.target = self.plugin.kubelet.target(self.world.base / "kubelet", pod.name)
        return pods

    def publish(self, pods: list[Pod]) -> None:
        assert self.plugin.kubelet is not None
        for pod in pods:
            publish(self.plugin.kubelet, self.world, pod)

    def status(self, *options: str) -> Any:
        """`kvfs csi status`, run as an admin runs it in the plugin container: parsed with --json."""
        out = subprocess.run(
            [sys.executable, "-m", "kvfs.csi.cli", "status", "--state-dir", self.state_dir, *options],
            capture_output=True,
            check=True,
            timeout=60,
            text=True,
        )
        return json.loads(out.stdout) if "--json" in options else out.stdout

    def close(self) -> None:
        self.plugin.close()
        for proc in self.mounters.values():
            if proc.poll() is None:
                proc.terminate()
            proc.wait(10)


@pytest.fixture
def node(world: World, request: pytest.FixtureRequest) -> Iterator[Node]:
    """The plugin's flags: these, then an indirect parameter's."""
    plugin = PluginProcess(
        daemon_entry=REAL_DAEMON,
        extra_args=(
            "--no-start-mounter",
            "--kubeconfig", str(world.kube.kubeconfig(world.base / "kubeconfig")),
            "--cloud-env-dir", str(world.emu.cloud_env_file.parent),
            "--health-interval", "0",
            *getattr(request, "param", ()),
        ),
        kubelet_dir=str(world.base / "kubelet"),
    )  # fmt: skip
    plugin.start()
    node = Node(world, plugin)
    try:
        yield node
    finally:
        node.close()


def volumes_by_target(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["target"]: v for v in status["volumes"]}


def mounter_rows(status: dict[str, Any]) -> list[tuple[str, bool, int]]:
    """(id, alive, volumes) of each mounter, as listed: the newest first."""
    return [(m["id"], m["alive"] and m["answering"], m["volumes"]) for m in status["mounters"]]


def assert_listed(status: dict[str, Any], pods: list[Pod], mounter: str, health: str) -> None:
    rows = volumes_by_target(status)
    for pod in pods:
        row = rows[pod.target]
        assert row["pod"]["namespace"] == pod.namespace and row["pod"]["name"] == pod.name
        assert (row["volume_id"], row["mounter"], row["health"]) == (pod.volume_id, mounter, health), row


def test_two_mounter_generations_serve_side_by_side_and_one_dies_alone(node: Node) -> None:
    """Five volumes on the old generation; a plugin restart; a new mounter starts beside the old
    one and the next five all land on it; both generations republish and unpublish; then the old
    mounter pod dies with its daemons, and only its volumes break. `kvfs csi status` tells it all."""
    kubelet = node.plugin.kubelet
    assert kubelet is not None and node.status("--json")["mounters"] == []
    old = node.start_mounter()
    old_pods = node.new_pods(5)
    node.publish(old_pods)
    assert {kubelet.state(p.target).mounter for p in old_pods} == {old}

    node.plugin.kill()  # the plugin DaemonSet rolls while the new version's mounter starts
    new = node.start_mounter()
    kubelet = node.plugin.start()
    new_pods = node.new_pods(5)
    node.publish(new_pods)
    assert {kubelet.state(p.target).mounter for p in new_pods} == {new}
    for pod in old_pods + new_pods:
        assert read_secret(pod) == pod.value
    status = node.status("--json")
    assert mounter_rows(status) == [(new, True, 5), (old, True, 5)]
    assert_listed(status, old_pods, old, "healthy")
    assert_listed(status, new_pods, new, "healthy")
    assert {v["daemon_pid"] for v in status["volumes"]} == {kubelet.state(p.target).pid for p in old_pods + new_pods}

    # the restarted plugin republishes (a fresh token reaches the same daemon) and unpublishes both
    emu = node.world.emu
    for pod in (old_pods[0], new_pods[0]):
        before = kubelet.state(pod.target)
        publish(kubelet, node.world, pod, token=emu.identity.mint_sa_token(pod.namespace, pod.service_account))
        assert kubelet.state(pod.target) == before and read_secret(pod) == pod.value
    for pods in (old_pods, new_pods):
        pod = pods.pop()
        daemon = kubelet.state(pod.target)
        kubelet.unpublish(pod.volume_id, pod.target)
        assert_gone(kubelet, pod, daemon)

    # the old mounter pod is deleted: its processes die, its daemons with them (they live in its pod)
    doomed = [kubelet.state(p.target) for p in old_pods]
    survivors = {p.volume_id: kubelet.state(p.target) for p in new_pods}
    os.killpg(node.mounters[old].pid, signal.SIGKILL)
    for daemon in doomed:
        os.kill(daemon.pid, signal.SIGKILL)
    for daemon in doomed:
        wait_for(lambda daemon=daemon: not process_alive(daemon.pid, daemon.pid_start), 10, "the old daemons to die")
    for pod in new_pods:
        assert read_secret(pod) == pod.value
        assert kubelet.state(pod.target) == survivors[pod.volume_id]
    for pod in old_pods:
        with pytest.raises(OSError) as info:
            read_secret(pod)
        assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    status = node.status("--json")
    assert mounter_rows(status) == [(new, True, 4), (old, False, 4)]
    assert_listed(status, new_pods, new, "healthy")
    assert_listed(status, old_pods, old, "dead")
    assert all("exited" in volumes_by_target(status)[p.target]["detail"] for p in old_pods)
    table = node.status().splitlines()  # the same, for people
    assert [line.split()[:5:4] for line in table if line.startswith((new, old))] == [[new, "yes"], [old, "no"]]
    for pod in old_pods + new_pods:
        [row] = [line for line in table if line.startswith(f"{pod.namespace}/{pod.name} ")]
        assert pod.volume_id in row and ("dead: its daemon" if pod in old_pods else "healthy") in row
    assert table[-1] == "what one volume serves, object by object: kvfs status TARGET"

    # the plugin reports each dead volume once, naming its pod; a new volume goes to the live generation
    assert kubelet.probe() and kubelet.probe()
    for pod in old_pods:
        reports = [line for line in node.plugin.log().splitlines() if f"{pod.volume_id} of pod {pod.namespace}/{pod.name}" in line]
        assert len(reports) == 1 and " is dead" in reports[0], reports
    assert mounter_rows(node.status("--json")) == [(new, True, 4), (old, False, 4)]  # kept: it has volumes
    [late] = node.new_pods(1)
    node.publish([late])
    assert kubelet.state(late.target).mounter == new and read_secret(late) == late.value
    # the dead generation's volumes unpublish without their mounter; then it no longer shows
    for pod in old_pods:
        daemon = kubelet.state(pod.target)
        kubelet.unpublish(pod.volume_id, pod.target)
        assert_gone(kubelet, pod, daemon)
    assert kubelet.probe()
    assert mounter_rows(node.status("--json")) == [(new, True, 5)]


# ---- a mounter that does not fall over ----------------------------------------------------------


def _pids_hierarchy() -> tuple[Path, str] | None:
    """A writable cgroup hierarchy with the pids controller: (its mount point, "v1" or "v2")."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype, options = fields[fields.index("-") + 1], fields[-1]
        mount = Path(fields[4])
        if fstype == "cgroup" and "pids" in options.split(",") and os.access(mount, os.W_OK):
            return mount, "v1"
        if fstype == "cgroup2" and "pids" in (mount / "cgroup.subtree_control").read_text().split():
            return mount, "v2"
    return None


@contextmanager
def fork_limit(pid: int) -> Iterator[None]:
    """Move `pid` into a new pids cgroup that allows no more tasks than it runs: its fork() fails
    with EAGAIN, as on a node out of processes. Moved back afterwards."""
    found = _pids_hierarchy()
    if found is None:
        pytest.skip("no writable cgroup hierarchy with the pids controller: fork failures were NOT tested")
    mount, version = found
    owner = next(
        line.split(":", 2)[2]
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        if (version == "v2" and line.startswith("0::")) or (version == "v1" and "pids" in line.split(":")[1].split(","))
    )
    group = mount / f"kvfs-test-{os.getpid()}-{pid}"
    group.mkdir()
    try:
        (group / "cgroup.procs").write_text(str(pid))
        (group / "pids.max").write_text((group / "pids.current").read_text().strip())
        yield
    finally:
        (mount / owner.lstrip("/") / "cgroup.procs").write_text(str(pid))
        group.rmdir()


@contextmanager
def free_fds(pid: int, free: int) -> Iterator[None]:
    """Lower `pid`'s RLIMIT_NOFILE (soft), above its open fds, so that exactly `free` fd numbers stay
    free below it: the next syscalls that need more fail with EMFILE, even as root. Restored afterwards."""
    opened = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    holes = max(opened) + 1 - len(opened)
    assert holes <= free, f"pid {pid} has {holes} unused fd numbers among its open ones: cannot leave {free} free"
    limit = max(opened) + 1 + free - holes
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))


def refused(node: Node, pod: Pod) -> grpc.RpcError:
    assert node.plugin.kubelet is not None
    with pytest.raises(grpc.RpcError) as info:
        publish(node.plugin.kubelet, node.world, pod)
    assert node.plugin.kubelet.state(pod.target) is None and not os.path.ismount(pod.target)
    return info.value


def test_a_mounter_whose_fork_fails_refuses_that_publish_cleanly_and_keeps_serving(node: Node) -> None:
    """A zygote that cannot fork (pids.max), a mounter out of file descriptors (RLIMIT_NOFILE, at
    each step that needs one) and a zygote out of them: each publish fails with RESOURCE_EXHAUSTED naming what failed and the
    limit; the mounted volumes keep serving; once the limit is lifted the same mounter publishes."""
    mounter_id = node.start_mounter()
    mounter = node.mounters[mounter_id].pid
    serving = node.new_pods(2)
    node.publish(serving)
    [pod] = node.new_pods(1)
    zygote = int(MounterClient(MounterRegistry(node.state_dir).socket_path(mounter_id)).ping()["zygote"])  # type: ignore[index]

    with fork_limit(zygote):
        error = refused(node, pod)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "forking the daemon failed" in error.details() and "EAGAIN" in error.details()
    assert "pids.max" in error.details() and "fewer volumes" in error.details()

    steps = {0: "accepting a connection", 1: "receiving the volume's file descriptors", 3: "ready pipe"}
    for free, step in steps.items():
        with free_fds(mounter, free):
            error = refused(node, pod)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (free, error.details())
        assert step in error.details() and "EMFILE" in error.details() and "RLIMIT_NOFILE" in error.details()
    with free_fds(zygote, 3):  # the zygote gets only some of a fork command's 4 fds
        error = refused(node, pod)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "receiving the daemon's file descriptors" in error.details() and "EMFILE" in error.details()
    assert "the mounter's zygote ran out of file descriptors" in error.details()

    for other in serving:
        assert read_secret(other) == other.value
    assert MounterRegistry(node.state_dir).live()[0].pid == mounter  # the same mounter, and its zygote
    assert int(MounterClient(MounterRegistry(node.state_dir).socket_path(mounter_id)).ping()["zygote"]) == zygote  # type: ignore[index]
    node.publish([pod])
    assert read_secret(pod) == pod.value
    mounter_log = Path(node.state_dir, "mounters.log").read_text()
    assert "Traceback" not in mounter_log
    assert mounter_log.count("forking the daemon failed") == 2  # the zygote's line and the mounter's


def test_the_mounter_prefers_its_daemons_as_oom_victims(node: Node) -> None:
    """Daemons raise their OOM score; the mounter lowers its own when it may (CAP_SYS_RESOURCE), and
    says once that it cannot otherwise."""
    mounter_id = node.start_mounter()
    [pod] = node.new_pods(1)
    node.publish([pod])
    assert node.plugin.kubelet is not None
    daemon = node.plugin.kubelet.state(pod.target).pid
    assert Path(f"/proc/{daemon}/oom_score_adj").read_text().strip() == "500"
    mounter = node.mounters[mounter_id].pid
    status = Path(f"/proc/{mounter}/status").read_text()
    capable = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16) >> 24 & 1
    warnings = Path(node.state_dir, "mounters.log").read_text().count("cannot lower the mounter's oom_score_adj")
    inherited = Path("/proc/self/oom_score_adj").read_text().strip()
    assert (Path(f"/proc/{mounter}/oom_score_adj").read_text().strip(), warnings) == (("-900", 0) if capable else (inherited, 1))


# ---- dead volumes healed ---------------------------------------------------------------------------


@pytest.mark.parametrize("node", [("--restart-pods-with-failed-volumes", "--health-interval", "0.2")], indirect=True)
def test_a_dead_volumes_pod_is_deleted_once_so_its_replicaset_makes_a_new_one(node: Node) -> None:
    """The plugin run with --restart-pods-with-failed-volumes: a daemon dies; the plugin posts a
    VolumeFailed event on its pod and deletes the pod (owned by a ReplicaSet) once; the pod beside
    it, without a controller, loses its volume too but is only reported."""
    node.start_mounter()
    owned, bare = node.new_pods(2)
    kube, kubelet = node.world.kube, node.plugin.kubelet
    assert kubelet is not None
    for pod, controller in ((owned, "ReplicaSet"), (bare, None)):
        uid = node.world.volume_context(pod)["csi.storage.k8s.io/pod.uid"]
        kube.add_pod(pod.namespace, pod.name, controller=controller, uid=uid)
    node.publish([owned, bare])
    for pod in (owned, bare):
        assert read_secret(pod) == pod.value
        os.kill(kubelet.state(pod.target).pid, signal.SIGKILL)

    def reported(pod: Pod) -> list[str]:
        return [e["message"] for e in kube.events_for(pod.namespace, pod.name) if e["reason"] == "VolumeFailed"]

    wait_for(lambda: kube.get("pods", owned.namespace, owned.name) is None, 30, "the plugin to delete the pod")
    wait_for(lambda: reported(owned) and reported(bare), 30, "VolumeFailed events on both pods")
    wait_for(lambda: "it has no controller" in node.plugin.log(), 30, "the plugin to decline the bare pod")
    assert kube.get("pods", bare.namespace, bare.name) is not None
    path = f"/api/v1/namespaces/{owned.namespace}/pods/{owned.name}"

    def swept_again() -> bool:  # each sweep looks at the bare pod: three more after the deletion
        calls = [(r.method, r.path) for r in kube.requests]
        later = calls[calls.index(("DELETE", path)) :]
        return later.count(("GET", f"/api/v1/namespaces/{bare.namespace}/pods/{bare.name}")) >= 3

    wait_for(swept_again, 30, "three more sweeps")
    assert [r.path for r in kube.requests if r.method == "DELETE" and "/pods/" in r.path] == [path]  # one pod deleted
    log = node.plugin.log()
    assert log.count(f"deleted pod {owned.namespace}/{owned.name} ") == 1
    assert log.count("it has no controller") == 1
    for pod in (owned, bare):
        assert len(reported(pod)) == 1 and "exited" in reported(pod)[0]
