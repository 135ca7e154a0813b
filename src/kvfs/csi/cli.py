"""`kvfs csi node` and `kvfs csi mounter`: argument parsing only.

The lead's `kvfs` CLI calls `add_arguments(subparsers)`; `python -m kvfs.csi.cli ...` works too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kvfs.csi.daemon import DEFAULT_ENTRY

log = logging.getLogger(__name__)


def _setup_logging(level: str) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=getattr(logging, level.upper(), logging.INFO),
            format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
        )


def _run_node(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from kvfs.csi.node import endpoint_path, run_node
    from kvfs.csi.state import SUN_PATH_MAX
    from kvfs.csi.volumes import NodeConfig

    config = NodeConfig(
        node_id=args.node_id,
        state_dir=args.state_dir,
        driver_name=args.driver_name,
        daemon_uid=args.daemon_uid,
        daemon_gid=args.daemon_gid,
        mounter_socket=args.mounter_socket or "",
        allow_node_identity=args.allow_node_identity,
        kubeconfig=args.kubeconfig or "",
        publish_timeout=args.publish_timeout,
        daemon_entry=args.daemon_entry,
        start_mounter=not args.no_start_mounter,
        mounter_log=args.mounter_log or "",
        log_level=args.log_level,
        max_volumes=args.max_volumes,
    )
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
    _setup_logging(args.log_level)
    from kvfs.csi.daemon import load_entry, preload
    from kvfs.csi.mounter import Mounter

    try:
        entry = load_entry(args.daemon_entry)
    except (ImportError, AttributeError, ValueError) as exc:
        print(f"kvfs csi mounter: --daemon-entry {args.daemon_entry}: {exc}", file=sys.stderr)
        return 2
    preload()
    socket_path = args.socket or os.path.join(args.state_dir, "mounter.sock")
    return Mounter(socket_path, entry, entry_name=args.daemon_entry).serve()


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", default="/var/lib/kvfs/csi", help="plugin state (default %(default)s)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default %(default)s)")
    parser.add_argument(
        "--daemon-entry",
        default=DEFAULT_ENTRY,
        help="MODULE:FUNCTION serving one volume (default %(default)s; kvfs.csi.standin:run for smoke tests)",
    )


def add_arguments(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `node` and `mounter` under the caller's `csi` command."""
    node = subparsers.add_parser("node", help="run the CSI node plugin (Identity + Node services)")
    node.add_argument("--endpoint", default="unix:///csi/csi.sock", help="gRPC endpoint (default %(default)s)")
    node.add_argument("--node-id", required=True, help="this node's name (NodeGetInfo)")
    node.add_argument("--driver-name", default="csi.kvfs.io", help="CSI driver name (default %(default)s)")
    node.add_argument("--kubeconfig", help="kubeconfig file; default: in-cluster configuration")
    node.add_argument("--daemon-uid", type=int, default=65534, help="uid of volume daemons (default %(default)s)")
    node.add_argument("--daemon-gid", type=int, default=65534, help="gid of volume daemons (default %(default)s)")
    node.add_argument("--mounter-socket", help="mounter socket (default STATE_DIR/mounter.sock)")
    node.add_argument(
        "--allow-node-identity",
        action="store_true",
        help="allow useVMManagedIdentity / usePodIdentity (every pod on the node could read those vaults)",
    )
    node.add_argument(
        "--publish-timeout", type=float, default=60.0, help="seconds to wait for a daemon's ready (default %(default)s)"
    )
    node.add_argument("--health-interval", type=float, default=60.0, help="seconds between health sweeps")
    node.add_argument("--metrics-addr", default="", help="HOST:PORT for Prometheus metrics (default off)")
    node.add_argument("--max-volumes", type=int, default=0, help="NodeGetInfo max_volumes_per_node (0 = no limit)")
    node.add_argument("--no-start-mounter", action="store_true", help="never start a mounter (it runs elsewhere)")
    node.add_argument("--mounter-log", help="file for a started mounter's output (default: this process's stderr)")
    _common(node)
    node.set_defaults(func=_run_node)

    mounter = subparsers.add_parser("mounter", help="run the mounter that forks one daemon per volume")
    mounter.add_argument("--socket", help="listen here (default STATE_DIR/mounter.sock)")
    _common(mounter)
    mounter.set_defaults(func=_run_mounter)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvfs csi")
    add_arguments(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
