"""Warm-up: a made-up volume driven through the daemon's code once, in the zygote, before any fork.

Why: CPython 3.11 rewrites a function's bytecode in place during its first calls (the
specialising interpreter), and the libraries build some state on first use. In each forked
daemon, those writes land on pages it shares with the zygote, so each daemon copies them. Done
once here, every fork shares them instead (bench/bench_csi.py shows the difference per volume).

Nothing of it is a request: the parameters are constant, "Entra ID" and "Key Vault" are an
HTTPS server on loopback inside this warm-up, whose throwaway certificate only this warm-up
trusts, nothing is logged, and everything it built is collected before the zygote freezes its
heap. It runs what a volume runs before and at its first read: parameters, the HTTP client over
TLS, the identity preflight, the token exchange, a Key Vault GET, the cache, the file tree's
lookup/open/read/release, the status and metrics answers. A failure costs memory, never the zygote.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import json
import logging
import os
import ssl
import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from typing import Any

import h11
import httpx
import jwt
import pyfuse3
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kvfs.auth.factory import build_credential
from kvfs.auth.tokensource import PushedTokenSource
from kvfs.cache.resolver import Resolver
from kvfs.config.model import CloudConfig, MountConfig
from kvfs.config.parameters import WORKLOAD_IDENTITY_AUDIENCE, parse_parameters
from kvfs.daemon.events import EventRing
from kvfs.daemon.files import VolumeFiles
from kvfs.daemon.metrics import CountedCredential, CountingTransport, DaemonMetrics, MeteredCore
from kvfs.daemon.preflight import check_volume
from kvfs.daemon.status import ObjectWatch
from kvfs.fs.adapter import FuseAdapter
from kvfs.fs.tree import ROOT_INODE
from kvfs.net.circuit import CircuitTransport
from kvfs.net.http import LoopbackTransport, make_http_client
from kvfs.vault.client import VaultClient

log = logging.getLogger(__name__)

TENANT = "00000000-0000-0000-0000-00000000beef"
SECRET = "warmup-secret"
VALUE = b"warm-up value"
VERSION = "0" * 32
WARMUP_TIMEOUT = 10.0


def warm_up() -> None:
    """Run the made-up volume once; log one warning (and go on) if anything fails."""
    problem = ""
    try:
        with _quiet():
            data = trio.run(_warm, _config())
        if data != VALUE:
            problem = f"the made-up volume read {len(data)} unexpected bytes"
    except Exception as exc:  # noqa: BLE001 - a warm-up must never stop the zygote
        while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]  # type: ignore[assignment]
        problem = f"{type(exc).__name__}: {exc}"
    gc.collect()
    if problem:
        log.warning("warm-up failed, daemons use more private memory: %s", problem)


@contextmanager
def _quiet() -> Iterator[None]:
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def _config() -> MountConfig:
    sa_token = jwt.encode(
        {"iss": "https://warmup.invalid", "sub": "system:serviceaccount:warmup:warmup", "aud": [WORKLOAD_IDENTITY_AUDIENCE]},
        "warm-up key, long enough for HMAC-SHA256",
        algorithm="HS256",
    )
    params = {
        "keyvaultName": "warmup",
        "tenantId": TENANT,
        "clientID": str(uuid.UUID(int=1)),
        "objects": f"array:\n  - |\n    objectName: {SECRET}\n    objectType: secret\n",
        "csi.storage.k8s.io/pod.name": "warmup",
        "csi.storage.k8s.io/pod.namespace": "warmup",
        "csi.storage.k8s.io/serviceAccount.tokens": json.dumps(
            {WORKLOAD_IDENTITY_AUDIENCE: {"token": sa_token, "expirationTimestamp": "2099-01-01T00:00:00Z"}}
        ),
    }
    return parse_parameters(params, {}, context="csi")


def _loopback_cloud(port: int) -> CloudConfig:
    return CloudConfig(
        name="AzureStackCloud",
        keyvault_dns_suffix=f"vault.localhost:{port}",
        keyvault_resource=f"https://vault.localhost:{port}",
        authority_host=f"https://localhost:{port}",
    )


async def _warm(config: MountConfig) -> bytes:
    server_ctx, client_ctx = _tls_contexts()
    with trio.fail_after(WARMUP_TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, _serve(server_ctx), 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            data = await _one_volume(dataclasses.replace(config, cloud=_loopback_cloud(port)), client_ctx)
            nursery.cancel_scope.cancel()
    return data


async def _one_volume(config: MountConfig, client_ctx: ssl.SSLContext) -> bytes:
    """What a volume's daemon runs up to its first read, over the loopback server; the bytes read."""
    async with AsyncExitStack() as stack:
        metrics = DaemonMetrics()
        network = CircuitTransport(LoopbackTransport(ssl_context=client_ctx, limits=httpx.Limits()))
        http = make_http_client(transport=CountingTransport(network, config.vault_url, metrics))
        stack.push_async_callback(http.aclose)
        credential = build_credential(config, http, token_source=PushedTokenSource(config.auth.sa_token))
        credential.inner = CountedCredential(credential.inner, metrics)
        stack.push_async_callback(credential.aclose)
        vault = VaultClient(config.vault_url, credential, config.cloud.scope, http, tenant_id=config.auth.tenant_id)
        watch = ObjectWatch(config.objects, EventRing())
        resolver = Resolver(vault, config, listener=watch)
        VolumeFiles(config, resolver)
        if await check_volume(credential, config.cloud.scope, config.vault_url, http) is not None:
            raise RuntimeError("the made-up volume's preflight was refused")
        adapter = FuseAdapter(MeteredCore(config, resolver, metrics=metrics))
        ctx = pyfuse3.RequestContext()
        entry = await adapter.lookup(ROOT_INODE, SECRET.encode(), ctx)
        await adapter.getattr(entry.st_ino, ctx)
        info = await adapter.open(entry.st_ino, os.O_RDONLY, ctx)
        data = await adapter.read(info.fh, 0, 4096)
        await adapter.release(info.fh)
        json.dumps(watch.to_json())
        metrics.snapshot(resolver.statistics, watch.rotations)
        return data


def _serve(server_ctx: ssl.SSLContext) -> Any:
    async def handle(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_ctx, server_side=True)
        conn = h11.Connection(h11.SERVER)
        while True:
            request = await _next_request(tls, conn)
            if request is None:
                return
            status, body = _answer(request.method, request.target.decode())
            headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
            await tls.send_all(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
            await tls.send_all(conn.send(h11.Data(data=body)) or b"")
            await tls.send_all(conn.send(h11.EndOfMessage()) or b"")
            conn.start_next_cycle()

    return handle


async def _next_request(tls: trio.SSLStream[trio.SocketStream], conn: h11.Connection) -> h11.Request | None:
    request: h11.Request | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await tls.receive_some(65536)))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif isinstance(event, (h11.ConnectionClosed, h11.PAUSED)):
            return None


def _answer(method: bytes, target: str) -> tuple[int, bytes]:
    if method == b"POST" and target.endswith("/oauth2/v2.0/token"):
        token = jwt.encode({"aud": "https://vault.localhost", "tid": TENANT}, "warm-up access token key, long enough", algorithm="HS256")
        return 200, json.dumps({"token_type": "Bearer", "expires_in": 3600, "access_token": token}).encode()
    if method == b"GET" and target.startswith(f"/secrets/{SECRET}"):
        now = int(datetime.datetime.now(datetime.timezone.utc).timestamp())
        bundle = {
            "value": VALUE.decode(),
            "id": f"https://warmup.vault.localhost/secrets/{SECRET}/{VERSION}",
            "attributes": {"enabled": True, "created": now, "updated": now},
        }
        return 200, json.dumps(bundle).encode()
    return 404, b'{"error": {"code": "NotFound", "message": "warm-up"}}'


def _tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a throwaway self-signed certificate, and a client trusting only it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvfs warm-up")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.DNSName("warmup.vault.localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    fd = os.memfd_create("kvfs-warmup", os.MFD_CLOEXEC)  # ssl loads a certificate chain only from a path
    try:
        os.write(fd, cert_pem + key_pem)
        server.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_2
    client.load_verify_locations(cadata=cert_pem.decode())
    return server, client
