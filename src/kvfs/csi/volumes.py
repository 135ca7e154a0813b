"""Publish, republish, unpublish and watch volumes: the node plugin's logic, free of gRPC.

Every operation on one target path holds that target's lock; state lives on disk (state.py) so a
restarted plugin continues where the old one stopped. The privileged steps are only: create the
target folder, open /dev/fuse, mount(2), bind the daemon's control socket, unmount.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal, Protocol

from kvfs.config.model import RenderDefaults
from kvfs.config.parameters import DEFAULT_CLOUD_ENV_DIR, VOLUME_MOUNT_GROUP_KEY, parse_parameters, token_for_audience
from kvfs.csi import syscalls
from kvfs.csi.events import EventRecorder
from kvfs.csi.foreign import foreign_mount, remove_foreign_mounts
from kvfs.csi.health import FailedVolumes, probe_volumes
from kvfs.csi.kube import KubeClient, KubeConfigError, KubeError, spc_parameters
from kvfs.csi.mountinfo import Health, Probe, Prober, is_kvfs_mount, read_mountinfo
from kvfs.csi.mounter import MounterClient, SpawnError
from kvfs.csi.mounters import MounterRegistry
from kvfs.csi.podevents import ReadFailureEvents
from kvfs.csi.podstatus import PodStatuses
from kvfs.csi.request import (
    RequestError,
    VolumeInputs,
    check_node_identity,
    check_spc_reference,
    daemon_params,
    pod_fields,
    pod_of,
    split_inputs,
)
from kvfs.csi.state import StateStore, VolumeState, new_state, process_alive, process_start_time
from kvfs.csi.sync import SecretSync
from kvfs.csi.watch import DEFAULT_INTERVAL as DEFAULT_WATCH_INTERVAL
from kvfs.csi.watch import VolumeWatcher
from kvfs.daemon import jsonline
from kvfs.daemon.control import ControlClient
from kvfs.daemon.entry import DEFAULT_ENTRY
from kvfs.daemon.preflight import parse_refusal
from kvfs.errors import ConfigError

log = logging.getLogger(__name__)

FETCH_TIMEOUT = 45.0  # seconds for a daemon's `fetch`: its reads answer within the 30 s read budget

# Outside system (< 1000), user, nobody (65534), systemd-container (0x80000-0x6fffffff is
# partly used by systemd-nspawn) and the usual subuid ranges (100000 + 65536 * n); below 2^31.
DEFAULT_DAEMON_UID_RANGE = (1_900_000_000, 1_900_999_999)
DEFAULT_HEALTH_INTERVAL = 60.0  # seconds between the plugin's health sweeps (--health-interval)


@dataclass
class NodeConfig:
    node_id: str
    state_dir: str = "/var/lib/kvfs/csi"
    driver_name: str = "csi.kvfs.io"
    daemon_uid_range: tuple[int, int] = DEFAULT_DAEMON_UID_RANGE  # one uid (and gid) per volume's daemon
    mounter_socket: str = ""  # only this mounter; default: the newest live one registered in state_dir
    allow_node_identity: bool = False
    allow_inline_parameters: bool = False  # attributes overlay the class; volumes without a class
    cloud_env_dir: str = DEFAULT_CLOUD_ENV_DIR  # the only folder cloudEnvFileName may name files in
    kubelet_dir: str = "/var/lib/kubelet"  # target paths must lie under <kubelet_dir>/pods/
    kubeconfig: str = ""
    publish_timeout: float = 60.0
    probe_timeout: float = 1.0
    daemon_entry: str = DEFAULT_ENTRY
    start_mounter: bool = True
    mounter_log: str = ""  # default: inherit the plugin's stderr
    log_level: str = "INFO"
    log_format: str = "text"  # passed on to a mounter this plugin starts (and so to its zygote and daemons)
    max_volumes: int = 0
    watch_interval: float = DEFAULT_WATCH_INTERVAL  # seconds between polls of the daemons' events
    restart_failed_pods: bool = False  # delete the pod of a failed volume (kvfs.csi.health)
    render_defaults: RenderDefaults = RenderDefaults()  # upstream's provider flags, for every volume
    sync_secrets: bool = False  # secretObjects become Kubernetes Secrets (upstream's syncSecret.enabled)


@dataclass(frozen=True)
class PublishRequest:
    volume_id: str
    target_path: str
    readonly: bool
    has_capability: bool
    is_block: bool
    volume_context: dict[str, str] = field(repr=False)
    secrets: dict[str, str] = field(repr=False)
    volume_mount_group: str = ""  # the pod's fsGroup, when kubelet delegates it to us


class VolumeHook(Protocol):
    """What acts on a volume's life through the Kubernetes API (status objects, Secret sync).

    Called with the volume's lock held, after a publish's mount is ready, at each republish, and
    before an unpublish's teardown; a failure is logged and never fails the call.
    """

    def published(self, state: VolumeState) -> None: ...

    def republished(self, state: VolumeState) -> None: ...

    def unpublished(self, state: VolumeState) -> None: ...


@dataclass
class _TargetLock:
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0  # holders and waiters: the entry goes when nobody needs it


class Volumes:
    def __init__(self, config: NodeConfig, *, kube_factory: Callable[[], KubeClient] | None = None) -> None:
        self.config = config
        self.store = StateStore(config.state_dir)
        self.mounters = MounterRegistry(config.state_dir)
        self._kube_factory = kube_factory or self._default_kube
        self._kube: KubeClient | None = None
        self._kube_guard = threading.Lock()
        self._locks: dict[str, _TargetLock] = {}
        self._locks_guard = threading.Lock()
        self._mounter_guard = threading.Lock()
        self._uid_guard = threading.Lock()
        self.prober = Prober()
        self.health: dict[str, Probe] = {}  # target -> last reported probe
        self._foreign: set[str] = set()  # targets holding another driver's mount, already logged
        self.recorder = EventRecorder(self.kube, config.node_id)  # Warning events on pods
        self.failures = FailedVolumes(self.store, self.recorder, self.kube, restart_pods=config.restart_failed_pods)
        self.statuses = PodStatuses(self.kube, config.node_id, history=self._history)
        self.hooks: list[VolumeHook] = [self.statuses]  # in publish order; unpublish goes backwards
        sync = []
        if config.sync_secrets:
            sync = [SecretSync(self.kube, self.statuses, self.recorder, self._fetching, self._published)]
            self.hooks.extend(sync)
        # features that act on what daemons report (pod events, status objects, Secrets) subscribe here
        self.watcher = VolumeWatcher(self.store, [self.statuses, *sync, ReadFailureEvents(self.recorder)])

    # ---- plumbing ----

    @contextmanager
    def _lock(self, target: str, *, wait: bool = True) -> Iterator[bool]:
        """Serialise every operation on one target; the table holds only targets in use. With
        `wait=False`, yields False at once instead of waiting for another operation on it."""
        with self._locks_guard:
            entry = self._locks.setdefault(target, _TargetLock())
            entry.users += 1
        try:
            held = entry.lock.acquire(blocking=wait)
            try:
                yield held
            finally:
                if held:
                    entry.lock.release()
        finally:
            with self._locks_guard:
                entry.users -= 1
                if entry.users == 0:
                    del self._locks[target]

    @contextmanager
    def _published(self, state: VolumeState) -> Iterator[bool]:
        """Hold the volume's lock; True while it is still the same published volume."""
        with self._lock(state.target_path):
            now = self.store.load(state.target_path)
            yield now is not None and now.volume_id == state.volume_id and now.phase == "ready"

    def _tell(self, what: Literal["published", "republished", "unpublished"], state: VolumeState) -> None:
        for hook in reversed(self.hooks) if what == "unpublished" else self.hooks:
            try:
                getattr(hook, what)(state)
            except Exception:  # noqa: BLE001 - the API's troubles never fail a volume
                log.exception("volume %s: %s failed when %s", state.volume_id, type(hook).__name__, what)

    def _default_kube(self) -> KubeClient:
        if self.config.kubeconfig:
            return KubeClient.from_kubeconfig(self.config.kubeconfig)
        return KubeClient.in_cluster()

    def kube(self) -> KubeClient:
        """The one API client, made on first use (gRPC and background threads share it)."""
        with self._kube_guard:
            if self._kube is None:
                self._kube = self._kube_factory()
            return self._kube

    def ensure_mounter(self) -> tuple[str, MounterClient]:
        """The mounter new volumes go to, and its id: the most recently started one that answers
        (or the one --mounter-socket names). Start `kvfs csi mounter` detached when none does."""
        with self._mounter_guard:
            found = self._answering_mounter()
            if found is not None:
                return found
            where = self.config.mounter_socket or f"{self.mounters.root}/"
            if not self.config.start_mounter:
                raise RequestError(
                    "UNAVAILABLE",
                    f"no mounter answers in {where}: start one (kvfs csi mounter --state-dir {self.config.state_dir})",
                )
            log.info("no mounter answers in %s: starting one", where)
            start_mounter_detached(self.config)
            deadline = time.monotonic() + 30.0
            while time.monotonic() < deadline:
                found = self._answering_mounter(timeout=1.0)
                if found is not None:
                    return found
                time.sleep(0.05)
            raise RequestError("UNAVAILABLE", f"the mounter did not come up in {where}")

    def _answering_mounter(self, timeout: float = 2.0) -> tuple[str, MounterClient] | None:
        if self.config.mounter_socket:
            sockets = [self.config.mounter_socket]
        else:
            sockets = [self.mounters.socket_path(m.id) for m in self.mounters.live()]
        for path in sockets:
            client = MounterClient(path)
            try:
                reply = client.hello(timeout)
            except jsonline.ProtocolError as exc:
                if not self.config.mounter_socket:  # registered and alive, yet silent
                    log.warning("the mounter at %s does not answer (%s); trying an older one", path, exc)
                continue
            if reply.get("ok"):
                return str(reply.get("id") or ""), client
            if reply.get("code") == "RESOURCE_EXHAUSTED":  # it is the newest: no silent fallback
                raise RequestError("RESOURCE_EXHAUSTED", f"the mounter at {path}: {reply.get('error')}")
        return None

    # ---- publish ----

    def publish(self, req: PublishRequest) -> bool:
        """Mount the volume (True), or hand a republish's token to its daemon, or leave another
        driver's mount as it is (False)."""
        _check_publish(req)
        target = self._target(req.target_path)
        inputs = split_inputs(req.volume_context, req.secrets)
        with self._lock(target):
            state = self.store.load(target)
            mounted = is_kvfs_mount(target)
            if state is not None:
                if state.volume_id != req.volume_id:
                    raise RequestError(
                        "ALREADY_EXISTS",
                        f"target {target} is already published for volume {state.volume_id!r}, "
                        f"not {req.volume_id!r}",
                    )
                if state.phase == "ready" and mounted:
                    self._republish(state, inputs)
                    self._tell("republished", state)
                    return False
                log.info("volume %s: cleaning up an incomplete or unmounted publish first", req.volume_id)
                self._teardown(state, mounted)
            elif mounted:
                log.warning("target %s holds a kvfs mount without state: unmounting it first", target)
                _umount_all(target, detach=True)
            elif (other := foreign_mount(target)) is not None:
                # a volume the driver before kvfs published (a node switched under the upstream name):
                # kubelet republishes it; mounting over it would not reach the running pod
                if target not in self._foreign:
                    self._foreign.add(target)
                    log.warning(
                        "target %s holds a %s mount kvfs did not make: left as it is (the pod keeps those files"
                        " until it is recreated; unpublish removes it)",
                        target,
                        other.fstype,
                        extra={"volume": req.volume_id},
                    )
                return False
            params = self._params(inputs)
            if req.volume_mount_group:  # only kubelet decides the group, never a pod or a class
                params[VOLUME_MOUNT_GROUP_KEY] = req.volume_mount_group
            check_node_identity(params, self.config.allow_node_identity)
            self._validate(params, inputs.secrets)
            state = self._mount_and_spawn(req.volume_id, target, params, inputs.secrets, spc=inputs.spc_name)
            self._tell("published", state)
            return True

    def _target(self, path: str) -> str:
        """The normalised target, if it lies in kubelet's pod folders, also after resolving symlinks.

        Only the existing ancestors are resolved, never the target itself: it may be a mount
        whose daemon hangs.
        """
        target = os.path.normpath(path)
        pods = os.path.join(os.path.normpath(self.config.kubelet_dir), "pods")
        parent = os.path.dirname(target)
        while _beneath(parent, pods) and not os.path.lexists(parent):
            parent = os.path.dirname(parent)
        real_pods = os.path.realpath(pods)
        real_parent = os.path.realpath(parent)
        if not _beneath(target, pods) or not (real_parent == real_pods or _beneath(real_parent, real_pods)):
            raise RequestError(
                "INVALID_ARGUMENT",
                f"target_path {path[:200]!r} is not inside {pods}/: kvfs mounts only into kubelet's pod"
                " folders (a cluster admin sets kubelet's folder with `kvfs csi node --kubelet-dir DIR`)",
            )
        return target

    def _validate(self, params: dict[str, str], secrets: dict[str, str]) -> None:
        """kvfs.config.parameters.parse_parameters, so bad parameters fail the publish, not the daemon."""
        cfg = self.config
        try:
            parse_parameters(
                params,
                secrets,
                context="csi",
                allow_node_identity=cfg.allow_node_identity,
                cloud_env_dir=cfg.cloud_env_dir,
                defaults=cfg.render_defaults,
            )
        except ConfigError as exc:
            raise RequestError("INVALID_ARGUMENT", str(exc)) from None

    def _params(self, inputs: VolumeInputs) -> dict[str, str]:
        spc: dict[str, str] = {}
        if inputs.spc_name:
            spc = self._lookup_spc(inputs.namespace, inputs.spc_name)
        elif not self.config.allow_inline_parameters:
            raise RequestError(
                "INVALID_ARGUMENT",
                "the volume names no secretProviderClass: set volumeAttributes.secretProviderClass to a"
                " SecretProviderClass in the pod's namespace (a cluster admin may allow parameters given"
                " inline with `kvfs csi node --allow-inline-parameters`)",
            )
        return daemon_params(spc, inputs, allow_inline=self.config.allow_inline_parameters)

    def _lookup_spc(self, namespace: str, name: str) -> dict[str, str]:
        if not namespace:
            raise RequestError(
                "INVALID_ARGUMENT",
                f"secretProviderClass {name[:200]!r}: the pod namespace is missing from the volume context "
                "(the CSIDriver object must set podInfoOnMount: true)",
            )
        check_spc_reference(namespace, name)
        try:
            obj = self.kube().get_secret_provider_class(namespace, name)
        except KubeConfigError as exc:
            raise RequestError(
                "FAILED_PRECONDITION",
                f"secretProviderClass {name!r} needs the Kubernetes API, which is not configured: {exc}",
            ) from None
        except KubeError as exc:
            if exc.status == 404:
                raise RequestError(
                    "NOT_FOUND",
                    f'SecretProviderClass "{name}" not found in namespace "{namespace}": create it before the '
                    f"pod, or fix the volume's secretProviderClass attribute ({exc})",
                ) from None
            if exc.status in (401, 403):
                raise RequestError(
                    "PERMISSION_DENIED",
                    f'reading SecretProviderClass "{name}" in namespace "{namespace}" was refused: grant the '
                    f"plugin's service account get on secretproviderclasses ({exc})",
                ) from None
            raise RequestError(
                "UNAVAILABLE", f'reading SecretProviderClass "{name}" in namespace "{namespace}" failed: {exc}'
            ) from None
        meta = obj.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        if (meta.get("namespace"), meta.get("name")) != (namespace, name):
            raise RequestError(
                "FAILED_PRECONDITION",
                f'asked for SecretProviderClass "{name}" in namespace "{namespace}", the Kubernetes API answered'
                f" with {str(meta.get('namespace'))[:80]!r}/{str(meta.get('name'))[:80]!r}: refusing it (check the"
                " API server address in the plugin's configuration and any proxy in front of it)",
            )
        if (obj.get("spec") or {}).get("secretObjects") and not self.config.sync_secrets:
            log.info(
                'SecretProviderClass "%s" in namespace "%s" has secretObjects: this node does not sync Secrets'
                " (kvfs csi node --sync-secrets)",
                name,
                namespace,
            )
        try:
            return spc_parameters(obj)
        except ConfigError as exc:
            raise RequestError(
                "FAILED_PRECONDITION", f'SecretProviderClass "{name}" in namespace "{namespace}" is unusable: {exc}'
            ) from None

    def _mount_and_spawn(
        self, volume_id: str, target: str, params: dict[str, str], secrets: dict[str, str], *, spc: str
    ) -> VolumeState:
        cfg = self.config
        mounter_id, mounter = self.ensure_mounter()
        if os.path.islink(target):  # mount(2) would follow it out of kubelet's folder
            raise RequestError("INVALID_ARGUMENT", f"target_path {target} is a symbolic link")
        state = self._allocate(volume_id, target, {**pod_fields(params, spc), "mounter": mounter_id})
        control = fuse_fd = -1
        try:
            os.makedirs(target, mode=0o750, exist_ok=True)
            control = self._bind_control(target, state.uid, state.gid)
            fuse_fd = syscalls.open_fuse_device()
            syscalls.mount_fuse(fuse_fd, target, state.uid, state.gid)
        except (OSError, ValueError) as exc:
            for fd in (fuse_fd, control):
                if fd >= 0:
                    os.close(fd)
            self.store.remove(target)
            if isinstance(exc, OSError):
                code, message = syscalls.failure(f"mounting {target}", exc, "plugin")
            else:
                code, message = "INTERNAL", f"mounting {target} failed: {exc}"
            raise RequestError(code, f"volume {volume_id}: {message}") from None

        def on_forked(pid: int) -> None:
            nonlocal state
            state = replace(state, pid=pid, pid_start=process_start_time(pid) or 0)
            self.store.save(state)

        try:
            mounter.spawn(
                volume_id=volume_id,
                params=params,
                secrets=secrets,
                uid=state.uid,
                gid=state.gid,
                allow_node_identity=cfg.allow_node_identity,
                cloud_env_dir=cfg.cloud_env_dir,
                defaults=cfg.render_defaults,
                fuse_fd=fuse_fd,
                control_fd=control,
                timeout=cfg.publish_timeout,
                on_forked=on_forked,
            )
        except (SpawnError, jsonline.ProtocolError) as exc:
            self._teardown(state, True)
            refused = parse_refusal(str(exc))
            if refused is not None:  # the identity preflight said no: the daemon's message as it is
                raise RequestError(refused[0], f"volume {volume_id}: {refused[1]}") from None
            code = getattr(exc, "code", "") or ("DEADLINE_EXCEEDED" if exc.timed_out else "INTERNAL")
            raise RequestError(code, f"volume {volume_id}: the kvfs daemon did not start: {exc}") from None
        state = replace(state, phase="ready")
        self.store.save(state)
        self.health.pop(target, None)
        fields = {"volume": volume_id, "pod": pod_of(params), "daemon_pid": state.pid}
        log.info("volume %s: published at %s (daemon pid %d)", volume_id, target, state.pid, extra=fields)
        return state

    def _allocate(self, volume_id: str, target: str, pod: dict[str, str]) -> VolumeState:
        """The volume's state with the lowest uid of the range no living volume uses, saved at once.

        The uid doubles as the daemon's gid. It stays taken while the state file exists, across
        plugin restarts: the state folder is the allocation table.
        """
        start, end = self.config.daemon_uid_range
        with self._uid_guard:
            used = {s.uid for s in self.store.all()}
            uid = next((u for u in range(start, end + 1) if u not in used), None)
            if uid is None:
                raise RequestError(
                    "RESOURCE_EXHAUSTED",
                    f"volume {volume_id}: every daemon uid of {start}-{end} serves a volume on this node; widen"
                    " the range with `kvfs csi node --daemon-uid-range START-END` or lower max_volumes_per_node"
                    " (--max-volumes)",
                )
            state = new_state(volume_id, target, uid, uid, **pod)
            self.store.save(state)
        return state

    def _bind_control(self, target: str, uid: int, gid: int) -> int:
        path = str(self.store.control_socket(target))
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
            os.chown(path, uid, gid)
            sock.listen(16)
        except OSError:
            sock.close()
            raise
        return sock.detach()

    def _republish(self, state: VolumeState, inputs: VolumeInputs) -> None:
        """Fresh token to the running daemon; never fails the call (kubernetes #121271)."""
        token = token_for_audience(inputs.tokens_json)
        if not token:
            log.debug("volume %s: republish without a service account token", state.volume_id)
            return
        try:
            self._control(state, timeout=2.0).push_token(token)
        except jsonline.ProtocolError as exc:
            log.error(
                "volume %s at %s: could not pass the fresh service account token to its daemon (%s); "
                "the mount is left as it is (the health sweep judges whether it still serves)",
                state.volume_id,
                state.target_path,
                exc,
            )

    def _fetching(self, state: VolumeState) -> ControlClient:
        """The daemon's client for `fetch`, which may wait for Key Vault."""
        return self._control(state, timeout=FETCH_TIMEOUT)

    def _history(self, state: VolumeState) -> list[dict[str, Any]]:
        """Every event the volume's daemon still holds; none when it does not answer."""
        try:
            events = self._control(state, timeout=2.0).events(0).get("events")
        except jsonline.ProtocolError as exc:
            log.debug("volume %s: no event history: %s", state.volume_id, exc)
            return []
        return [e for e in events if isinstance(e, dict)] if isinstance(events, list) else []

    def _control(self, state: VolumeState, *, timeout: float) -> ControlClient:
        """The client of the volume's daemon (kvfs.daemon.control), on the socket in the state folder."""
        return ControlClient(str(self.store.control_socket(state.target_path)), timeout=timeout)

    # ---- unpublish ----

    def unpublish(self, volume_id: str, target_path: str) -> None:
        if not volume_id:
            raise RequestError("INVALID_ARGUMENT", "volume_id is missing")
        if not target_path:
            raise RequestError("INVALID_ARGUMENT", "target_path is missing")
        target = self._target(target_path)
        with self._lock(target):
            state = self.store.load(target)
            if state is not None and state.volume_id != volume_id:
                log.warning(
                    "unpublish of %s at %s: the target belongs to volume %s; cleaning it up anyway",
                    volume_id,
                    target,
                    state.volume_id,
                )
            mounted = is_kvfs_mount(target)
            if state is not None:
                self._tell("unpublished", state)
                self._teardown(state, mounted)
            elif mounted:
                _umount_all(target, detach=True)
            try:
                remove_foreign_mounts(target)  # the upstream driver's tmpfs, after a switch-over
            except OSError as exc:
                raise RequestError("INTERNAL", f"cannot unmount {target}: {exc.strerror}") from None
            _remove_dir(target)
            self._foreign.discard(target)
            self.health.pop(target, None)
            log.info("volume %s: unpublished from %s", volume_id, target, extra={"volume": volume_id})

    def _teardown(self, state: VolumeState, mounted: bool) -> None:
        """Unmount (detached when the daemon is dead), stop the daemon, forget the state."""
        alive = process_alive(state.pid, state.pid_start)
        if mounted:
            _umount_all(state.target_path, detach=not alive)
        if alive:
            self._stop_daemon(state)
        self.store.remove(state.target_path)

    def _stop_daemon(self, state: VolumeState) -> None:
        try:
            self._control(state, timeout=1.0).stop()
        except (jsonline.ProtocolError, ValueError):
            pass  # unmounting usually ends it already
        for sig, wait in ((None, 2.0), (signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
            if sig is not None:
                try:
                    os.kill(state.pid, sig)
                except ProcessLookupError:
                    return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not process_alive(state.pid, state.pid_start):
                    return
                time.sleep(0.01)
        log.error("volume %s: daemon pid %d did not exit", state.volume_id, state.pid)

    # ---- restart recovery and health ----

    def recover(self) -> list[VolumeState]:
        """Adopt the volumes of a previous plugin process; clean up half-done publishes."""
        entries = read_mountinfo()
        kept = []
        self.store.prune()
        for state in self.store.all():
            with self._lock(state.target_path):
                mounted = is_kvfs_mount(state.target_path, entries)
                if state.phase == "ready" and mounted:
                    kept.append(state)
                    continue
                log.warning(
                    "volume %s at %s: %s; cleaning up",
                    state.volume_id,
                    state.target_path,
                    "publish was interrupted" if state.phase != "ready" else "no longer mounted",
                )
                self._teardown(state, mounted)
        log.info("recovered %d volume(s) from %s", len(kept), self.config.state_dir)
        return kept

    def check_health(self) -> dict[str, Probe]:
        """Probe every ready volume (bounded); report each failure once (kvfs.csi.health). Never
        calls the API itself: kubelet's Probe runs this too."""
        states = [s for s in self.store.all() if s.phase == "ready"]
        # only the daemon holds the connection fd, so a statfs answer proves it serves
        probes = probe_volumes(states, self.prober, self.config.probe_timeout)
        for state in states:
            # a target busy with a publish or unpublish is judged by the next sweep; kubelet's Probe must not wait
            with self._lock(state.target_path, wait=False) as held:
                if held and self.store.load(state.target_path) == state:  # not unpublished or republished meanwhile
                    self.health[state.target_path] = probes[state.target_path]
                    self.failures.report(state, probes[state.target_path])
        for target in set(self.health) - {s.target_path for s in states}:
            del self.health[target]
        self.mounters.prune({s.mounter for s in self.store.all()})
        return dict(self.health)

    def restart_failed_pods(self, *, hung_for: float = DEFAULT_HEALTH_INTERVAL) -> list[str]:
        """With --restart-pods-with-failed-volumes, delete the pods of the volumes the last sweep found
        failed (kvfs.csi.health); the pods deleted. Waits on the API: the sweep loop calls it.

        A hung volume counts only once one statfs has gone unanswered for `hung_for` seconds (the
        health interval): its reads wait rather than fail, and one slow answer on a busy node, or
        kubelet's liveness probe just before a sweep, must not cost a pod."""
        now = time.monotonic()

        def failed_for_good(probe: Probe) -> bool:
            if probe.health is Health.HUNG:
                return probe.unanswered_since is not None and now - probe.unanswered_since >= hung_for
            return probe.health is not Health.HEALTHY

        failed = {t for t, p in self.health.items() if failed_for_good(p)}
        return self.failures.restart(s for s in self.store.all() if s.target_path in failed)


def _check_publish(req: PublishRequest) -> None:
    """Argument checks, in csi-sanity's order; nothing touched yet."""
    if not req.volume_id:
        raise RequestError("INVALID_ARGUMENT", "volume_id is missing")
    if not req.target_path:
        raise RequestError("INVALID_ARGUMENT", "target_path is missing")
    if not os.path.isabs(req.target_path):
        raise RequestError("INVALID_ARGUMENT", f"target_path {req.target_path!r} must be an absolute path")
    if not req.has_capability:
        raise RequestError("INVALID_ARGUMENT", "volume_capability is missing")
    if req.is_block:
        raise RequestError(
            "INVALID_ARGUMENT",
            "volume_capability: block access is not supported; kvfs volumes are read-only filesystems "
            "(use a mount volume)",
        )
    if not req.readonly:
        raise RequestError(
            "INVALID_ARGUMENT",
            "readonly is not true in the request: kvfs volumes are read-only (set readOnly: true on the "
            "pod's csi volume)",
        )
    if not req.volume_context:
        raise RequestError(
            "INVALID_ARGUMENT",
            "volume_context is empty: name a secretProviderClass or give the parameters as volumeAttributes",
        )


def _beneath(path: str, folder: str) -> bool:
    """`path` lies strictly inside `folder` (both normalised, absolute)."""
    return path.startswith(folder.rstrip("/") + "/")


def _umount_all(target: str, *, detach: bool) -> None:
    for _ in range(8):  # stacked mounts: peel them all
        if not is_kvfs_mount(target):
            return
        try:
            syscalls.umount(target, detach=detach)
        except OSError as exc:
            if exc.errno == errno.EBUSY and not detach:
                detach = True
                continue
            raise RequestError("INTERNAL", f"cannot unmount {target}: {exc.strerror}") from None


def _remove_dir(target: str) -> None:
    try:
        os.rmdir(target)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("left %s in place: %s", target, exc.strerror)


def start_mounter_detached(config: NodeConfig) -> None:
    """`python -m kvfs.csi.cli mounter` in a new session, reparented away from this process.

    An intermediate process starts it and exits at once, so the mounter is not this process's
    child (no zombie, and it survives this process being killed).
    """
    import kvfs

    where = ["--socket", config.mounter_socket] if config.mounter_socket else ["--state-dir", config.state_dir]
    cmd = [
        sys.executable,
        "-P",  # not even the working folder on sys.path
        "-m",
        "kvfs.csi.cli",
        "mounter",
        *where,
        "--daemon-entry",
        config.daemon_entry,
        "--log-level",
        config.log_level,
        "--log-format",
        config.log_format,
    ]
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.abspath(kvfs.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    log_target = config.mounter_log
    launcher = (
        "import os, subprocess, sys\n"
        "log = sys.argv[1]\n"
        "out = open(log, 'ab') if log else None\n"
        "subprocess.Popen(sys.argv[2:], start_new_session=True, stdin=subprocess.DEVNULL,"
        " stdout=out or None, stderr=out or None, close_fds=True)\n"
    )
    subprocess.run([sys.executable, "-c", launcher, log_target, *cmd], env=env, check=True, timeout=30)

