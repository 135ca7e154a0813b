"""make_http_client against a REAL local TLS server: *.localhost → loopback, SNI and verification."""

from __future__ import annotations

import datetime
import json
import socket
import ssl
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import kvfs
from kvfs.auth.base import AccessToken
from kvfs.errors import ConfigError, VaultError
from kvfs.vault.client import VaultClient
from kvfs.errors import is_tls_verification_error
from kvfs.net import http as http_module
from kvfs.net.http import is_localhost, make_http_client, make_ssl_context

SECRET_VALUE = "s3cr3t-over-tls"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class Pki:
    ca_file: Path
    server_ctx: ssl.SSLContext


def make_pki(tmp: Path, dns_names: list[str]) -> Pki:
    """A throwaway CA and a server certificate for `dns_names`."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("kvfs test CA"))
        .issuer_name(_name("kvfs test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_names[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = tmp / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file = tmp / "server.pem"
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + _pem_key(key))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file)
    return Pki(ca_file=ca_file, server_ctx=ctx)


@dataclass
class Server:
    port: int
    requests: list[dict] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)
    handshakes_failed: int = 0


async def _handle(server: Server, stream: trio.SSLStream) -> None:
    """Minimal HTTP/1.1 keep-alive server: answers every request with a secret bundle + echo."""
    buf = b""
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
            server.requests.append({"method": method, "target": target, "headers": headers})
            body = json.dumps(
                {
                    "value": SECRET_VALUE,
                    "id": "https://demo.vault.localhost/secrets/db/0123456789abcdef0123456789abcdef",
                    "attributes": {"enabled": True, "created": 1, "updated": 1},
                    "echo_host": headers.get("host"),
                }
            ).encode()
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
    except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
        server.handshakes_failed += 1


@pytest.fixture(autouse=True)
def _resolve_localhost(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Overrides tests/conftest.py: DNS must NOT resolve *.localhost here, so kvfs's own mapping is proven."""
    real = socket.getaddrinfo
    asked: list[str] = []

    def no_localhost_dns(host: object, *args: object, **kwargs: object) -> object:
        name = host.decode() if isinstance(host, bytes) else str(host)
        asked.append(name)
        if name.lower().rstrip(".").endswith("localhost"):
            raise socket.gaierror(socket.EAI_NONAME, "no DNS for *.localhost in this test")
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", no_localhost_dns)
    return asked


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path, ["demo.vault.localhost"])


@pytest.fixture
async def server(nursery: trio.Nursery, pki: Pki) -> Server:
    state = Server(port=0)

    def sni_callback(sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        state.sni.append(name)

    pki.server_ctx.sni_callback = sni_callback  # type: ignore[assignment]
    listeners = await nursery.start(
        partial(trio.serve_ssl_over_tcp, partial(_handle, state), 0, pki.server_ctx, host="127.0.0.1")
    )
    state.port = listeners[0].transport_listener.socket.getsockname()[1]
    return state


def test_is_localhost() -> None:
    assert is_localhost("localhost")
    assert is_localhost("demo.vault.localhost")
    assert is_localhost("DEMO.Vault.LocalHost.")
    assert not is_localhost("localhost.example.com")
    assert not is_localhost("notlocalhost")
    assert not is_localhost("vault.azure.net")


async def test_localhost_name_reaches_loopback_with_sni_and_host(
    server: Server, pki: Pki, monkeypatch: pytest.MonkeyPatch, _resolve_localhost: list[str]
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
    async with make_http_client() as http:
        response = await http.get(f"https://demo.vault.localhost:{server.port}/secrets/db?api-version=7.4")
    assert response.status_code == 200
    assert response.json()["echo_host"] == f"demo.vault.localhost:{server.port}"
    assert response.url.host == "demo.vault.localhost"  # the caller's request is not rewritten
    assert server.sni == ["demo.vault.localhost"]
    req = server.requests[0]
    assert req["target"] == "/secrets/db?api-version=7.4"
    assert req["headers"]["user-agent"] == f"kvfs/{kvfs.__version__}"
    assert response.http_version == "HTTP/1.1"
    assert not any("localhost" in name for name in _resolve_localhost)  # no DNS lookup of the name


async def test_wrong_name_fails_verification(
    server: Server, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
    async with make_http_client() as http:
        with pytest.raises(httpx.ConnectError) as caught:
            await http.get(f"https://other.vault.localhost:{server.port}/")
    assert is_tls_verification_error(caught.value)
    assert server.requests == []


async def test_verified_connection_is_not_reused_for_another_name(
    server: Server, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both names map to 127.0.0.1:port; the pool must not hand demo's connection to 'other'."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
    async with make_http_client() as http:
        ok = await http.get(f"https://demo.vault.localhost:{server.port}/")
        assert ok.status_code == 200
        with pytest.raises(httpx.ConnectError):
            await http.get(f"https://other.vault.localhost:{server.port}/")
    assert len(server.requests) == 1


async def test_untrusted_ca_without_ssl_cert_file(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    async with make_http_client() as http:
        with pytest.raises(httpx.ConnectError) as caught:
            await http.get(f"https://demo.vault.localhost:{server.port}/")
    assert is_tls_verification_error(caught.value)


async def test_trust_env_false_ignores_ssl_cert_file(
    server: Server, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
    async with make_http_client(trust_env=False) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"https://demo.vault.localhost:{server.port}/")


def test_ssl_cert_file_adds_to_system_cas(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    base = make_ssl_context().cert_store_stats()["x509_ca"]
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
    ctx = make_ssl_context()
    assert ctx.cert_store_stats()["x509_ca"] == base + 1
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_a_fork_adds_its_ssl_cert_file_to_the_shared_system_cas(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The zygote parses the system CAs once; each daemon adds its own SSL_CERT_FILE to its copy,
    and a system bundle that changed under a long-lived zygote is parsed again before a fork."""
    bundle = tmp_path / "system.pem"
    bundle.write_bytes(Path(ssl.get_default_verify_paths().openssl_cafile).read_bytes())
    monkeypatch.setattr(http_module, "_system_ca_paths", lambda: (str(bundle), ""))
    monkeypatch.setattr(http_module, "_shared_system", None)
    monkeypatch.setattr(http_module, "_preloaded_context", None)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    http_module.share_system_trust()
    shared = http_module._shared_system
    assert shared is not None
    system_cas = shared[1].cert_store_stats()["x509_ca"]
    http_module.share_system_trust()  # before the next fork: unchanged, not parsed again
    assert http_module._shared_system is shared

    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))  # the daemon's environment
    http_module.preload_ssl_context()
    ctx = http_module._preloaded_context
    assert ctx is shared[1] and ctx.cert_store_stats()["x509_ca"] == system_cas + 1
    assert http_module._shared_system is None  # taken by this process, never handed to another client

    bundle.write_bytes(pki.ca_file.read_bytes())  # ca-certificates changed under the zygote
    http_module.share_system_trust()
    assert http_module._shared_system is not None and http_module._shared_system[1].cert_store_stats()["x509_ca"] == 1


def test_bad_ssl_cert_file_is_a_clear_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.pem"
    monkeypatch.setenv("SSL_CERT_FILE", str(missing))
    with pytest.raises(ConfigError) as caught:
        make_ssl_context()
    assert "SSL_CERT_FILE" in str(caught.value) and str(missing) in str(caught.value)


class _Cred:
    async def get_token(self, scope: str) -> AccessToken:
        return AccessToken("tls-token-abc", expires_at=1e9)

    async def aclose(self) -> None:
        return None


async def test_vault_client_over_real_tls(server: Server, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
    async with make_http_client() as http:
        client = VaultClient(
            f"https://demo.vault.localhost:{server.port}/", _Cred(), "https://vault.azure.net/.default", http
        )
        bundle = await client.get("secret", "db")
    assert bundle["value"] == SECRET_VALUE
    assert server.requests[0]["headers"]["authorization"] == "Bearer tls-token-abc"


async def test_vault_client_reports_untrusted_certificate(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    async with make_http_client() as http:
        client = VaultClient(
            f"https://demo.vault.localhost:{server.port}/", _Cred(), "https://vault.azure.net/.default", http
        )
        with pytest.raises(VaultError) as caught:
            await client.get("secret", "db")
    assert caught.value.code == "TLSVerifyFailed"
    assert "SSL_CERT_FILE" in str(caught.value)
    assert client.request_counts["get_secret"] == 1  # a bad certificate is not retried
