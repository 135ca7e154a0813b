"""`kvfs emulator`: run the local Key Vault + Entra ID emulator in the foreground until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from kvfs.logsafe import setup_logging

if TYPE_CHECKING:  # the server stack is imported only when the emulator runs: `kvfs --help` stays fast
    from .server import Emulator

log = logging.getLogger(__name__)

# An installed kvfs and a source checkout take the extra differently; name both.
EXTRA_INSTALL = "pip install 'kvfs[emulator]' (in a kvfs checkout: pip install '.[emulator]')"

DESCRIPTION = """\
Serve an emulated Azure Key Vault (secrets, keys, certificates) and Entra ID (token endpoint,
OIDC issuer for service account tokens, IMDS, NMI) on loopback over HTTPS with a generated CA.
When ready it writes DIR/emulator.json (tenant_id, authority_host, ca_file, cloud_env_file, vaults,
app {client_id, client_secret}, sa_token_file, admin_token_file, ...) and prints the environment to
export. Every file in DIR is private (0600). Restarted with the same DIR it keeps its CA, tenant,
app, ports, admin token and vault content, so open mounts keep working; --fresh starts over.

Admin API (faults, counters, content): GET/POST https://localhost:PORT/_emulator/... with
"Authorization: Bearer $(cat DIR/admin-token)" (docs/EMULATOR.md).
"""


def _port(text: str) -> int:
    """argparse type: a TCP port, 0 meaning "pick a free one"."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535; 0 picks a free port)")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `kvfs emulator` (the top-level CLI wires this up)."""
    parser.description = DESCRIPTION
    parser.add_argument("--dir", required=True, type=Path, metavar="DIR",
                        help="folder for emulator.json, ca.pem, cloud-env.json, sa-token, admin-token, keys and "
                             "saved state (created 0700 if missing; reused on restart)")
    parser.add_argument("--fresh", action="store_true",
                        help="discard the state saved in DIR (tenant, keys, ports, vault content) and start over")
    parser.add_argument("--host", default="127.0.0.1", metavar="ADDR",
                        help="address to listen on (default: 127.0.0.1; keep it on loopback: it serves credentials)")
    parser.add_argument("--port", type=_port, default=0, metavar="PORT",
                        help="HTTPS port for Key Vault, Entra ID, OIDC and the admin API "
                             "(default: 0 = the saved one on a restart, else a free one)")
    parser.add_argument("--http-port", type=_port, default=0, metavar="PORT",
                        help="plain-HTTP port for IMDS and NMI (default: 0 = the saved one on a restart, else a free one)")
    parser.add_argument("--seed", type=Path, metavar="FILE",
                        help="YAML file with initial vault content (secrets, keys, certificates; see docs/EMULATOR.md)")
    parser.add_argument("--vault", action="append", metavar="NAME", dest="vaults",
                        help="vault to serve as https://NAME.vault.localhost:PORT/ (repeatable; default: demo)")
    parser.add_argument("--token-lifetime", type=int, default=3600, metavar="SECONDS",
                        help="lifetime of issued access tokens in seconds (default: 3600)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level for the emulator's own messages (default: INFO)")


def summary(emu: Emulator) -> str:
    """The human summary printed once the emulator serves (no secrets: those are in emulator.json)."""
    info = emu.info
    lines = [f"kvfs emulator ready (tenant {emu.tenant_id})"]
    for name, url in info["vaults"].items():
        lines.append(f"  vault {name}: {url}")
    lines += [
        f"  authority:   {emu.authority_host}/",
        f"  IMDS / NMI:  {emu.imds_url}",
        f"  admin:       {emu.admin_url}/  (Authorization: Bearer $(cat {emu.admin_token_file}))",
        f"  files:       {emu.dir / 'emulator.json'} (app client secret inside), {emu.ca_file},",
        f"               {emu.cloud_env_file}, {emu.sa_token_file}",
        "export:",
        f"  export SSL_CERT_FILE={emu.ca_file} REQUESTS_CA_BUNDLE={emu.ca_file}",
        f"  export AZURE_TENANT_ID={emu.tenant_id} AZURE_CLIENT_ID={info['app']['client_id']}",
        f"  export AZURE_AUTHORITY_HOST={emu.authority_host}/ AZURE_FEDERATED_TOKEN_FILE={emu.sa_token_file}",
        f"  export AZURE_POD_IDENTITY_AUTHORITY_HOST={emu.imds_url} KVFS_NMI_URL={emu.nmi_url}",
        "(stop with Ctrl-C or SIGTERM)",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; 0 on a clean stop, 2 on bad input or state, 1 when the ports are taken."""
    try:
        import hypercorn  # noqa: F401
        import starlette  # noqa: F401
    except ImportError as err:
        print(f"kvfs emulator: {err.name or 'its web stack'} is not installed; install the emulator's extra:"
              f" {EXTRA_INSTALL}", file=sys.stderr)
        return 2
    import trio

    from .seed import SeedError, load_seed

    setup_logging(args.log_level, fmt=getattr(args, "log_format", "text"))
    if args.dir.exists() and not args.dir.is_dir():
        print(f"kvfs emulator: --dir {args.dir}: is not a directory (name a folder for emulator.json)",
              file=sys.stderr)
        return 2
    if args.token_lifetime < 60:
        print(f"kvfs emulator: --token-lifetime {args.token_lifetime}: must be at least 60 seconds", file=sys.stderr)
        return 2
    seed: dict[str, object] = {}
    if args.seed is not None:
        try:
            seed = load_seed(args.seed)
        except SeedError as err:
            print(f"kvfs emulator: {err}", file=sys.stderr)
            return 2
    vaults = tuple(args.vaults or ["demo"])
    try:
        trio.run(_serve, args, seed, vaults)
    except ValueError as err:  # SeedError, StateError, bad vault names
        print(f"kvfs emulator: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"kvfs emulator: {err.strerror or err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


async def _serve(args: argparse.Namespace, seed: dict[str, object], vaults: tuple[str, ...]) -> None:
    import trio

    from .server import open_emulator

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_emulator(
            args.dir, seed=seed, vaults=vaults, token_lifetime=args.token_lifetime,
            host=args.host, port=args.port, http_port=args.http_port, fresh=args.fresh,
        ) as emu:
            print(summary(emu), flush=True)
            async for signum in signals:
                log.info("stopping on %s", signal.Signals(signum).name)
                break
