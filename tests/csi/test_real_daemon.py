"""Issue 6 end to end: kubelet calls over the unix socket, the REAL per-volume daemon
(kvfs.csi.daemon:run_volume → kvfs.fs.mount.run_mount) and the emulator over HTTPS.

One plugin process serves a fleet of 20 pod volumes for the whole module (each pod with its own
namespace, service account, FIC'd app or managed identity, vault and secret value; half name a
SecretProviderClass served by the fake Kubernetes API, half carry every parameter inline), plus
one intruder pod whose identity has no grant on the vault it names. Tests that break a volume
(kill a daemon, unpublish) take it out of the fleet; the others only read.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from csi_harness import AUDIENCE, FUSE_OK, TOKENS_KEY, Kubelet, PluginProcess, wait_for
from fakekube import FakeKube
from kvfs.csi.mountinfo import is_kvfs_mount, read_mountinfo
from kvfs.csi.state import process_alive, volume_key
from kvfs.emulator import entra
from kvfs.emulator.server import Emulator, EmulatorThread

pytestmark = [pytest.mark.mount, pytest.mark.skipif(not FUSE_OK, reason="needs root and /dev/fuse")]

REAL_DAEMON = "kvfs.csi.daemon:run_volume"
DAEMON_UID = 65534
PODS = 20


# ---- the world: emulator, fake Kubernetes API, identities ----------------------------------


def objects_yaml(*names: str) -> str:
    """The upstream `objects` shape: a mapping with `array`, each item a YAML string."""
    items = [yaml.safe_dump({"objectName": n, "objectType": "secret"}, sort_keys=False) for n in names]
    return yaml.safe_dump({"array": items}, sort_keys=False)


def kubelet_tokens(token: str) -> str:
    """`csi.storage.k8s.io/serviceAccount.tokens` as kubelet sends it, expiry taken from the JWT."""
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    stamp = datetime.datetime.fromtimestamp(exp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return json.dumps({AUDIENCE: {"token": token, "expirationTimestamp": stamp}})


@dataclass
class Pod:
    """One pod's volume: who it is, what it may read, what kubelet sends for it."""

    index: int
    namespace: str
    service_account: str
    client_id: str
    vault: str  # the vault its volume names
    value: str  # the value of `app-secret` in that vault ("" when it has no grant there)
    token: str = field(repr=False)
    spc: str = ""  # SecretProviderClass name, or "" for inline parameters
    target: str = ""
    volume_id: str = ""

    @property
    def name(self) -> str:
        return f"pod-{self.index:02d}"

    def subject(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


class World:
    """The emulator (its files readable by the unprivileged daemons) and the fake Kubernetes API."""

    def __init__(self, emu: Emulator, kube: FakeKube, base: Path) -> None:
        self.emu = emu
        self.kube = kube
        self.base = base

    def parameters(self, pod: Pod) -> dict[str, str]:
        """What the SecretProviderClass (or the inline volume) says for this pod."""
        return {
            "clientID": pod.client_id,
            "tenantId": self.emu.tenant_id,
            "keyvaultName": pod.vault,
            "cloudName": "AzureStackCloud",
            "cloudEnvFileName": str(self.emu.cloud_env_file),
            "objects": objects_yaml("app-secret"),
        }

    def new_pod(self, index: int, *, managed: bool, spc: bool, vault: str | None = None) -> Pod:
        """A namespace + service account federated to its own app (or managed identity), its own
        vault with its own value, granted there only; `vault` makes it name someone else's."""
        ns, sa = f"ns-{index:02d}", f"sa-{index:02d}"
        ident = self.emu.identity
        app = ident.add_managed_identity() if managed else ident.add_app()
        ident.add_federated_credential(app.client_id, issuer=self.emu.oidc_issuer, subject=f"system:serviceaccount:{ns}:{sa}")
        value = ""
        if vault is None:
            vault = f"vault-{index:02d}"
            self.emu.add_vault(vault)
            self.emu.grant(vault, app.client_id)
            value = f"value-of-pod-{index:02d}-{os.urandom(6).hex()}"
            self.emu.set_secret(vault, "app-secret", value)
        token = ident.mint_sa_token(ns, sa, pod=f"pod-{index:02d}")
        pod = Pod(index, ns, sa, app.client_id, vault, value, token, volume_id=f"csi-{os.urandom(8).hex()}")
        if spc:
            pod.spc = f"spc-{index:02d}"
            self.kube.add_spc(ns, pod.spc, self.parameters(pod))
        return pod

    def volume_context(self, pod: Pod, token: str | None = None) -> dict[str, str]:
        context = {
            "csi.storage.k8s.io/pod.name": pod.name,
            "csi.storage.k8s.io/pod.namespace": pod.namespace,
            "csi.storage.k8s.io/pod.uid": f"7c1d2f7e-0000-4000-8000-{pod.index:012d}",
            "csi.storage.k8s.io/serviceAccount.name": pod.service_account,
            "csi.storage.k8s.io/ephemeral": "true",
            TOKENS_KEY: kubelet_tokens(token or pod.token),
        }
        if pod.spc:
            context["secretProviderClass"] = pod.spc
        else:
            context.update(self.parameters(pod))
        return context


def publish(kubelet: Kubelet, world: World, pod: Pod, token: str | None = None) -> None:
    """NodePublishVolume exactly as kubelet sends it (the tokens already in the context)."""
    kubelet.publish(pod.volume_id, pod.target, world.volume_context(pod, token), token=None)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    if not FUSE_OK:
        pytest.skip("needs root and /dev/fuse")
    # Root-only on purpose: daemons run as uid 65534 and must still use the CA and cloud env files
    # in here (they read them before dropping privileges).
    base = Path(tempfile.mkdtemp(prefix="kvfsreal-", dir="/tmp"))
    base.chmod(0o700)
    kube = FakeKube(base / "kube")
    try:
        with EmulatorThread(base / "emulator", vaults=()) as emu, pytest.MonkeyPatch.context() as mp:
            mp.setenv("SSL_CERT_FILE", str(emu.ca_file))  # inherited by plugin → mounter → daemons
            yield World(emu, kube, base)
    finally:
        kube.close()
        shutil.rmtree(base, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Fleet:
    world: World
    plugin: PluginProcess
    pods: list[Pod]  # still published
    intruder: Pod
    metrics_url: str

    @property
    def kubelet(self) -> Kubelet:
        assert self.plugin.kubelet is not None
        return self.plugin.kubelet

    def pid(self, pod: Pod) -> int:
        return int(self.kubelet.state(pod.target).pid)

    def remove(self, pod: Pod) -> None:
        self.pods.remove(pod)


@pytest.fixture(scope="module")
def fleet(world: World) -> Iterator[Fleet]:
    port = _free_port()
    plugin = PluginProcess(
        daemon_entry=REAL_DAEMON,
        extra_args=(
            "--kubeconfig", str(world.kube.kubeconfig(world.base / "kubeconfig")),
            "--metrics-addr", f"127.0.0.1:{port}",
            "--health-interval", "0",
            "--log-level", "DEBUG",
        ),
    )  # fmt: skip
    kubelet = plugin.start()
    try:
        pods = [world.new_pod(i, managed=i % 2 == 1, spc=i % 4 < 2) for i in range(PODS)]
        intruder = world.new_pod(PODS, managed=False, spc=False, vault=pods[0].vault)
        for pod in [*pods, intruder]:
            pod.target = kubelet.target(world.base / "kubelet", pod.name)
        with ThreadPoolExecutor(8) as pool:  # kubelet publishes concurrently
            list(pool.map(lambda p: publish(kubelet, world, p), [*pods, intruder]))
        yield Fleet(world, plugin, pods, intruder, f"http://127.0.0.1:{port}/metrics")
    finally:
        plugin.close()


# ---- helpers ---------------------------------------------------------------------------------


def fuse_holders() -> dict[int, int]:
    """pid -> number of open /dev/fuse fds, for every process."""
    holders: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        n = links.count("/dev/fuse")
        if n:
            holders[int(pid)] = n
    return holders


def proc_ids(pid: int, key: str) -> list[int]:
    """The ids on the `Uid:`, `Gid:` or `Groups:` line of /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return [int(v) for v in line.split()[1:]]
    raise AssertionError(f"no {key} line for pid {pid}")


def read_secret(pod: Pod) -> str:
    return Path(pod.target, "app-secret").read_text()


def assert_gone(kubelet: Kubelet, pod: Pod, pid: int) -> None:
    """Unpublish left no mount, no daemon process and no state files behind."""
    assert not is_kvfs_mount(pod.target)
    assert all(e.mount_point != pod.target for e in read_mountinfo())
    assert not os.path.exists(pod.target)
    wait_for(lambda: not process_alive(pid, 0), 10, f"daemon {pid} to exit")
    assert kubelet.state(pod.target) is None
    volumes = Path(kubelet.state_dir, "volumes")
    assert not (volumes / volume_key(pod.target)).exists()


def metric(url: str, name: str, labels: str) -> float:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{{{labels}}} not in the metrics")


# ---- tests -----------------------------------------------------------------------------------


def test_each_pod_reads_its_own_vault_with_its_own_identity(fleet: Fleet) -> None:
    emu = fleet.world.emu
    assert {bool(p.spc) for p in fleet.pods} == {True, False}  # both volume styles
    asked = {path for path, _who in fleet.world.kube.requests}
    for pod in fleet.pods:
        spc_path = f"/apis/secrets-store.csi.x-k8s.io/v1/namespaces/{pod.namespace}/secretproviderclasses/{pod.spc}"
        assert (spc_path in asked) == bool(pod.spc)
    for pod in fleet.pods:
        assert sorted(os.listdir(pod.target)) == ["..data", "app-secret"]
        assert read_secret(pod) == pod.value
        assert Path(pod.target, "..data", "app-secret").read_text() == pod.value
    for pod in fleet.pods:
        # the token exchange and every GET on its vault came from this pod's own identity
        assert emu.count(route="token", client_id=pod.client_id) >= 1
        gets = emu.count(vault=pod.vault, route="get_secret", client_id=pod.client_id)
        assert gets >= 1
        others = emu.count(vault=pod.vault, route="get_secret") - gets
        if pod.vault == fleet.intruder.vault:
            others -= emu.count(vault=pod.vault, route="get_secret", client_id=fleet.intruder.client_id)
        assert others == 0
    pids = {fleet.pid(p) for p in fleet.pods}
    assert len(pids) == len(fleet.pods)  # one daemon per volume
    assert len({p.client_id for p in fleet.pods}) == len(fleet.pods)


def test_an_identity_without_a_grant_gets_eacces_not_another_pods_data(fleet: Fleet) -> None:
    intruder = fleet.intruder
    victim = fleet.pods[0]
    assert intruder.vault == victim.vault
    assert read_secret(victim) == victim.value
    with pytest.raises(PermissionError) as info:
        read_secret(intruder)
    assert info.value.errno == errno.EACCES
    with pytest.raises(PermissionError):
        Path(intruder.target, "..data", "app-secret").read_bytes()
    emu = fleet.world.emu
    assert emu.count(route="token", client_id=intruder.client_id) >= 1  # it exchanged its own token
    assert emu.count(vault=victim.vault, client_id=intruder.client_id) >= 1  # and was refused there
    assert read_secret(victim) == victim.value  # the victim's volume is unaffected


def test_daemons_are_unprivileged_named_and_sole_holders_of_their_fuse_fd(fleet: Fleet) -> None:
    pods = [*fleet.pods, fleet.intruder]
    pids = {pod.volume_id: fleet.pid(pod) for pod in pods}
    holders = fuse_holders()
    for pod in pods:
        pid = pids[pod.volume_id]
        assert proc_ids(pid, "Uid") == [DAEMON_UID] * 4  # real, effective, saved, filesystem
        assert proc_ids(pid, "Gid") == [DAEMON_UID] * 4
        assert proc_ids(pid, "Groups") == []
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert pod.volume_id in title
        assert pod.token not in title
        assert holders.get(pid) == 1, f"daemon {pid} of {pod.volume_id} holds {holders.get(pid)} /dev/fuse fds"
    assert fleet.plugin.proc is not None
    for other in (fleet.plugin.proc.pid, fleet.plugin.mounter_pid(), os.getpid()):
        assert other > 0 and other not in holders
    # every fuse.kvfs mount of the fleet is backed by exactly one fd, held by its own daemon
    mounts = [e for e in read_mountinfo() if e.mount_point in {p.target for p in pods}]
    assert len(mounts) == len(pods) and {e.fstype for e in mounts} == {"fuse.kvfs"}
    assert sum(holders[pid] for pid in pids.values()) == len(pods)


def test_republish_pushes_the_new_token_without_a_key_vault_call(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    world, kubelet, emu = fleet.world, fleet.kubelet, fleet.world.emu
    pod = world.new_pod(90, managed=False, spc=True)
    pod.target = kubelet.target(world.base / "kubelet", pod.name)
    # the first token is already expired: the daemon can only exchange the one a republish brings
    stale = emu.identity.oidc.mint(
        pod.namespace, pod.service_account, audience=AUDIENCE, lifetime=600, issuer=None, now=time.time() - 3600
    )
    publish(kubelet, world, pod, token=stale)
    pid = fleet.pid(pod)
    seen: list[tuple[str, str, str]] = []
    real_check = entra._check_assertion

    def spy(provider: Any, app: Any, raw: str) -> None:
        claims = jwt.decode(raw.strip(), options={"verify_signature": False})
        seen.append((app.client_id, claims["sub"], claims["jti"]))
        real_check(provider, app, raw)

    monkeypatch.setattr(entra, "_check_assertion", spy)
    fresh = emu.identity.mint_sa_token(pod.namespace, pod.service_account, pod=pod.name)

    def calls() -> tuple[int, int]:
        return emu.count(vault=pod.vault), emu.count(route="token", client_id=pod.client_id)

    before = calls()
    publish(kubelet, world, pod, token=fresh)  # kubelet's periodic republish
    assert calls() == before == (0, 0)  # no Key Vault call, no token exchange during the call
    assert fleet.pid(pod) == pid and is_kvfs_mount(pod.target)  # same daemon, same mount
    assert read_secret(pod) == pod.value
    fresh_jti = jwt.decode(fresh, options={"verify_signature": False})["jti"]
    assert [s for s in seen if s[0] == pod.client_id] == [(pod.client_id, pod.subject(), fresh_jti)]
    kubelet.unpublish(pod.volume_id, pod.target)
    assert_gone(kubelet, pod, pid)


def test_publish_and_unpublish_are_idempotent_and_leave_nothing(fleet: Fleet) -> None:
    world, kubelet = fleet.world, fleet.kubelet
    pod = world.new_pod(91, managed=True, spc=False)
    pod.target = kubelet.target(world.base / "kubelet", pod.name)
    publish(kubelet, world, pod)
    pid = fleet.pid(pod)
    publish(kubelet, world, pod)  # the same request again: OK, same daemon
    assert fleet.pid(pod) == pid
    assert read_secret(pod) == pod.value
    kubelet.unpublish(pod.volume_id, pod.target)
    assert_gone(kubelet, pod, pid)
    kubelet.unpublish(pod.volume_id, pod.target)  # again: still OK
    publish(kubelet, world, pod)  # and a new publish of the same volume starts afresh
    second = fleet.pid(pod)
    assert second != pid and read_secret(pod) == pod.value
    kubelet.unpublish(pod.volume_id, pod.target)
    kubelet.unpublish(pod.volume_id, pod.target)
    assert_gone(kubelet, pod, second)


def test_files_belong_to_the_pods_fs_group_and_only_kubelet_sets_it(fleet: Fleet) -> None:
    """kubelet delegates fsGroup (VOLUME_MOUNT_GROUP): files and folders get that group."""
    world, kubelet = fleet.world, fleet.kubelet
    pods = [world.new_pod(92 + i, managed=False, spc=False) for i in range(2)]
    for pod in pods:
        pod.target = kubelet.target(world.base / "kubelet", pod.name)
    grouped, plain = pods
    context = world.volume_context(grouped)
    kubelet.publish(grouped.volume_id, grouped.target, context, token=None, volume_mount_group="4321")
    # a pod cannot pick the group through its volume attributes
    context = {**world.volume_context(plain), "kvfs.io/volumeMountGroup": "0"}
    kubelet.publish(plain.volume_id, plain.target, context, token=None)
    try:
        assert read_secret(grouped) == grouped.value
        assert os.stat(Path(grouped.target, "app-secret")).st_gid == 4321
        assert os.stat(Path(grouped.target, "..data")).st_gid == 4321
        assert os.stat(Path(plain.target, "app-secret")).st_gid == 65534
    finally:
        for pod in pods:
            kubelet.unpublish(pod.volume_id, pod.target)


def test_state_folder_and_logs_never_hold_a_token_or_a_secret(fleet: Fleet) -> None:
    for pod in fleet.pods:
        assert read_secret(pod) == pod.value  # everything has been fetched at least once
    forbidden = {f"{pod.name} token": pod.token for pod in [*fleet.pods, fleet.intruder]}
    forbidden |= {f"{pod.name} value": pod.value for pod in fleet.pods}
    # the JWT signature alone would leak the token too; the payload part holds no secret
    forbidden |= {f"{pod.name} token signature": pod.token.rsplit(".", 1)[1] for pod in fleet.pods}
    files = 0
    for folder, _dirs, names in os.walk(fleet.plugin.state_dir):
        for name in names:
            path = Path(folder, name)
            if not path.is_file():
                continue  # sockets
            files += 1
            data = path.read_bytes()
            for what, needle in forbidden.items():
                assert needle.encode() not in data, f"{what} found in {path}"
    assert files >= len(fleet.pods) + 2  # state.json per volume, plugin.log, mounter.log
    assert "app-secret" in Path(fleet.plugin.mounter_log).read_text()  # the daemons did log there


def test_killed_plugin_keeps_every_volume_serving_and_unpublish_works_after(fleet: Fleet) -> None:
    plugin = fleet.plugin
    pids = {pod.volume_id: fleet.pid(pod) for pod in fleet.pods}
    mounter = plugin.mounter_pid()
    failures: list[str] = []
    rounds = [0]
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            for pod in fleet.pods:
                try:
                    if read_secret(pod) != pod.value:
                        failures.append(f"{pod.name}: wrong bytes")
                except OSError as exc:
                    failures.append(f"{pod.name}: {exc}")
            rounds[0] += 1

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        wait_for(lambda: rounds[0] >= 2, 20, "reads before the kill")
        plugin.kill()
        seen = rounds[0]
        wait_for(lambda: rounds[0] >= seen + 3, 20, "reads while no plugin runs")
        kubelet = plugin.start()
        seen = rounds[0]
        wait_for(lambda: rounds[0] >= seen + 2, 20, "reads after the restart")
    finally:
        stop.set()
        thread.join(10)
    assert failures == []
    assert plugin.mounter_pid() == mounter
    assert {pod.volume_id: fleet.pid(pod) for pod in fleet.pods} == pids
    assert kubelet.probe() is True
    # the new plugin process republishes and unpublishes volumes the old one published
    pod = fleet.pods[-1]
    publish(kubelet, fleet.world, pod, token=fleet.world.emu.identity.mint_sa_token(pod.namespace, pod.service_account))
    for pod in fleet.pods[-2:]:
        kubelet.unpublish(pod.volume_id, pod.target)
        assert_gone(kubelet, pod, pids[pod.volume_id])
        fleet.remove(pod)
    for pod in fleet.pods:
        assert read_secret(pod) == pod.value


def test_a_killed_daemon_breaks_only_its_volume_and_is_reported(fleet: Fleet) -> None:
    kubelet, plugin = fleet.kubelet, fleet.plugin
    victim = fleet.pods[3]
    pid = fleet.pid(victim)
    assert kubelet.probe() is True
    assert metric(fleet.metrics_url, "kvfs_csi_volumes", 'health="dead"') == 0
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(pid, 0), 10, "the daemon to die")
    with pytest.raises(OSError) as info:
        os.listdir(victim.target)  # fails at once: nobody else holds the connection, so no hang
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    with pytest.raises(OSError) as info:
        read_secret(victim)
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    for pod in fleet.pods:
        if pod is not victim:
            assert read_secret(pod) == pod.value
    # reported: Probe sweeps, the log names the volume, the metrics count one dead volume
    assert kubelet.probe() is True
    assert metric(fleet.metrics_url, "kvfs_csi_volumes", 'health="dead"') == 1
    assert metric(fleet.metrics_url, "kvfs_csi_volumes", 'health="healthy"') == len(fleet.pods)  # + intruder - victim
    dead = [line for line in plugin.log().splitlines() if " is dead" in line]
    assert dead and all(victim.volume_id in line for line in dead)
    # kubelet's republish of the broken volume: OK, reported, the mount stays (no empty folder)
    publish(kubelet, fleet.world, victim)
    assert is_kvfs_mount(victim.target)
    kubelet.unpublish(victim.volume_id, victim.target)
    assert_gone(kubelet, victim, pid)
    fleet.remove(victim)
    assert kubelet.probe() is True
    assert metric(fleet.metrics_url, "kvfs_csi_volumes", 'health="dead"') == 0
