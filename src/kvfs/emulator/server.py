"""`kvfs emulator` in-process: HTTPS Key Vault + Entra ID on one port, IMDS/NMI on a plain-HTTP port.

`open_emulator()` runs it inside the caller's trio world; `EmulatorThread` runs the same thing in
a background thread (for tests that do blocking file I/O on a real mount). Both yield an
`Emulator`: the files it wrote, its URLs, and thread-safe knobs (content, grants, faults, counts).

Host names: vaults are `https://<name>.vault.localhost:P/` (routed by the Host header), the
authority is `https://localhost:P/`, and the Key Vault token resource is `https://vault.localhost:P`.
Any other Host (but loopback IPs and the `--host` address) is refused on both ports: a web page
whose name rebinds to 127.0.0.1 must not reach the client secret (DNS rebinding).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import re
import socket
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app
from starlette.routing import Router
from starlette.types import Receive, Scope, Send

from . import pki
from .admin import PREFIX as ADMIN_PREFIX
from .admin import Admin
from .faults import Counts, Faults
from .identity import IdentityProvider
from .seed import apply_seed, seed_vault_names
from .state import FRESH_HINT, StateDir, StateError, why, write_private
from .vault_api import ApiError, VaultApi, send_json
from .vaults import Kind, VaultStore

log = logging.getLogger(__name__)

VAULT_SUFFIX = ".vault.localhost"
VAULT_NAME_RE = re.compile(r"^[a-zA-Z](?!.*--)[0-9a-zA-Z-]{1,22}[0-9a-zA-Z]$")
SA_NAMESPACE = "default"
SA_NAME = "workload"


class Emulator:
    """A running emulator: its files, URLs and knobs. Mutating methods are thread-safe."""

    def __init__(
        self,
        *,
        files: StateDir,
        host: str,
        https_port: int,
        http_port: int,
        identity: IdentityProvider,
        store: VaultStore,
        faults: Faults,
        counts: Counts,
        admin_token: str,
        token_lifetime: int,
    ) -> None:
        self.files = files
        self.dir = files.dir
        self.host = host
        self.https_port = https_port
        self.http_port = http_port
        self.identity = identity
        self.store = store
        self.faults = faults
        self.counts = counts
        # the identity provider holds the tenant and its URLs; these are views of it
        self.tenant_id = identity.tenant_id
        self.authority_host = identity.authority_host
        self.kv_resource = identity.kv_resource
        self.oidc_issuer = identity.oidc_issuer
        self.imds_url = f"http://{_url_host(host)}:{http_port}"
        self.nmi_url = self.imds_url
        self.admin_url = f"{self.authority_host}/_emulator"
        self.admin_token = admin_token
        self.admin_token_file = files.admin_token
        self.ca_file = files.ca
        self.cloud_env_file = files.cloud_env
        self.sa_token_file = files.sa_token
        self.token_lifetime = token_lifetime
        self.info: dict[str, Any] = {}

    def admin_headers(self) -> dict[str, str]:
        """The header the admin API needs."""
        return {"Authorization": f"Bearer {self.admin_token}"}

    def rotate_sa_token(self) -> None:
        """Write a new service account token to `sa_token_file`, as kubelet refreshes projected tokens."""
        token = self.identity.mint_sa_token(SA_NAMESPACE, SA_NAME, lifetime=self.sa_token_lifetime)
        write_private(self.sa_token_file, token.encode())

    @property
    def sa_token_lifetime(self) -> int:
        return max(self.token_lifetime, 3600)

    # -- addresses ------------------------------------------------------------------------------
    def vault_url(self, vault: str) -> str:
        """`https://<vault>.vault.localhost:P/` — what the Azure SDK and kvfs take."""
        return f"https://{self.store.vault(vault).name}{VAULT_SUFFIX}:{self.https_port}/"

    # -- content --------------------------------------------------------------------------------
    def add_vault(self, vault: str) -> str:
        """Serve another vault (the server cert's wildcard covers it); returns its URL."""
        self.store.add_vault(vault, f"https://{vault}{VAULT_SUFFIX}:{self.https_port}")
        self.store.grant(vault, self.identity.default_app.client_id)
        return self.vault_url(vault)

    def set_secret(
        self,
        vault: str,
        name: str,
        value: str,
        *,
        content_type: str | None = None,
        enabled: bool = True,
        tags: dict[str, str] | None = None,
    ) -> str:
        """Add a new version of a secret; returns the version id."""
        return self.store.set_secret(vault, name, value, content_type=content_type, enabled=enabled, tags=tags).version

    def set_enabled(self, vault: str, kind: Kind, name: str, version: str | None, enabled: bool) -> None:
        """Enable or disable one version (latest when `version` is None); certificates mirror to key+secret."""
        self.store.update(vault, kind, name, version, enabled=enabled)

    def import_key(self, vault: str, name: str, private_key: pki.PrivateKey, *, hsm: bool = False) -> str:
        return self.store.add_key(vault, name, private_key, hsm=hsm).version

    def import_certificate(
        self,
        vault: str,
        name: str,
        *,
        pem: bytes | None = None,
        pfx: bytes | None = None,
        content_type: str | None = None,
        password: str | None = None,
        keep_value: bool = False,
    ) -> str:
        """Store a certificate bundle and its backing key and secret (same version); returns the version.

        `keep_value` stores the given PEM text, or the PFX as base64, as the backing secret's value
        byte for byte (bag order, text between PEM blocks) instead of re-serialising it, so tests
        can feed kvfs layouts other vaults or importers produce.
        """
        if (pem is None) == (pfx is None):
            raise ValueError("import_certificate: give exactly one of pem= or pfx=")
        material = pki.parse_pem_bundle(pem) if pem is not None else pki.parse_pfx(pfx or b"", password)
        ctype = content_type or (pki.PEM if pem is not None else pki.PKCS12)
        value: str | None = None
        if keep_value:
            value = pem.decode("utf-8") if pem is not None else base64.b64encode(pfx or b"").decode("ascii")
        return self.store.add_certificate(
            vault, name, material, content_type=ctype, issuer="Unknown", secret_value=value
        ).version

    def grant(self, vault: str, client_id: str) -> None:
        self.store.grant(vault, client_id)

    def revoke(self, vault: str, client_id: str) -> None:
        self.store.revoke(vault, client_id)

    # -- counters -------------------------------------------------------------------------------
    def count(self, vault: str | None = None, route: str | None = None, client_id: str | None = None) -> int:
        """Requests seen matching every filter given; identity routes count with vault None."""
        return self.counts.count(vault, route, client_id)

    def reset_counts(self) -> None:
        self.counts.reset()

    def __repr__(self) -> str:
        return f"Emulator(dir={str(self.dir)!r}, https_port={self.https_port}, vaults={self.store.names()})"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _bind(host: str, port: int, saved_in: Path | None = None) -> socket.socket:
    """A listening socket; `saved_in` names the state file the port comes from, for the error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if saved_in is None:
            fix = "choose another --port/--http-port"
        else:
            fix = (f"the port saved in {saved_in}; stop whatever holds it, choose --port/--http-port, "
                   "or start over with --fresh")
        raise OSError(err.errno, f"cannot listen on {host}:{port}: {err.strerror} ({fix})") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _is_loopback(host: str) -> bool:
    """`localhost`, and IP literals in 127.0.0.0/8 or ::1 (brackets allowed)."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_allowed(host: str, listen: str) -> bool:
    """Whether to serve a request with this Host header (port optional): loopback names and IPs,
    `vault.localhost`, `<vault>.vault.localhost` and the literal `--host` address. Any other name
    may be a web page whose DNS name was rebound to 127.0.0.1."""
    name = host_name(host).rstrip(".")
    if name == VAULT_SUFFIX[1:] or name.endswith(VAULT_SUFFIX) or _is_loopback(name):
        return True
    return bool(name) and name.strip("[]") == listen.strip("[]").lower()


class _App:
    """Top-level ASGI app: Host check, then admin, vault hosts, identity HTTPS routes, identity HTTP routes."""

    def __init__(self, emu: Emulator, api: VaultApi, admin: Admin) -> None:
        self.emu = emu
        self.api = api
        self.admin = admin
        self.https_router = Router(routes=list(emu.identity.https_routes()), default=_not_found)
        self.http_router = Router(routes=list(emu.identity.http_routes()), default=_not_found)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            host = _host(scope)
            if not host_allowed(host, self.emu.host):
                await _misdirected(host, self.emu.host, send)
                return
            if scope.get("scheme") == "https":
                if scope["path"].startswith(ADMIN_PREFIX):
                    await self.admin(scope, receive, send)
                    return
                if host.endswith(VAULT_SUFFIX):
                    await self.api.handle(host[: -len(VAULT_SUFFIX)], scope, receive, send)
                    return
                await self.https_router(scope, receive, send)
                return
            await self.http_router(scope, receive, send)
        except Exception:  # noqa: BLE001 - never let one request take the server down
            log.exception("unexpected error serving %s %s", scope.get("method"), scope.get("path"))
            raise


def _host(scope: Scope) -> str:
    for k, v in scope.get("headers", []):
        if k == b"host":
            return host_name(v.decode("latin-1"))
    return ""


def host_name(header: str) -> str:
    """The name in a Host header: lower case, without the port; an IPv6 literal keeps its brackets."""
    host = header.lower()
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if ":" in host else host


async def _misdirected(host: str, listen: str, send: Send) -> None:
    also = "" if _is_loopback(listen) else f", {listen}"
    err = ApiError(
        421, "MisdirectedRequest",
        f"Host {host[:100]!r} is not served here: the emulator answers only localhost, <vault>.vault.localhost, "
        f"127.0.0.1 and [::1]{also} (a guard against DNS rebinding).",
    )
    await send_json(send, 421, err.body(), {})


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    err = ApiError(404, "NotFound", f"The requested resource {scope.get('path', '')[:200]} does not exist.")
    await send_json(send, 404, err.body(), {})


class _Server:
    """hypercorn's per-connection server on our own sockets, remembering each connection's socket
    so an injected fault can drop it (ASGI has no way to abort a connection)."""

    def __init__(self, config: Config) -> None:
        self.app: Any = None
        self.config = config
        self.context = WorkerContext(None)
        self.conns: dict[tuple[str, int], trio.socket.SocketType] = {}

    async def drop(self, scope: Scope) -> None:
        client = scope.get("client")
        sock = self.conns.get((client[0], client[1])) if client else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    async def _handle(self, stream: Any) -> None:
        raw = stream.transport_stream.socket if isinstance(stream, trio.SSLStream) else stream.socket
        try:
            peer = raw.getpeername()
        except OSError:
            await stream.aclose()
            return
        key = (peer[0], peer[1])
        self.conns[key] = raw
        try:
            await TCPServer(self.app, self.config, self.context, {}, stream)
        finally:
            self.conns.pop(key, None)

    async def serve(
        self, https_sock: socket.socket, http_sock: socket.socket,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        ssl_context = self.config.create_ssl_context()
        assert ssl_context is not None
        tls = trio.SSLListener(
            trio.SocketListener(trio.socket.from_stdlib_socket(https_sock)), ssl_context, https_compatible=True
        )
        plain = trio.SocketListener(trio.socket.from_stdlib_socket(http_sock))
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(trio.serve_listeners, self._handle, [tls, plain], handler_nursery=nursery))
            task_status.started()


@asynccontextmanager
async def open_emulator(
    dir: Path | None = None,
    *,
    seed: dict[str, Any] | None = None,
    vaults: Sequence[str] = ("demo",),
    token_lifetime: int = 3600,
    host: str = "127.0.0.1",
    port: int = 0,
    http_port: int = 0,
    fresh: bool = False,
) -> AsyncIterator[Emulator]:
    """Start the emulator in this trio run; writes DIR/emulator.json (atomically) once serving.

    A DIR an earlier emulator used brings back its tenant, keys, ports (when `port`/`http_port`
    are 0), admin token and vault content; `fresh=True` discards that state first.
    """
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="kvfs-emulator-")
        dir = Path(tmp.name)
    files = StateDir(Path(dir))
    try:
        files.prepare(fresh=fresh)
        saved = files.read_json(files.tenant)
        if not _is_loopback(host):
            log.warning("listening on %s, which is not loopback: the emulator serves credentials; keep it on loopback",
                        host)
        https_sock, http_sock = _listen(files, saved, host, port, http_port)
        try:
            emu = _build(files, saved, host, https_sock, http_sock, seed or {}, vaults, token_lifetime)
            config = _hypercorn_config(files)
            server = _Server(config)
            api = VaultApi(
                emu.store, identity=emu.identity, faults=emu.faults, counts=emu.counts,
                authority_host=emu.authority_host, tenant_id=emu.tenant_id, kv_resource=emu.kv_resource,
                dropper=server.drop,
            )
            app = _App(emu, api, Admin(emu))
            server.app = wrap_app(app, config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, https_sock, http_sock)
                nursery.start_soon(_refresh_sa_token, emu)
                write_private(files.info, json.dumps(emu.info, indent=2).encode() + b"\n")
                log.info("emulator serving on %s (vaults: %s)", emu.authority_host, ", ".join(emu.store.names()))
                try:
                    yield emu
                finally:
                    files.info.unlink(missing_ok=True)
                    nursery.cancel_scope.cancel()
        finally:
            https_sock.close()
            http_sock.close()
    finally:
        if tmp is not None:
            tmp.cleanup()


def _listen(
    files: StateDir, saved: dict[str, Any] | None, host: str, port: int, http_port: int
) -> tuple[socket.socket, socket.socket]:
    """Both listening sockets; a port given as 0 is the saved one, if any, else a free one."""
    saved_https = int(saved.get("https_port", 0)) if saved and not port else 0
    saved_http = int(saved.get("http_port", 0)) if saved and not http_port else 0
    https_sock = _bind(host, saved_https or port, files.tenant if saved_https else None)
    try:
        http_sock = _bind(host, saved_http or http_port, files.tenant if saved_http else None)
    except OSError:
        https_sock.close()
        raise
    return https_sock, http_sock


def _hypercorn_config(files: StateDir) -> Config:
    config = Config()
    config.certfile = str(files.server_cert)
    config.keyfile = str(files.server_key)
    config.alpn_protocols = ["http/1.1"]
    config.keep_alive_timeout = 30
    config.backlog = 1024
    config.accesslog = None
    config.errorlog = logging.getLogger("kvfs.emulator.http")
    return config


def _build(
    files: StateDir, saved: dict[str, Any] | None, host: str, https_sock: socket.socket, http_sock: socket.socket,
    seed: dict[str, Any], vaults: Sequence[str], token_lifetime: int,
) -> Emulator:
    """The emulator of this folder: the saved one on a restart, else a new tenant; writes every file."""
    https_port = https_sock.getsockname()[1]
    http_port = http_sock.getsockname()[1]
    names = list(dict.fromkeys([*vaults, *seed_vault_names(seed)]))
    for name in names:
        if not VAULT_NAME_RE.match(name):
            raise ValueError(
                f"vault name {name!r} is invalid: use 3-24 letters, digits and single hyphens, "
                "starting with a letter and not ending with a hyphen"
            )
    identity = _identity(files, saved, https_port, token_lifetime)
    counts = Counts()
    identity.on_request = lambda route, client_id: counts.add(None, route, client_id)
    emu = Emulator(
        files=files, host=host, https_port=https_port, http_port=http_port,
        identity=identity, store=VaultStore(), faults=Faults(identity), counts=counts,
        admin_token=files.load_admin_token(), token_lifetime=token_lifetime,
    )
    mi = identity.default_managed_identity if saved else identity.add_managed_identity(system=True)
    if saved:
        files.restore_vaults(emu.store, lambda name: f"https://{name}{VAULT_SUFFIX}:{https_port}")
    new = [n for n in names if emu.store.find(n) is None]
    for name in new:
        emu.add_vault(name)
        emu.grant(name, mi.client_id)
    # saved content wins: the seed fills only vaults this start creates
    apply_seed(emu.store, {"vaults": {n: c for n, c in (seed.get("vaults") or {}).items() if str(n) in new}})
    files.journal(emu.store)
    hosts = ["localhost", "*.vault.localhost", *(f"{n.lower()}{VAULT_SUFFIX}" for n in emu.store.names()),
             "127.0.0.1", "::1"]
    if host not in hosts:
        hosts.append(host)
    files.load_tls(hosts, restart=saved is not None)
    # last: a folder with tenant.json holds a whole state, so a start cut short stays a first start
    files.save_tenant({"tenant_id": identity.tenant_id, "https_port": https_port, "http_port": http_port,
                       "identity": identity.to_state()})
    write_private(files.cloud_env, json.dumps(_cloud_env(emu), indent=2).encode() + b"\n")
    emu.rotate_sa_token()
    emu.info = _info(emu, mi.client_id)
    return emu


def _identity(files: StateDir, saved: dict[str, Any] | None, https_port: int, token_lifetime: int) -> IdentityProvider:
    """The saved tenant (its id, signing keys, app, managed identities), or a new one."""
    authority = f"https://localhost:{https_port}"
    try:
        return IdentityProvider(
            authority_host=authority, tenant_id=str(saved["tenant_id"]) if saved else str(uuid.uuid4()),
            kv_resource=f"https://vault.localhost:{https_port}", oidc_issuer=f"{authority}/oidc",
            token_lifetime=token_lifetime, saved=saved["identity"] if saved else None,
        )
    except (KeyError, TypeError, ValueError, StopIteration) as err:
        raise StateError(f"{files.tenant} is malformed ({why(err)}); {FRESH_HINT}") from None


def _cloud_env(emu: Emulator) -> dict[str, str]:
    """The AzureStackCloud file kvfs and the Azure SDK take as `cloudEnvFileName`."""
    authority = emu.authority_host
    return {
        "name": "AzureStackCloud",
        "activeDirectoryEndpoint": f"{authority}/",
        "activeDirectoryResourceID": f"{authority}/",
        "resourceManagerEndpoint": f"{authority}/",
        "keyVaultEndpoint": f"{emu.kv_resource}/",
        "keyVaultDNSSuffix": f"vault.localhost:{emu.https_port}",
        "tokenAudience": f"{authority}/",
    }


def _info(emu: Emulator, managed_identity: str) -> dict[str, Any]:
    """emulator.json: what clients need (it holds the client secret and the admin token)."""
    app = emu.identity.default_app
    return {
        "tenant_id": emu.tenant_id,
        "authority_host": emu.authority_host,
        "ca_file": str(emu.ca_file),
        "cloud_env_file": str(emu.cloud_env_file),
        "cloud_name": "AzureStackCloud",
        "vaults": {n: emu.vault_url(n) for n in emu.store.names()},
        "app": {"client_id": app.client_id, "client_secret": app.client_secret},
        "sa_token_file": str(emu.sa_token_file),
        "service_account": {"namespace": SA_NAMESPACE, "name": SA_NAME},
        "managed_identity": {"client_id": managed_identity},
        "https_port": emu.https_port,
        "http_port": emu.http_port,
        "kv_resource": emu.kv_resource,
        "key_vault_dns_suffix": f"vault.localhost:{emu.https_port}",
        "imds_url": emu.imds_url,
        "nmi_url": emu.nmi_url,
        "oidc_issuer": emu.oidc_issuer,
        "admin_url": emu.admin_url,
        "admin_token_file": str(emu.admin_token_file),
        "admin_token": emu.admin_token,
        "pid": os.getpid(),
    }


async def _refresh_sa_token(emu: Emulator) -> None:
    """Rewrite the SA token file at half its lifetime, like kubelet does for projected tokens."""
    while True:
        await trio.sleep(emu.sa_token_lifetime / 2)
        emu.rotate_sa_token()


class EmulatorThread:
    """`with EmulatorThread(dir, seed=..., vaults=...) as emu:` — the emulator on its own thread + trio.run."""

    def __init__(self, dir: Path | None = None, **kwargs: Any) -> None:
        self._dir = dir
        self._kwargs = kwargs
        self._ready = threading.Event()
        self._emu: Emulator | None = None
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Emulator:
        self._thread = threading.Thread(target=self._run, name="kvfs-emulator", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        assert self._emu is not None
        return self._emu

    def __exit__(self, *exc: object) -> None:
        if self._token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as err:  # noqa: BLE001 - reported to the thread that waits
            if not self._ready.is_set():
                self._error = err
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with open_emulator(self._dir, **self._kwargs) as emu:
            self._emu = emu
            self._ready.set()
            await self._stop.wait()
