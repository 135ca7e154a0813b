"""Issue 6 end to end: kubelet calls over the unix socket, the REAL per-volume daemon
(kvfs.daemon.entry:run_volume → kvfs.daemon.volume.serve_volume) and the emulator over HTTPS.

One plugin process serves a fleet of 20 pod volumes for the whole module (each pod with its own
namespace, service account, FIC'd app or managed identity, vault and secret value; half name a
SecretProviderClass served by the fake Kubernetes API, half carry every parameter inline, so the
plugin runs with --allow-inline-parameters), one service-principal pod whose client secret is
planted to be looked for in every output, plus one intruder pod whose identity has no grant on
the vault it names. Tests that break a volume (kill a daemon, unpublish) take it out of the
fleet; the others only read.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import re
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

from control_fuzz import answers_status, attack
from csi_harness import AUDIENCE, FUSE_OK, TOKENS_KEY, Kubelet, PluginProcess, wait_for
from fakekube import FakeKube
from kvfs.csi.mountinfo import is_kvfs_mount, read_mountinfo
from kvfs.csi.mounters import MounterRegistry
from kvfs.csi.state import StateStore, VolumeState, process_alive, volume_key
from kvfs.csi.volumes import DEFAULT_DAEMON_UID_RANGE
from kvfs.emulator import entra
from kvfs.emulator.server import Emulator, EmulatorThread

pytestmark = [pytest.mark.mount, pytest.mark.skipif(not FUSE_OK, reason="needs root and /dev/fuse")]

REAL_DAEMON = "kvfs.daemon.entry:run_volume"
PODS = 20
NOBODY = 65534
JWT = re.compile(rb"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.")
PLANTED_CLIENT_SECRET = "planted-client-secret-" + os.urandom(8).hex()


# ---- the world: emulator, fake Kubernetes API, identities ----------------------------------


def objects_yaml(*names: str, mode: str = "") -> str:
    """The upstream `objects` shape: a mapping with `array`, each item a YAML string."""
    extra = {"filePermission": mode} if mode else {}
    items = [yaml.safe_dump({"objectName": n, "objectType": "secret", **extra}, sort_keys=False) for n in names]
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
    mode: str = ""  # filePermission of app-secret ("" = the default 0644)
    secrets: dict[str, str] = field(default_factory=dict, repr=False)  # nodePublishSecretRef

    @property
    def name(self) -> str:
        return f"pod-{self.index:02d}"

    def subject(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


class World:
    """The emulator and the fake Kubernetes API; the cloud env file lies in the folder the plugin
    is told to read cloud env files from (--cloud-env-dir)."""

    def __init__(self, emu: Emulator, kube: FakeKube, base: Path) -> None:
        self.emu = emu
        self.kube = kube
        self.base = base

    def parameters(self, pod: Pod) -> dict[str, str]:
        """What the SecretProviderClass (or the inline volume) says for this pod."""
        params = {
            "tenantId": self.emu.tenant_id,
            "keyvaultName": pod.vault,
            "cloudName": "AzureStackCloud",
            "cloudEnvFileName": str(self.emu.cloud_env_file),
            "objects": objects_yaml("app-secret", mode=pod.mode),
        }
        if not pod.secrets:  # workload identity; else a service principal from nodePublishSecretRef
            params["clientID"] = pod.client_id
        return params

    def new_pod(
        self, index: int, *, managed: bool, spc: bool, vault: str | None = None, mode: str = "", secret: str = ""
    ) -> Pod:
        """A namespace + service account federated to its own app (or managed identity), its own
        vault with its own value, granted there only; `vault` makes it name someone else's;
        `secret` makes it a service principal with that client secret instead."""
        ns, sa = f"ns-{index:02d}", f"sa-{index:02d}"
        ident = self.emu.identity
        app = ident.add_managed_identity() if managed else ident.add_app(secret=secret or None)
        ident.add_federated_credential(app.client_id, issuer=self.emu.oidc_issuer, subject=f"system:serviceaccount:{ns}:{sa}")
        value = ""
        if vault is None:
            vault = f"vault-{index:02d}"
            self.emu.add_vault(vault)
            self.emu.grant(vault, app.client_id)
            value = f"value-of-pod-{index:02d}-{os.urandom(6).hex()}"
            self.emu.set_secret(vault, "app-secret", value)
        token = ident.mint_sa_token(ns, sa, pod=f"pod-{index:02d}")
        pod = Pod(index, ns, sa, app.client_id, vault, value, token, volume_id=f"csi-{os.urandom(8).hex()}", mode=mode)
        if secret:
            pod.secrets = {"clientid": app.client_id, "clientsecret": secret}
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
    kubelet.publish(pod.volume_id, pod.target, world.volume_context(pod, token), pod.secrets, token=None)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    if not FUSE_OK:
        pytest.skip("needs root and /dev/fuse")
    # Root-only on purpose: daemons run with uids of their own and must still use the CA and cloud
    # env files in here (they read them before dropping privileges).
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

    def daemon(self, pod: Pod) -> VolumeState:
        """The volume's state: its daemon's pid, start time and uid."""
        state = self.kubelet.state(pod.target)
        assert state is not None
        return state

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
            "--log-format", "json",  # passed on to the mounter, its zygote and every daemon
            "--cloud-env-dir", str(world.emu.cloud_env_file.parent),
        ),
        kubelet_dir=str(world.base / "kubelet"),
        allow_inline_parameters=True,
    )  # fmt: skip
    kubelet = plugin.start()
    try:
        pods = [world.new_pod(i, managed=i % 2 == 1, spc=i % 4 < 2) for i in range(PODS)]
        pods.insert(1, world.new_pod(PODS + 1, managed=False, spc=True, secret=PLANTED_CLIENT_SECRET))
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


def assert_gone(kubelet: Kubelet, pod: Pod, daemon: VolumeState) -> None:
    """Unpublish left no mount, no daemon process and no state files behind."""
    assert not is_kvfs_mount(pod.target)
    assert all(e.mount_point != pod.target for e in read_mountinfo())
    assert not os.path.exists(pod.target)
    wait_for(lambda: not process_alive(daemon.pid, daemon.pid_start), 10, f"daemon {daemon.pid} to exit")
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
    asked = {request.path for request in fleet.world.kube.requests}
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
    uids = set()
    for pod in pods:
        pid = pids[pod.volume_id]
        uid = fleet.daemon(pod).uid
        assert DEFAULT_DAEMON_UID_RANGE[0] <= uid <= DEFAULT_DAEMON_UID_RANGE[1]
        assert proc_ids(pid, "Uid") == [uid] * 4  # real, effective, saved, filesystem
        assert proc_ids(pid, "Gid") == [uid] * 4
        assert proc_ids(pid, "Groups") == []
        uids.add(uid)
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert pod.volume_id in title
        assert pod.token not in title
        assert holders.get(pid) == 1, f"daemon {pid} of {pod.volume_id} holds {holders.get(pid)} /dev/fuse fds"
    assert fleet.plugin.proc is not None
    for other in (fleet.plugin.proc.pid, fleet.plugin.mounter_pid(), os.getpid()):
        assert other > 0 and other not in holders
    assert len(uids) == len(pods)  # one uid per volume
    # every fuse.kvfs mount of the fleet is backed by exactly one fd, held by its own daemon
    mounts = [e for e in read_mountinfo() if e.mount_point in {p.target for p in pods}]
    assert len(mounts) == len(pods) and {e.fstype for e in mounts} == {"fuse.kvfs"}
    assert sum(holders[pid] for pid in pids.values()) == len(pods)


def as_user(uid: int, action: Any) -> int:
    """Run `action()` in a forked child whose uid and gid are `uid` (no groups): 0, or the errno
    of the OSError it raised."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        code = 255
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            action()
            code = 0
        except OSError as exc:
            code = exc.errno or 255
        finally:
            os.write(write_end, str(code).encode())
            os._exit(0)
    os.close(write_end)
    try:
        return int(os.read(read_end, 16))
    finally:
        os.close(read_end)
        os.waitpid(child, 0)


def connect(path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))


def test_each_volume_has_its_own_uid_and_nothing_else_on_the_node_can_touch_it(fleet: Fleet) -> None:
    """Two volumes' daemons: distinct non-zero uids; one cannot signal or inspect the other; a
    process running as nobody cannot read a 0600 file (but can read a 0644 one)."""
    world, kubelet = fleet.world, fleet.kubelet
    pods = [world.new_pod(95 + i, managed=False, spc=True, mode="0600") for i in range(2)]
    for pod in pods:
        pod.target = kubelet.target(world.base / "kubelet", pod.name)
        publish(kubelet, world, pod)
    # the readers get the mount roots as open folders: kubelet's folders on the way are root-only
    private = os.open(pods[0].target, os.O_RDONLY | os.O_DIRECTORY)
    public = os.open(fleet.pods[0].target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        a, b = (fleet.daemon(pod) for pod in pods)
        assert a.uid != b.uid and 0 not in (a.uid, b.uid)
        for daemon in (a, b):
            assert proc_ids(daemon.pid, "Uid") == [daemon.uid] * 4 and proc_ids(daemon.pid, "Gid") == [daemon.uid] * 4
        info = os.stat("app-secret", dir_fd=private)
        assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (0, 0, 0o600)
        assert Path(pods[0].target, "app-secret").read_text() == pods[0].value  # root reads it

        def read(folder: int) -> None:
            os.close(os.open("app-secret", os.O_RDONLY, dir_fd=folder))

        assert as_user(NOBODY, lambda: read(public)) == 0
        assert as_user(NOBODY, lambda: read(private)) == errno.EACCES
        assert as_user(a.uid, lambda: os.kill(a.pid, 0)) == 0  # a daemon's own uid may signal it
        assert as_user(a.uid, lambda: os.kill(b.pid, 0)) == errno.EPERM
        assert as_user(b.uid, lambda: os.kill(a.pid, signal.SIGKILL)) == errno.EPERM
        assert as_user(a.uid, lambda: open(f"/proc/{b.pid}/environ", "rb").close()) == errno.EACCES
        assert as_user(a.uid, lambda: open(f"/proc/{b.pid}/mem", "rb").close()) == errno.EACCES
        # not even its own /proc files: daemons are non-dumpable, so those belong to root
        assert as_user(a.uid, lambda: open(f"/proc/{a.pid}/environ", "rb").close()) == errno.EACCES
        # nor the plugin's side: b's control socket (token, stop) or the mounter's socket
        mounter = MounterRegistry(kubelet.state_dir).socket_path(a.mounter)
        for path in (StateStore(kubelet.state_dir).control_socket(pods[1].target), Path(mounter)):
            assert as_user(a.uid, lambda path=path: connect(path)) == errno.EACCES
        assert kubelet.control(pods[1].target).status()["ok"] is True  # root's plugin can
        assert process_alive(a.pid, a.pid_start) and process_alive(b.pid, b.pid_start)
        assert Path(pods[1].target, "app-secret").read_text() == pods[1].value
    finally:
        os.close(private)
        os.close(public)
        for pod in pods:
            kubelet.unpublish(pod.volume_id, pod.target)


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
    daemon = fleet.daemon(pod)
    pid = daemon.pid
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
    assert_gone(kubelet, pod, daemon)


def test_no_control_client_can_stop_a_volume(fleet: Fleet) -> None:
    """Issue 10: garbage, half requests, early hang-ups and slow readers at a real daemon's control
    socket leave it serving, answering status from its live state, and taking the next token."""
    world, kubelet = fleet.world, fleet.kubelet
    pod = fleet.pods[2]
    daemon = fleet.daemon(pod)
    assert read_secret(pod) == pod.value
    path = str(StateStore(kubelet.state_dir).control_socket(pod.target))
    attack(path)
    assert process_alive(daemon.pid, daemon.pid_start) and is_kvfs_mount(pod.target)
    assert read_secret(pod) == pod.value
    status = answers_status(path)
    assert (status["pid"], status["volume_id"], status["mountpoint"]) == (daemon.pid, pod.volume_id, None)
    assert status["pod"] == {"namespace": pod.namespace, "name": pod.name}
    assert status["identity"]["client_id"] == pod.client_id and status["identity"]["token_expires_at"]
    [app] = status["objects"]
    assert (app["file"], app["object"], app["error"]) == ("app-secret", "secret/app-secret", None)
    assert app["version"] and app["refreshed_at"]
    assert [e["kind"] for e in kubelet.control(pod.target).events()["events"]] == ["served"]
    fresh = world.emu.identity.mint_sa_token(pod.namespace, pod.service_account, pod=pod.name)
    publish(kubelet, world, pod, token=fresh)  # kubelet's next republish still reaches it
    assert fleet.daemon(pod) == daemon and read_secret(pod) == pod.value
    complaints = [line for line in fleet.plugin.log().splitlines() if pod.volume_id in line and " ERROR " in line]
    assert complaints == []  # the plugin never found the volume broken
    assert "internal error" not in Path(fleet.plugin.mounter_log).read_text()  # every bad request was expected


def test_publish_and_unpublish_are_idempotent_and_leave_nothing(fleet: Fleet) -> None:
    world, kubelet = fleet.world, fleet.kubelet
    pod = world.new_pod(91, managed=True, spc=False)
    pod.target = kubelet.target(world.base / "kubelet", pod.name)
    publish(kubelet, world, pod)
    first = fleet.daemon(pod)
    publish(kubelet, world, pod)  # the same request again: OK, same daemon
    assert fleet.daemon(pod) == first
    assert read_secret(pod) == pod.value
    kubelet.unpublish(pod.volume_id, pod.target)
    assert_gone(kubelet, pod, first)
    kubelet.unpublish(pod.volume_id, pod.target)  # again: still OK
    publish(kubelet, world, pod)  # and a new publish of the same volume starts afresh
    second = fleet.daemon(pod)
    assert second.pid != first.pid and read_secret(pod) == pod.value
    kubelet.unpublish(pod.volume_id, pod.target)
    kubelet.unpublish(pod.volume_id, pod.target)
    assert_gone(kubelet, pod, second)


def test_files_belong_to_root_and_the_pods_fs_group_and_only_kubelet_sets_it(fleet: Fleet) -> None:
    """Files and folders are root's, as upstream's tmpfs files are; kubelet delegates fsGroup
    (VOLUME_MOUNT_GROUP): files and folders get that group, else group 0."""
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
        for path in ("", "app-secret", "..data", "..data/app-secret"):
            grouped_stat, plain_stat = os.stat(Path(grouped.target, path)), os.stat(Path(plain.target, path))
            assert (grouped_stat.st_uid, grouped_stat.st_gid) == (0, 4321), path
            assert (plain_stat.st_uid, plain_stat.st_gid) == (0, 0), path
    finally:
        for pod in pods:
            kubelet.unpublish(pod.volume_id, pod.target)


def test_state_folder_and_logs_never_hold_a_token_or_a_secret(fleet: Fleet) -> None:
    for pod in fleet.pods:
        assert read_secret(pod) == pod.value  # everything has been fetched at least once
    """A full CSI run (the plugin started its own mounter; real daemons log into the mounter's log)
    at DEBUG: no service account token, access token, client secret or secret value in any output."""
    assert any(pod.secrets for pod in fleet.pods)
    forbidden = {f"{pod.name} token": pod.token for pod in [*fleet.pods, fleet.intruder]}
    forbidden |= {f"{pod.name} value": pod.value for pod in fleet.pods}
    forbidden["the planted client secret"] = PLANTED_CLIENT_SECRET
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
            # no JWT at all: Key Vault access tokens (never seen by this test) are JWTs too
            assert not JWT.search(data), f"a JWT in {path}"
    assert files >= len(fleet.pods) + 2  # state.json per volume, plugin.log, mounter.log
    mounter_log = Path(fleet.plugin.mounter_log).read_text()
    assert mounter_log.count("mount config: vault=") >= len(fleet.pods)  # every daemon logged there
    assert '"level": "DEBUG", "logger": "kvfs.' in mounter_log  # at DEBUG, through kvfs's one logging setup


def json_records(path: str) -> list[dict[str, Any]]:
    """Every line of a log as JSON; a line that is not (a stray print, a raw traceback) fails."""
    entries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            entries.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"{path} line {number} is not JSON: {line!r}") from None
        assert list(entries[-1])[:5] == ["time", "level", "logger", "message", "pid"], line
    return entries


def test_every_log_line_of_the_plugin_and_its_mounter_is_json_naming_volume_and_pod(fleet: Fleet) -> None:
    """`--log-format json` reached the mounter, the zygote and every daemon; daemons' lines carry
    their volume and pod, and a refused read names the object and the code."""
    with pytest.raises(PermissionError):
        read_secret(fleet.intruder)
    plugin, mounter = json_records(fleet.plugin.log_path), json_records(fleet.plugin.mounter_log)
    published = {e["volume"]: e["pod"] for e in plugin if e["message"].startswith(f"volume {e.get('volume')}: published")}
    for pod in [*fleet.pods, fleet.intruder]:
        assert published.get(pod.volume_id) == f"{pod.namespace}/{pod.name}"
    pids = {e["pid"] for e in mounter}
    assert len(pids) >= len(fleet.pods) + 2  # the mounter, its zygote, one daemon per volume
    daemons = [e for e in mounter if e["message"].startswith("mount config:")]
    assert {(e["volume"], e["pod"]) for e in daemons} >= {(p.volume_id, f"{p.namespace}/{p.name}") for p in fleet.pods}
    refused = [e for e in mounter if e.get("object") == "secret/app-secret" and e["level"] == "WARNING"]
    assert any(e["volume"] == fleet.intruder.volume_id and e["code"] for e in refused), refused
    assert any(e["logger"] == "kvfs.vault.client" and e.get("status") == 403 for e in mounter)


def test_killed_plugin_keeps_every_volume_serving_and_unpublish_works_after(fleet: Fleet) -> None:
    plugin = fleet.plugin
    daemons = {pod.volume_id: fleet.daemon(pod) for pod in fleet.pods}
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
    assert {pod.volume_id: fleet.daemon(pod) for pod in fleet.pods} == daemons
    assert kubelet.probe() is True
    # the new plugin process republishes and unpublishes volumes the old one published
    pod = fleet.pods[-1]
    publish(kubelet, fleet.world, pod, token=fleet.world.emu.identity.mint_sa_token(pod.namespace, pod.service_account))
    for pod in fleet.pods[-2:]:
        kubelet.unpublish(pod.volume_id, pod.target)
        assert_gone(kubelet, pod, daemons[pod.volume_id])
        fleet.remove(pod)
    for pod in fleet.pods:
        assert read_secret(pod) == pod.value


def test_a_killed_daemon_breaks_only_its_volume_and_is_reported(fleet: Fleet) -> None:
    kubelet, plugin = fleet.kubelet, fleet.plugin
    victim = fleet.pods[3]
    daemon = fleet.daemon(victim)
    pid = daemon.pid
    assert kubelet.probe() is True
    assert metric(fleet.metrics_url, "kvfs_volumes", 'state="dead"') == 0
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(pid, daemon.pid_start), 10, "the daemon to die")
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
    assert metric(fleet.metrics_url, "kvfs_volumes", 'state="dead"') == 1
    assert metric(fleet.metrics_url, "kvfs_volumes", 'state="healthy"') == len(fleet.pods)  # + intruder - victim
    dead = [line for line in plugin.log().splitlines() if " is dead" in line]
    assert dead and all(victim.volume_id in line for line in dead)
    # kubelet's republish of the broken volume: OK, reported, the mount stays (no empty folder)
    publish(kubelet, fleet.world, victim)
    assert is_kvfs_mount(victim.target)
    kubelet.unpublish(victim.volume_id, victim.target)
    assert_gone(kubelet, victim, daemon)
    fleet.remove(victim)
    assert kubelet.probe() is True
    assert metric(fleet.metrics_url, "kvfs_volumes", 'state="dead"') == 0
