"""`kvfs csi node`, `kvfs csi mounter` and `kvfs csi status`: argument parsing only.

The lead's `kvfs` CLI calls `add_arguments(subparsers)`; `python -m kvfs.csi.cli ...` works too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from kvfs.config.model import RenderDefaults
from kvfs.config.parameters import DEFAULT_CLOUD_ENV_DIR, GO_FALSE, GO_TRUE
from kvfs.daemon.entry import DEFAULT_ENTRY
from kvfs.logsafe import add_log_options, setup_logging

log = logging.getLogger(__name__)

HELP = "the Kubernetes CSI node plugin, its mounters, and their status"
DESCRIPTION = (
    "Serve kvfs volumes to pods: `kvfs csi node` runs the CSI node plugin kubelet calls (it starts a"
    " mounter unless --no-start-mounter); `kvfs csi mounter` runs, on its own, the process that starts"
    " one daemon per volume; `kvfs csi status` shows the node's mounters and volumes."
)
NODE_DESCRIPTION = (
    "Run the CSI node plugin (Identity and Node services) on a unix socket for kubelet. Each published"
    " volume is mounted here and served by a daemon of its own, with a uid of its own, which the mounter"
    " starts; volumes keep serving while the plugin restarts."
)
MOUNTER_DESCRIPTION = (
    "Run a mounter on its own (e.g. in another container): it takes spawn requests from the plugin on"
    " its socket and forks one daemon per volume from a clean zygote. Daemons outlive it."
)

STATUS_DESCRIPTION = (
    "Show the mounters registered in the state folder (id, pid, version, start time, alive, volumes) and"
    " every volume (pod, volume id, mounter, daemon pid, uid, health, target), probing each mount with a"
    " deadline. Run it where the plugin runs (it reads the state folder only); an old mounter generation"
    " may be deleted once it serves no volume."
)

UID_MAX = 2**31 - 1  # uids at or above 2^31 confuse tools that keep them signed


def uid_range(text: str) -> tuple[int, int]:
    """`START-END`, both inclusive, 1 <= START <= END < 2^31."""
    start_text, sep, end_text = text.partition("-")
    try:
        start, end = int(start_text), int(end_text)
    except ValueError:
        start = end = -1
    if not sep or not 1 <= start <= end <= UID_MAX:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected START-END with 1 <= START <= END <= {UID_MAX}, e.g. 1900000000-1900999999"
            " (one uid per mounted volume; keep it clear of the node's users and subuid ranges)"
        )
    return start, end


def go_bool(text: str) -> bool:
    """A boolean flag's value in Go's syntax (strconv.ParseBool), as upstream's provider flags take it."""
    if text in GO_TRUE:
        return True
    if text in GO_FALSE:
        return False
    raise argparse.ArgumentTypeError(
        f"{text!r}: expected true or false (also 1/0, t/f, TRUE/FALSE); write --FLAG=false to turn a flag off"
    )


class _Removed(argparse.Action):
    """A removed flag that says what replaced it (instead of argparse's "unrecognized arguments")."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: str | None = None) -> None:
        parser.error(
            f"{option} was removed: every volume's daemon now runs with a uid of its own (and gid = uid),"
            " taken from --daemon-uid-range START-END (default 1900000000-1900999999)"
        )


def _run_node(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, pid=True, fmt=args.log_format)
    from kvfs.csi.node import endpoint_path, run_node
    from kvfs.csi.state import SUN_PATH_MAX
    from kvfs.csi.volumes import NodeConfig

    config = NodeConfig(
        node_id=args.node_id,
        state_dir=args.state_dir,
        driver_name=args.driver_name,
        daemon_uid_range=args.daemon_uid_range,
        mounter_socket=args.mounter_socket or "",
        allow_node_identity=args.allow_node_identity,
        allow_inline_parameters=args.allow_inline_parameters,
        cloud_env_dir=args.cloud_env_dir,
        kubelet_dir=args.kubelet_dir,
        kubeconfig=args.kubeconfig or "",
        publish_timeout=args.publish_timeout,
        daemon_entry=args.daemon_entry,
        start_mounter=not args.no_start_mounter,
        mounter_log=args.mounter_log or "",
        log_level=args.log_level,
        log_format=args.log_format,
        max_volumes=args.max_volumes,
        restart_failed_pods=args.restart_pods_with_failed_volumes,
        sync_secrets=args.sync_secrets,
        render_defaults=RenderDefaults(
            split_cert_key=args.write_cert_and_key_in_separate_files, construct_pem_chain=args.construct_pem_chain
        ),
    )
    if args.metrics_addr:
        from kvfs.daemon.metrics import parse_addr
        from kvfs.errors import ConfigError

        try:
            parse_addr(args.metrics_addr)
        except ConfigError as exc:
            print(f"kvfs csi node: {exc}", file=sys.stderr)
            return 2
    try:
        socket_path = endpoint_path(args.endpoint)
    except ValueError as exc:
        print(f"kvfs csi node: {exc} (use unix:///PATH/csi.sock)", file=sys.stderr)
        return 2
    if len(os.fsencode(socket_path)) > SUN_PATH_MAX:
        print(
            f"kvfs csi node: --endpoint {args.endpoint!r}: the socket path is"
            f" {len(os.fsencode(socket_path))} bytes, longer than unix sockets allow ({SUN_PATH_MAX});"
            " use a shorter folder, e.g. unix:///csi/csi.sock",
            file=sys.stderr,
        )
        return 2
    return run_node(config, args.endpoint, health_interval=args.health_interval, metrics_addr=args.metrics_addr)


def _run_mounter(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, pid=True, fmt=args.log_format)
    from kvfs.csi.mounter import Mounter
    from kvfs.csi.mounters import MounterRegistry, new_id

    mounter_id, registry = new_id(), None
    if args.socket:
        socket_path = args.socket
    else:  # one generation among others: its own folder in the state folder
        registry = MounterRegistry(args.state_dir)
        try:
            socket_path = registry.prepare(mounter_id)
        except (OSError, ValueError) as exc:
            print(f"kvfs csi mounter: --state-dir {args.state_dir}: {exc}", file=sys.stderr)
            return 2
    options = {"log_level": args.log_level, "log_format": args.log_format}
    return Mounter(socket_path, args.daemon_entry, mounter_id=mounter_id, registry=registry, **options).serve()


def _run_status(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, fmt=args.log_format)
    from kvfs.csi.status import main as status

    return status(args.state_dir, as_json=args.json)


def _state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir", default="/var/lib/kvfs/csi", metavar="DIR", help="plugin state (default %(default)s)"
    )


def _common(parser: argparse.ArgumentParser) -> None:
    _state_dir(parser)
    add_log_options(parser)
    parser.add_argument(
        "--daemon-entry",
        default=DEFAULT_ENTRY,
        metavar="MODULE:FUNCTION",
        help="what serves one volume (default %(default)s; kvfs.daemon.standin:run for smoke tests)",
    )


def add_arguments(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `node` and `mounter` under the caller's `csi` command."""
    node = subparsers.add_parser(
        "node", help="run the CSI node plugin (Identity + Node services)", description=NODE_DESCRIPTION
    )
    node.add_argument(
        "--endpoint",
        default="unix:///csi/csi.sock",
        metavar="unix:///PATH",
        help="the gRPC socket kubelet calls (default %(default)s)",
    )
    node.add_argument("--node-id", required=True, metavar="NAME", help="this node's name (NodeGetInfo)")
    node.add_argument(
        "--driver-name", default="csi.kvfs.io", metavar="NAME", help="CSI driver name (default %(default)s)"
    )
    node.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig file; default: in-cluster configuration")
    node.add_argument(
        "--daemon-uid-range",
        type=uid_range,
        default="1900000000-1900999999",
        metavar="START-END",
        help="uids for volume daemons, one per volume, gid = uid (default %(default)s)",
    )
    for removed in ("--daemon-uid", "--daemon-gid"):
        node.add_argument(removed, action=_Removed, help=argparse.SUPPRESS)
    node.add_argument(
        "--mounter-socket",
        metavar="PATH",
        help="use only the mounter on this socket (default: the newest live mounter registered in --state-dir)",
    )
    node.add_argument(
        "--allow-node-identity",
        action="store_true",
        help="allow useVMManagedIdentity / usePodIdentity (every pod on the node could read those vaults)",
    )
    node.add_argument(
        "--allow-inline-parameters",
        action="store_true",
        help="let volume attributes overlay the SecretProviderClass and volumes carry every parameter inline"
        " (development clusters and tests: pod authors then bypass policies on SecretProviderClasses)",
    )
    defaults = RenderDefaults()
    for flag, default, meaning in (
        (
            "--write-cert-and-key-in-separate-files",
            defaults.split_cert_key,
            "certificate-backed secrets also get FILE.crt and FILE.key (default false; a class's"
            " writeCertAndKeyInSeparateFiles overrides it)",
        ),
        (
            "--construct-pem-chain",
            defaults.construct_pem_chain,
            "order a PFX's certificates leaf to root (default true; a class's constructPEMChain overrides it)",
        ),
    ):  # upstream's provider flags, with Go's boolean syntax: a bare flag is true
        node.add_argument(
            flag, type=go_bool, nargs="?", const=True, default=default, metavar="BOOL", help=f"node-wide: {meaning}"
        )
    node.add_argument(
        "--sync-secrets",
        action="store_true",
        help="create and update the Kubernetes Secrets a class's secretObjects name, in the pod's namespace (needs"
        " RBAC for Secrets: the sync-secrets component)",
    )
    node.add_argument(
        "--cloud-env-dir",
        default=DEFAULT_CLOUD_ENV_DIR,
        metavar="DIR",
        help="cloudEnvFileName may only name files inside DIR (default %(default)s)",
    )
    node.add_argument(
        "--kubelet-dir",
        default="/var/lib/kubelet",
        metavar="DIR",
        help="kubelet's folder: target paths must lie under DIR/pods/ (default %(default)s)",
    )
    node.add_argument(
        "--publish-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long a publish waits for the daemon's ready (default %(default)s)",
    )
    node.add_argument(
        "--health-interval",
        type=float,
        default=60.0,  # kvfs.csi.volumes.DEFAULT_HEALTH_INTERVAL (not imported: help must stay quick)
        metavar="SECONDS",
        help="between health sweeps of mounted volumes (default %(default)s; 0 = only on kubelet's Probe)",
    )
    node.add_argument("--metrics-addr", default="", metavar="HOST:PORT", help="serve Prometheus metrics (default off)")
    node.add_argument(
        "--max-volumes", type=int, default=0, metavar="N", help="NodeGetInfo max_volumes_per_node (0 = no limit)"
    )
    node.add_argument(
        "--restart-pods-with-failed-volumes",
        action="store_true",
        help="delete the pod of a volume whose daemon died, or whose mount has not answered for a whole health"
        " interval, so its controller makes a fresh one (never a pod without a controller, at most once per pod"
        " per 5 minutes)",
    )
    node.add_argument("--no-start-mounter", action="store_true", help="never start a mounter (it runs elsewhere)")
    node.add_argument(
        "--mounter-log",
        metavar="FILE",
        help="output of a mounter this plugin starts, its zygote's and daemons' too (default: this process's stderr)",
    )
    _common(node)
    node.set_defaults(func=_run_node, command_parser=node)

    mounter = subparsers.add_parser(
        "mounter", help="run the mounter that starts one daemon per volume", description=MOUNTER_DESCRIPTION
    )
    mounter.add_argument(
        "--socket",
        metavar="PATH",
        help="listen here, unregistered (default: register in DIR/mounters/ of --state-dir beside other mounters)",
    )
    _common(mounter)
    mounter.set_defaults(func=_run_mounter, command_parser=mounter)

    status = subparsers.add_parser(
        "status", help="show this node's mounter generations and volumes", description=STATUS_DESCRIPTION
    )
    _state_dir(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_log_options(status)
    status.set_defaults(func=_run_status, command_parser=status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvfs csi", description=DESCRIPTION)
    add_log_options(parser, top_level=True)  # as `kvfs` itself: defaults from the environment
    add_arguments(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
