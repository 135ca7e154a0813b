"""The per-volume daemon's entry point, as the zygote runs it in a freshly forked child.

An entry is `MODULE:FUNCTION`; the function serves one volume. If MODULE also defines
`prepare(spec)`, the child runs it first, still as root (reading root-only files the volume
names), then drops to the volume's own uid and calls FUNCTION with every other fd closed. The
default entry's `prepare` only reads files (the CAs of SSL_CERT_FILE, the cloud env file); its
FUNCTION, unprivileged, turns the request (parameters, node-publish secrets, fds) into a
MountConfig and serves it on the handed-over FUSE connection, so nothing a tenant wrote is parsed
as root. Any entry with the same signature can stand in (tests, benchmarks).
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Callable

from kvfs.config.clouds import EnvFileRead
from kvfs.config.model import RenderDefaults
from kvfs.errors import KvfsError

log = logging.getLogger(__name__)

DEFAULT_ENTRY = "kvfs.daemon.entry:run_volume"


@dataclass
class DaemonSpec:
    """Everything one volume's daemon gets from the plugin; secrets never appear in its repr."""

    volume_id: str
    params: dict[str, str] = field(repr=False)
    secrets: dict[str, str] = field(repr=False)
    allow_node_identity: bool
    fuse_fd: int  # already mounted at the target by the plugin: serve "/dev/fd/<fuse_fd>"
    control_fd: int  # a listening unix socket for kvfs.daemon.control
    ready_fd: int  # write b"ready\n" or b"error <message>\n", then close
    env: dict[str, str] | None = field(default=None, repr=False)  # the plugin's DAEMON_ENV values; None = keep the mounter's
    cloud_env_dir: str = ""  # cloudEnvFileName must lie inside it (the plugin's --cloud-env-dir)
    defaults: RenderDefaults = RenderDefaults()  # the plugin's node-wide provider flags
    # What the default entry's `prepare` read as root (or why it could not), for `run_volume` to parse after the drop.
    prepared: EnvFileRead | KvfsError | None = field(default=None, repr=False)

    @property
    def mountpoint(self) -> str:
        return f"/dev/fd/{self.fuse_fd}"


@dataclass(frozen=True)
class DaemonEntry:
    """A loaded `--daemon-entry`: `run` serves the volume, `prepare` runs before the privilege drop."""

    name: str
    run: Callable[[DaemonSpec], int]
    prepare: Callable[[DaemonSpec], None] | None = None
    warm_up: Callable[[], None] | None = None  # run once in the zygote, before it freezes its heap


# Settings the daemon reads from its environment. The plugin sends its own values with every spawn
# request: a mounter that outlived an earlier plugin must not hand out that plugin's settings.
DAEMON_ENV = (
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "AZURE_AUTHORITY_HOST",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    "KVFS_NMI_URL",
    "KVFS_LOG_LEVEL",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "https_proxy",
    "http_proxy",
    "no_proxy",
)


def daemon_environment() -> dict[str, str]:
    """This process's values of DAEMON_ENV, to send along with a spawn request."""
    return {name: os.environ[name] for name in DAEMON_ENV if name in os.environ}


def apply_environment(env: dict[str, str] | None) -> None:
    """In the forked child: make DAEMON_ENV exactly what the plugin sent."""
    if env is None:
        return
    for name in DAEMON_ENV:
        if name in env:
            os.environ[name] = env[name]
        else:
            os.environ.pop(name, None)


def report_error(ready_fd: int, message: str) -> None:
    """Tell the mounter why start-up failed (one line), if nobody did yet."""
    line = "error " + " ".join(message.split())
    try:
        os.write(ready_fd, line.encode()[:4000] + b"\n")
    except OSError:
        pass


def prepare(spec: DaemonSpec) -> None:
    """Runs in the forked child while it is still root: read what the volume names on disk, parse nothing.

    `cloudEnvFileName` and the CAs of SSL_CERT_FILE may be readable by root only; the daemon
    keeps their content in memory after it drops to its unprivileged uid. The cloud env file
    is read only inside the plugin's --cloud-env-dir, as the plugin itself checked it. The
    parameters, the objects YAML and the file's JSON are parsed by `run_volume`, after the drop.
    """
    from kvfs.config.parameters import read_cloud_env_file
    from kvfs.net.http import preload_ssl_context

    try:
        preload_ssl_context()
    except KvfsError as exc:
        spec.prepared = exc
        return
    spec.prepared = read_cloud_env_file(spec.params, cloud_env_dir=spec.cloud_env_dir or None)


def warm_up() -> None:
    """In the zygote: run a made-up volume through this entry's code once (kvfs.daemon.warmup)."""
    from kvfs.daemon.warmup import warm_up as run_made_up_volume

    run_made_up_volume()


def run_volume(spec: DaemonSpec) -> int:
    """Default entry: kvfs.config parameters → kvfs.daemon.volume.serve_volume on /dev/fd/N."""
    from kvfs.config.parameters import parse_parameters
    from kvfs.daemon.preflight import PreflightError
    from kvfs.daemon.volume import serve_volume

    if spec.prepared is None:
        prepare(spec)
    try:
        if isinstance(spec.prepared, KvfsError):
            raise spec.prepared
        config = parse_parameters(
            spec.params,
            spec.secrets,
            context="csi",
            allow_node_identity=spec.allow_node_identity,
            cloud_env_dir=spec.cloud_env_dir or None,
            defaults=spec.defaults,
            cloud_env=spec.prepared,
        )
    except KvfsError as exc:
        report_error(spec.ready_fd, str(exc))
        return 2
    # files belong to root, as upstream's tmpfs files do; the group is the pod's fsGroup if any
    owner = (0, 0 if config.file_group is None else config.file_group)
    try:
        return serve_volume(
            config,
            spec.mountpoint,
            ready_fd=spec.ready_fd,
            control=socket.socket(fileno=spec.control_fd),
            owner=owner,
            volume_id=spec.volume_id,
        )
    except PreflightError:
        return 1  # the ready line already told the plugin why



def load_entry(name: str) -> DaemonEntry:
    """`module:function` → the entry; importing the module here is what pre-loads it."""
    module_name, _, func_name = name.partition(":")
    if not module_name or not func_name:
        raise ValueError(f"--daemon-entry {name!r}: expected MODULE:FUNCTION")
    module = importlib.import_module(module_name)
    run = getattr(module, func_name)
    if not callable(run):
        raise ValueError(f"--daemon-entry {name!r}: {func_name} is not callable")
    prepare_step = getattr(module, "prepare", None)
    warm_up_step = getattr(module, "warm_up", None)
    return DaemonEntry(
        name, run, prepare_step if callable(prepare_step) else None, warm_up_step if callable(warm_up_step) else None
    )


def preload() -> None:
    """Import what every daemon needs once, in the zygote, so forks share those pages.

    The list includes what httpx, the IDNA codec and the renderer import lazily on a daemon's
    first request: a daemon runs unprivileged and may be unable to read the Python library
    files at all (an interpreter under a root-only home), so nothing may be left to import then.
    """
    for name in (
        "trio",
        "pyfuse3",
        "httpx",
        "httpcore",
        "h11",
        "h2.connection",
        "certifi",
        "importlib.readers",  # certifi.where(), for the default TLS context of the IMDS/NMI client
        "encodings.idna",
        "kvfs.config.parameters",
        "kvfs.daemon.volume",
        "kvfs.vault.client",
        "kvfs.vault.render",
        "kvfs.vault.pkix",
        "cryptography.hazmat.primitives.serialization.pkcs12",
        "kvfs.auth.factory",
    ):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            log.warning("mounter could not pre-load %s: %s", name, exc)
    before_fork()


def before_fork() -> None:
    """In the zygote, before each fork: what forks share is parsed and current (the system CAs)."""
    from kvfs.net.http import share_system_trust

    share_system_trust()
