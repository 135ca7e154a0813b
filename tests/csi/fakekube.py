"""A faithful fake Kubernetes API server: HTTPS with a test CA, bearer-token or client-certificate
authentication, SecretProviderClass objects, and `Status` bodies for 401/403/404 like the real API."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import re
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_SPC_PATH = re.compile(
    r"^/apis/secrets-store\.csi\.x-k8s\.io/v1/namespaces/(?P<ns>[^/]+)/secretproviderclasses/(?P<name>[^/]+)$"
)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
    org: str = "",
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, subject)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    name = x509.Name(attrs)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    elif server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details or {},
        "code": code,
    }


@dataclass
class FakeKube:
    """Serves `objects[(namespace, name)]`; `allowed_token` / the client cert's CN authenticate;
    `forbidden` namespaces answer 403 as RBAC would. `requests` records every request's raw path
    (as sent, percent-encoding included) and who made it, whatever the method."""

    folder: Path
    allowed_token: str = "kube-test-token-123"
    client_cn: str = "system:node:test"
    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    forbidden: set[str] = field(default_factory=set)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (path, identity)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        ca_key = _key()
        self.ca = _cert("fake-kube-ca", ca_key, None, ca_key, ca=True)
        srv_key = _key()
        srv = _cert("kube-apiserver", srv_key, self.ca, ca_key, server=True)
        cli_key = _key()
        cli = _cert(self.client_cn, cli_key, self.ca, ca_key, org="system:nodes")
        self.ca_pem = _pem(self.ca)
        self.client_cert_pem = _pem(cli)
        self.client_key_pem = _pem_key(cli_key)
        self.ca_file = self.folder / "ca.crt"
        self.ca_file.write_bytes(self.ca_pem)
        (self.folder / "server.crt").write_bytes(_pem(srv))
        (self.folder / "server.key").write_bytes(_pem_key(srv_key))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.folder / "server.crt", self.folder / "server.key")
        ctx.load_verify_locations(cadata=self.ca_pem.decode())
        ctx.verify_mode = ssl.CERT_OPTIONAL
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                fake.requests.append((self.path, fake._identity(self)))
                self._send(405, status(405, "MethodNotAllowed", "the fake API server only answers GET"))

            do_PUT = do_PATCH = do_DELETE = do_POST  # noqa: N815

            def do_GET(self) -> None:  # noqa: N802
                identity = fake._identity(self)
                fake.requests.append((self.path, identity))
                if not identity:
                    return self._send(401, status(401, "Unauthorized", "Unauthorized"))
                m = _SPC_PATH.match(self.path)
                if not m:
                    return self._send(404, status(404, "NotFound", "the server could not find the requested resource"))
                ns, name = m["ns"], m["name"]
                if ns in fake.forbidden:
                    return self._send(
                        403,
                        status(
                            403,
                            "Forbidden",
                            f'secretproviderclasses.secrets-store.csi.x-k8s.io "{name}" is forbidden: User '
                            f'"{identity}" cannot get resource "secretproviderclasses" in API group '
                            f'"secrets-store.csi.x-k8s.io" in the namespace "{ns}"',
                        ),
                    )
                obj = fake.objects.get((ns, name))
                if obj is None:
                    return self._send(
                        404,
                        status(
                            404,
                            "NotFound",
                            f'secretproviderclasses.secrets-store.csi.x-k8s.io "{name}" not found',
                            {"name": name, "group": "secrets-store.csi.x-k8s.io", "kind": "secretproviderclasses"},
                        ),
                    )
                self._send(200, obj)

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _identity(self, handler: BaseHTTPRequestHandler) -> str:
        auth = handler.headers.get("Authorization", "")
        if auth == f"Bearer {self.allowed_token}":
            return "system:serviceaccount:kube-system:kvfs-csi"
        peer = handler.connection.getpeercert()  # type: ignore[attr-defined]
        if peer:
            for rdn in peer.get("subject", ()):
                for key, value in rdn:
                    if key == "commonName":
                        return str(value)
        return ""

    def add_spc(
        self, namespace: str, name: str, parameters: dict[str, str], *, metadata: dict[str, str] | None = None
    ) -> None:
        """Serve a SecretProviderClass at namespace/name; `metadata` makes the answer claim to be
        another object (a misbehaving API server or proxy)."""
        meta = {"name": name, "namespace": namespace, "uid": "0b0e0f00-0000-4000-8000-000000000001"}
        self.objects[(namespace, name)] = {
            "apiVersion": "secrets-store.csi.x-k8s.io/v1",
            "kind": "SecretProviderClass",
            "metadata": {**meta, **(metadata or {})},
            "spec": {"provider": "azure", "parameters": parameters},
        }

    def kubeconfig(self, path: Path, *, client_cert: bool = False, token: str | None = None) -> Path:
        user: dict[str, Any]
        if client_cert:
            user = {
                "client-certificate-data": base64.b64encode(self.client_cert_pem).decode(),
                "client-key-data": base64.b64encode(self.client_key_pem).decode(),
            }
        else:
            user = {"token": self.allowed_token if token is None else token}
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "test",
            "clusters": [
                {
                    "name": "fake",
                    "cluster": {"server": self.url, "certificate-authority-data": base64.b64encode(self.ca_pem).decode()},
                }
            ],
            "users": [{"name": "u", "user": user}],
            "contexts": [{"name": "test", "context": {"cluster": "fake", "user": "u"}}],
        }
        path.write_text(json.dumps(doc))
        return path

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
