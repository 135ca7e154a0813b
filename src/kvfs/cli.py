"""The `kvfs` command line: `kvfs mount`, `kvfs emulator`, `kvfs csi node|mounter|status`."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import re
import shutil
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from kvfs import __version__
from kvfs.config.model import MountConfig
from kvfs.errors import ConfigError, KvfsError
from kvfs.logsafe import add_log_options, setup_logging

log = logging.getLogger("kvfs")

HELP_WIDTH = 100  # help text wraps at the terminal's width, but never wider: long lines read badly


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions and epilogs: prose lines are refilled to the width, indented lines (examples,
    tables) are kept as written, so neither a one-line description nor a hand-wrapped epilog runs
    past the terminal."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=min(shutil.get_terminal_size().columns - 2, HELP_WIDTH))

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out: list[str] = []
        prose: list[str] = []

        def flush() -> None:
            if prose:
                out.extend(textwrap.wrap(" ".join(prose), width, initial_indent=indent, subsequent_indent=indent))
                prose.clear()

        for line in text.splitlines():
            if line.strip() and not line[0].isspace():
                prose.append(line.strip())
                continue
            flush()
            out.append(indent + line if line.strip() else "")
        flush()
        return "\n".join(out)


class _Parser(argparse.ArgumentParser):
    """Every `kvfs` parser, subcommands included (argparse builds them with the parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"formatter_class": HelpFormatter, **kwargs})

MOUNT_EPILOG = """\
examples:
  kvfs mount --spc spc.yaml /mnt/secrets
  kvfs mount --spc spc.yaml --param keyvaultName=other-vault \\
      --refresh-interval 30s ./secrets
  kvfs mount --spc spc.yaml --secrets sp.yaml ./secrets   # service principal

identity (chosen like the Azure provider does):
  clientID set          workload identity; the token comes from
                        $AZURE_FEDERATED_TOKEN_FILE
  --secrets FILE        service principal: a flat YAML/JSON mapping with
                        clientid and clientsecret
  useVMManagedIdentity  VM managed identity (IMDS; base URL from
                        $AZURE_POD_IDENTITY_AUTHORITY_HOST)
  usePodIdentity        pod identity (NMI at $KVFS_NMI_URL;
                        --param csi.storage.k8s.io/pod.name=NAME and
                        --param csi.storage.k8s.io/pod.namespace=NAMESPACE)
  none of these         azure-identity's DefaultAzureCredential (az login,
                        environment, ...)

environment:
  SSL_CERT_FILE         extra trusted CA certificates (private clouds,
                        `kvfs emulator`)
  KVFS_LOG_LEVEL        default for --log-level
  KVFS_LOG_FORMAT       default for --log-format (text or json)

before mounting, kvfs gets the volume's Key Vault token and reaches the vault host once (no
object is fetched): a refused identity, a vault host that does not exist or a TLS certificate
that is not trusted fails the mount with the service's code and the fix; a timeout or an
unreachable service does not (the first read tries again). --no-preflight skips the check.

exit status: 0 after a clean unmount, 2 for bad input (nothing mounted), 1 when mounting failed
(the preflight's refusal included)

a mount whose process was killed ("Transport endpoint is not connected"):
  fusermount3 -u MOUNTPOINT   (as root also: umount MOUNTPOINT), then mount again
"""


def _add_mount(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "mount",
        help="mount a SecretProviderClass as a read-only folder (stays in the foreground)",
        description="Mount the objects of a SecretProviderClass manifest as read-only files. "
        "Objects are fetched when first read, cached, and refreshed in the background. "
        "Stays in the foreground; SIGTERM or Ctrl-C unmounts cleanly.",
        epilog=MOUNT_EPILOG,
    )
    parser.add_argument("--spc", required=True, metavar="FILE", help="SecretProviderClass manifest (YAML)")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing empty directory")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter, as a pod's volumeAttributes do (repeatable)",
    )
    parser.add_argument(
        "--secrets",
        metavar="FILE",
        help="what a nodePublishSecretRef gives: flat YAML/JSON with clientid and clientsecret",
    )
    parser.add_argument(
        "--refresh-interval",
        metavar="DURATION",
        help="how often objects that were read are refreshed: seconds or 30s, 2m, 1h (default 2m; 0 = never)",
    )
    parser.add_argument(
        "--max-staleness",
        metavar="DURATION",
        help="stop serving cached bytes this long after the last successful refresh "
        "(default: serve the last good bytes while Key Vault is unreachable)",
    )
    parser.add_argument(
        "--write-cert-and-key-in-separate-files",
        action="store_true",
        help="also show <name>.crt and <name>.key for certificate-backed secrets (like the Azure provider's flag)",
    )
    parser.add_argument(
        "--no-preflight",
        action="store_true",
        help="mount without first getting the Key Vault token and reaching the vault host"
        " (identity mistakes then show as EACCES/EIO on read instead of failing the mount)",
    )
    parser.add_argument(
        "--metrics-addr",
        metavar="HOST:PORT",
        default="",
        help="serve Prometheus metrics on HOST:PORT while mounted (docs/METRICS.md; default off)",
    )
    parser.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users read the mount (non-root needs user_allow_other in /etc/fuse.conf)",
    )
    add_log_options(parser)
    parser.set_defaults(func=_run_mount, command_parser=parser)


def _mount_config(args: argparse.Namespace) -> MountConfig:
    from kvfs.config.parameters import parse_duration, parse_parameters
    from kvfs.config.spc import load_manifest, load_secrets_file, overlay

    manifest = load_manifest(args.spc)
    params = overlay(manifest.parameters, args.param)
    secrets = load_secrets_file(args.secrets) if args.secrets else None
    config = parse_parameters(params, secrets, context="cli")
    token_file = config.auth.sa_token_file
    if config.auth.mode == "workload_identity" and not config.auth.sa_token and not os.path.isfile(token_file):
        raise ConfigError(
            "AZURE_FEDERATED_TOKEN_FILE",
            token_file,
            "no such file; workload identity (clientID) reads the service account token from it",
            "export AZURE_FEDERATED_TOKEN_FILE=/path/to/token, or drop clientID to use another identity",
        )
    return dataclasses.replace(
        config,
        refresh_interval=(
            config.refresh_interval
            if args.refresh_interval is None
            else parse_duration(args.refresh_interval, "--refresh-interval")
        ),
        max_staleness=(
            config.max_staleness
            if args.max_staleness is None
            else parse_duration(args.max_staleness, "--max-staleness")
        ),
        split_cert_key=config.split_cert_key or args.write_cert_and_key_in_separate_files,
        secret_provider_class=config.secret_provider_class or manifest.name,
    )


def _beneath_real_parent(given: str) -> str:
    """The absolute path with its parent's symlinks resolved, as the mount table names mounts; the
    path itself is never touched (its daemon may hang)."""
    absolute = os.path.abspath(given)
    return os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))


def _check_mountpoint(given: str) -> str:
    """The absolute mountpoint, if it is an existing, empty, live directory; else a ConfigError.

    Checked before mounting because libfuse3 mounts over anything: a non-empty folder's files
    would silently vanish under the mount, a dead mount left by a killed process only says
    "Transport endpoint is not connected", and a live kvfs mount is named with its process.
    """
    from kvfs.csi.mountinfo import is_kvfs_mount
    from kvfs.daemon.report import serving_pid

    mountpoint = os.path.abspath(given)
    if is_kvfs_mount(_beneath_real_parent(given)):
        pid = serving_pid(mountpoint)
        if pid is not None:
            raise ConfigError(
                "MOUNTPOINT",
                given,
                f"is already mounted by kvfs (pid {pid})",
                f"stop that mount first (Ctrl-C in its terminal, or kill {pid}), or choose another folder",
            )
    try:
        entries = os.listdir(mountpoint)
    except FileNotFoundError:
        raise ConfigError("MOUNTPOINT", given, "does not exist", f"create it first: mkdir -p {given}") from None
    except NotADirectoryError:
        raise ConfigError("MOUNTPOINT", given, "is not a directory", "give an empty directory") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise ConfigError(
                "MOUNTPOINT",
                given,
                "is a dead FUSE mount (its process was killed)",
                f"unmount it first: fusermount3 -u {given}",
            ) from None
        raise ConfigError("MOUNTPOINT", given, f"cannot be read ({exc.strerror})", "give an empty directory") from None
    if entries:
        raise ConfigError(
            "MOUNTPOINT",
            given,
            f"is not empty ({len(entries)} entries, e.g. {sorted(entries)[0]!r}); the mount would hide them",
            "give an empty directory",
        )
    return mountpoint


def _run_mount(args: argparse.Namespace) -> int:
    config = _mount_config(args)
    if args.metrics_addr:
        from kvfs.daemon.metrics import parse_addr

        parse_addr(args.metrics_addr)  # a bad address is refused before anything is mounted
    mountpoint = _check_mountpoint(args.mountpoint)
    from kvfs.daemon.volume import run_mount

    return run_mount(
        config, mountpoint, allow_other=args.allow_other, preflight=not args.no_preflight, metrics_addr=args.metrics_addr
    )


STATUS_EPILOG = """\
examples:
  kvfs status ./secrets                  a kvfs mount of this user
  kvfs status --json ./secrets | jq '.objects[] | select(.error)'
  kvfs status /var/lib/kubelet/pods/UID/volumes/kubernetes.io~csi/NAME/mount
                                         a CSI volume's target path, on its node, as root

exit status: 0 shown, 2 not a kvfs mount, 1 its daemon did not answer (on a dead mount, whose
process was killed, it says how to clean up: fusermount3 -u MOUNTPOINT for a kvfs mount)
"""


def _add_status(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "status",
        help="show what one mount serves: each object's version, fetch times and last error; its identity",
        description="Ask the daemon serving MOUNTPOINT (a `kvfs mount` folder or a CSI volume's target path)"
        " for its live state: per object the file, the version served, when it was fetched and last refreshed,"
        " the last error and its time; the identity in use and its token's expiry.",
        epilog=STATUS_EPILOG,
    )
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="a kvfs mount's folder, or a CSI target path")
    parser.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    parser.add_argument(
        "--state-dir",
        default="/var/lib/kvfs/csi",
        metavar="DIR",
        help="the CSI plugin's state folder, where volumes' control sockets are (default %(default)s)",
    )
    add_log_options(parser)
    parser.set_defaults(func=_run_status, command_parser=parser)


def _run_status(args: argparse.Namespace) -> int:
    import json

    from kvfs.csi.mountinfo import is_kvfs_mount
    from kvfs.csi.state import control_socket_of
    from kvfs.daemon import jsonline
    from kvfs.daemon.report import daemon_status, find_control_socket, render

    mountpoint = _beneath_real_parent(args.mountpoint)
    if not is_kvfs_mount(mountpoint):
        raise ConfigError(
            "MOUNTPOINT", args.mountpoint, "is not a kvfs mount", "give the folder of a kvfs mount or a CSI target path"
        )
    csi_socket = control_socket_of(args.state_dir, mountpoint)
    path = find_control_socket(mountpoint, [str(csi_socket)])
    if path is None:
        problem = (
            "no control socket found for this mount (its process was killed, or it is another user's;"
            " a CSI volume's is in the plugin's --state-dir, readable by root)"
        )
    else:
        try:
            status = daemon_status(path)
        except jsonline.ProtocolError as exc:
            problem = f"its daemon did not answer on {path}: {exc}"
        else:
            status.pop("ok", None)
            print(json.dumps(status, indent=2) if args.json else render(status))
            return 0
    print(f"kvfs status: {args.mountpoint}: {problem}", file=sys.stderr)
    dead = _dead_mount_fix(args.mountpoint, mountpoint, csi=os.path.isdir(csi_socket.parent))  # False, not EACCES, in root's state dir
    if dead:
        print(f"kvfs status: {args.mountpoint}: {dead}", file=sys.stderr)
    return 1


def _dead_mount_fix(given: str, mountpoint: str, *, csi: bool) -> str:
    """What to do about a mount whose daemon is gone, if it is (a bounded statfs says ENOTCONN);
    "" for a live or hung one, which only its daemon's state can explain."""
    import shlex

    from kvfs.csi.mountinfo import Health, probe_mount

    probe = probe_mount(mountpoint)
    if probe.health is not Health.DEAD:
        return ""
    what = f"a dead mount: the process that served it is gone ({probe.detail})"
    if csi:
        return (
            f"{what}; a CSI volume cannot be revived: recreate its pod (kvfs csi status lists the volume;"
            " the plugin unmounts it when kubelet unpublishes it)"
        )
    folder = shlex.quote(given)
    return f"{what}; unmount it with fusermount3 -u {folder} (as root, umount {folder} works too), then mount again"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kvfs",
        description="Azure Key Vault secrets, keys and certificates as a lazy, cached, read-only filesystem.",
    )
    parser.add_argument("--version", action=_Version, help="show the versions of kvfs, Python, pyfuse3 and libfuse")
    add_log_options(parser, top_level=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_mount(subparsers)
    _add_status(subparsers)

    from kvfs.emulator import cli as emulator_cli

    emulator = subparsers.add_parser(
        "emulator",
        help="run a local Key Vault + Entra ID + OIDC issuer for development and tests",
        description="Serve a local imitation of Azure Key Vault, Entra ID, a Kubernetes OIDC issuer, "
        "IMDS and NMI over HTTPS on loopback, until SIGTERM.",
    )
    emulator_cli.add_arguments(emulator)
    add_log_options(emulator, level=False)  # the emulator has a --log-level of its own
    emulator.set_defaults(func=emulator_cli.run, command_parser=emulator)

    from kvfs.csi import cli as csi_cli

    csi = subparsers.add_parser("csi", help=csi_cli.HELP, description=csi_cli.DESCRIPTION)
    csi_cli.add_arguments(csi.add_subparsers(dest="csi_command", metavar="COMMAND", required=True))
    return parser


def libfuse_version() -> str:
    """The libfuse 3 that pyfuse3 loads, asked directly (importing pyfuse3 would slow every command)."""
    import ctypes  # --version only, as below: `kvfs mount` starts without them

    try:
        lib = ctypes.CDLL("libfuse3.so.3")
    except OSError:
        return "not found (install fuse3)"
    try:
        lib.fuse_pkgversion.restype = ctypes.c_char_p
        return str(lib.fuse_pkgversion().decode())
    except AttributeError:  # only fuse_version(): 314 means 3.14
        number = int(lib.fuse_version())
        return f"{number // 100}.{number % 100}"


def version_text() -> str:
    import platform
    from importlib import metadata

    try:
        pyfuse3 = metadata.version("pyfuse3")
    except metadata.PackageNotFoundError:
        pyfuse3 = "not installed"
    return "\n".join(
        (f"kvfs {__version__}", f"Python {platform.python_version()}", f"pyfuse3 {pyfuse3}", f"libfuse {libfuse_version()}")
    )


class _Version(argparse.Action):
    """`--version`: print what a bug report needs, then exit (looked up only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: str | None = None) -> None:
        print(version_text())
        parser.exit()


_DURATION_OPTIONS = ("--refresh-interval", "--max-staleness")


def _attach_dash_values(argv: Sequence[str]) -> list[str]:
    """`--refresh-interval -5s` → `--refresh-interval=-5s`.

    argparse takes a value starting with "-" for an option and only says "expected one
    argument"; attached, the value reaches parse_duration, which names it and the fix.
    """
    out: list[str] = []
    items = iter(argv)
    for item in items:
        if item in _DURATION_OPTIONS:
            value = next(items, None)
            if value is not None and value.startswith("-") and value[1:2].isdigit():
                out.append(f"{item}={value}")
                continue
            out.append(item)
            if value is not None:
                out.append(value)
            continue
        out.append(item)
    return out


# a unit written as a word of its own after a number: `--refresh-interval 5 minutes`
_UNIT_WORDS = {"ms": "ms", "millisecond": "ms", "s": "s", "sec": "s", "second": "s",
               "m": "m", "min": "m", "minute": "m", "h": "h", "hr": "h", "hour": "h"}  # fmt: skip


def _split_duration(argv: Sequence[str]) -> tuple[str, str]:
    """(the error, the unit word) when a duration option's number is followed by a unit word."""
    for i, item in enumerate(argv):
        option, attached, value = item.partition("=")
        if option not in _DURATION_OPTIONS:
            continue
        rest = list(argv[i + 1 :]) if attached else list(argv[i + 2 :])
        value = value if attached else (argv[i + 1] if i + 1 < len(argv) else "")
        word = rest[0].lower() if rest else ""
        unit = _UNIT_WORDS.get(word) or _UNIT_WORDS.get(word.removesuffix("s"))
        if unit and re.fullmatch(r"\d+(?:\.\d+)?", value):
            return (
                f"{option} {value} {rest[0]}: a duration is one word: {option} {value}{unit}"
                " (e.g. 30s, 2m, 1h, 1m30s)",
                rest[0],
            )
    return "", ""


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse, reporting leftovers with the command's own usage (not the top-level one)."""
    args, extra = parser.parse_known_args(_attach_dash_values(argv))
    command_parser: argparse.ArgumentParser = getattr(args, "command_parser", parser)
    split, word = _split_duration(argv)
    # the unit word may have been taken for MOUNTPOINT: fine only if that folder exists
    if split and (extra or not os.path.isdir(word)):
        command_parser.error(split)
    if extra:
        command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(build_parser(), sys.argv[1:] if argv is None else argv)
    setup_logging(args.log_level, fmt=args.log_format)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"kvfs: error: {err}", file=sys.stderr)
        return 2
    except KvfsError as err:  # messages are safe to show by contract: no secrets, no tokens
        print(f"kvfs: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
