"""A small Kubernetes API client: just enough to read a SecretProviderClass.

In-cluster config (service account token + CA) or a kubeconfig file (server, CA, bearer token or
client certificate). Client keys given inline (`client-key-data`) stay in memory: they are loaded
from a memfd, never written to disk. Errors carry the API server's Status message and a fix.
"""

from __future__ import annotations

import base64
import logging
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import yaml

from kvfs.config.spc import spc_parameters as shared_spc_parameters

log = logging.getLogger(__name__)

SPC_GROUP = "secrets-store.csi.x-k8s.io"
SPC_VERSION = "v1"
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeError(Exception):
    """A Kubernetes API call failed; `status` is the HTTP status (0 = unreachable)."""

    def __init__(self, message: str, *, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class KubeConfigError(KubeError):
    """The kubeconfig / in-cluster environment cannot be used."""


@dataclass
class KubeClient:
    """Sync client (the plugin serves gRPC from threads). Bearer token re-read from its file per call."""

    server: str
    ssl_context: ssl.SSLContext | bool
    token: str = field(default="", repr=False)
    token_file: str = ""
    timeout: float = 10.0
    _http: httpx.Client | None = field(default=None, init=False, repr=False)

    @classmethod
    def in_cluster(cls, sa_dir: Path = SA_DIR) -> KubeClient:
        host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise KubeConfigError(
                "no Kubernetes API configuration: KUBERNETES_SERVICE_HOST is not set and no --kubeconfig "
                "was given (run in a pod with a service account, or pass --kubeconfig FILE)"
            )
        if ":" in host:
            host = f"[{host}]"
        ctx = ssl.create_default_context(cafile=str(sa_dir / "ca.crt"))
        return cls(f"https://{host}:{port}", ctx, token_file=str(sa_dir / "token"))

    @classmethod
    def from_kubeconfig(cls, path: str, context: str = "") -> KubeClient:
        try:
            doc = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise KubeConfigError(f"--kubeconfig {path}: cannot read it: {exc}") from None
        base = Path(path).resolve().parent
        ctx_name = context or doc.get("current-context", "")
        ctx = _named(doc, "contexts", ctx_name, path).get("context", {})
        cluster = _named(doc, "clusters", ctx.get("cluster", ""), path).get("cluster", {})
        user = _named(doc, "users", ctx.get("user", ""), path).get("user", {}) if ctx.get("user") else {}
        server = str(cluster.get("server", "")).rstrip("/")
        if not server.startswith("https://"):
            raise KubeConfigError(f"--kubeconfig {path}: cluster server {server!r} must be an https:// URL")
        ssl_ctx: ssl.SSLContext | bool
        if cluster.get("insecure-skip-tls-verify"):
            log.warning("kubeconfig %s: insecure-skip-tls-verify is set; the API server is not verified", path)
            ssl_ctx = False
        else:
            ssl_ctx = ssl.create_default_context()
            if cluster.get("certificate-authority-data"):
                ssl_ctx.load_verify_locations(cadata=_b64(cluster["certificate-authority-data"]).decode())
            elif cluster.get("certificate-authority"):
                ssl_ctx.load_verify_locations(cafile=str(base / cluster["certificate-authority"]))
        for unsupported in ("exec", "auth-provider"):
            if unsupported in user:
                raise KubeConfigError(
                    f"--kubeconfig {path}: user {ctx.get('user')!r} uses {unsupported!r}, which kvfs does not "
                    "support (use a token, a token file or a client certificate)"
                )
        cert = user.get("client-certificate-data") or user.get("client-certificate")
        if cert:
            if not isinstance(ssl_ctx, ssl.SSLContext):
                ssl_ctx = ssl.create_default_context()
                ssl_ctx.check_hostname = False
                ssl_ctx.verify_mode = ssl.CERT_NONE
            _load_client_cert(ssl_ctx, user, base)
        token_file = user.get("tokenFile", "")
        return cls(
            server,
            ssl_ctx,
            token=str(user.get("token", "")),
            token_file=str(base / token_file) if token_file else "",
        )

    def _client(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(base_url=self.server, verify=self.ssl_context, timeout=self.timeout)
        return self._http

    def _headers(self) -> dict[str, str]:
        token = self.token
        if self.token_file:
            try:
                token = Path(self.token_file).read_text().strip()
            except OSError as exc:
                raise KubeConfigError(f"cannot read the Kubernetes token file {self.token_file}: {exc}") from None
        headers = {"Accept": "application/json", "User-Agent": "kvfs-csi"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def get(self, path: str) -> dict[str, Any]:
        try:
            resp = self._client().get(path, headers=self._headers())
        except httpx.HTTPError as exc:
            raise KubeError(f"Kubernetes API {self.server} unreachable: {type(exc).__name__}: {exc}") from None
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if resp.status_code >= 400:
            message = body.get("message") if isinstance(body, dict) else None
            raise KubeError(
                str(message or f"HTTP {resp.status_code}"),
                status=resp.status_code,
                reason=str(body.get("reason", "")) if isinstance(body, dict) else "",
            )
        if not isinstance(body, dict):
            raise KubeError(f"Kubernetes API {self.server}{path}: answer is not a JSON object")
        return body

    def get_secret_provider_class(self, namespace: str, name: str) -> dict[str, Any]:
        """GET one SecretProviderClass; every path segment percent-encoded (no `/`, `..` or `?`)."""
        if {namespace, name} & {"", ".", ".."}:  # quote() keeps dots, and a client may resolve dot segments
            raise KubeError(f"invalid SecretProviderClass reference {namespace!r}/{name!r}", status=400)
        ns, obj = quote(namespace, safe=""), quote(name, safe="")
        return self.get(f"/apis/{SPC_GROUP}/{SPC_VERSION}/namespaces/{ns}/secretproviderclasses/{obj}")

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None


def spc_parameters(obj: dict[str, Any]) -> dict[str, str]:
    """`spec.parameters` as str → str, checked by kvfs.config.spc; errors name namespace/name."""
    meta = obj.get("metadata") or {}
    return shared_spc_parameters(obj, source=f"{meta.get('namespace', '')}/{meta.get('name', '')}")


def _named(doc: dict[str, Any], section: str, name: str, path: str) -> dict[str, Any]:
    for item in doc.get(section) or []:
        if item.get("name") == name:
            return dict(item)
    raise KubeConfigError(f"--kubeconfig {path}: no entry {name!r} in {section!r}")


def _b64(value: str) -> bytes:
    return base64.b64decode(value)


def _memfile(data: bytes, name: str) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def _load_client_cert(ctx: ssl.SSLContext, user: dict[str, Any], base: Path) -> None:
    """load_cert_chain wants paths; inline data goes through memfds so keys never touch disk."""
    fds: list[int] = []
    try:

        def path_of(data_key: str, file_key: str) -> str:
            if user.get(data_key):
                fd = _memfile(_b64(user[data_key]), data_key)
                fds.append(fd)
                return f"/proc/self/fd/{fd}"
            return str(base / user[file_key])

        certfile = path_of("client-certificate-data", "client-certificate")
        if not (user.get("client-key-data") or user.get("client-key")):
            raise KubeConfigError("kubeconfig user has a client certificate but no client-key(-data)")
        keyfile = path_of("client-key-data", "client-key")
        ctx.load_cert_chain(certfile, keyfile)
    finally:
        for fd in fds:
            os.close(fd)
