"""Servers on loopback that tests point kvfs at: a base that serves each connection on a thread,
and a TLS server whose self-signed certificate nobody trusts (every handshake fails)."""

from __future__ import annotations

import socket
import ssl
import tempfile
import threading
from pathlib import Path

import certgen


class LoopbackServer:
    """Listens on 127.0.0.1 (a free port); `handle(conn)` serves each connection, one at a time."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.handle(conn)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self.sock.close()
        self.thread.join(timeout=5)


class UntrustedTLS(LoopbackServer):
    """A TLS server with a self-signed certificate: a client that verifies refuses every handshake.

    Point an endpoint (a cloud env file's `keyVaultDNSSuffix` or `activeDirectoryEndpoint`) at
    `port` to see what kvfs does with a certificate it must not trust.
    """

    def __init__(self) -> None:
        key = certgen.make_key()
        folder = Path(tempfile.mkdtemp(prefix="kvfs-untrusted-"))
        (folder / "cert.pem").write_bytes(certgen.cert_pem(certgen.self_signed(key, "untrusted.vault.localhost")))
        (folder / "key.pem").write_bytes(certgen.key_pem(key))
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
        self.handshakes = 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        self.handshakes += 1
        conn.settimeout(5)
        try:
            with self.context.wrap_socket(conn, server_side=True):
                pass
        except (OSError, ssl.SSLError):
            pass  # the client refused our certificate, as it must
