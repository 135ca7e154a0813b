"""A synced Secret's `data` from a volume's files, with upstream's semantics.

Each `data` entry's key holds the bytes of the file its objectName names (alias included; split
`.crt` / `.key` files and history entries `NAME/N` count as files). For a `kubernetes.io/tls`
Secret, as upstream's driver does it (pkg/util/secretutil):

- `tls.crt`: every CERTIFICATE block of the file, in file order, re-encoded (64-column lines);
  a file without PEM certificates is read as a PFX (binary, e.g. `objectFormat: pfx` with
  `objectEncoding: base64`) and its certificates are taken;
- `tls.key`: the last PEM block that is not a certificate (else the PFX's key), re-encoded as
  `RSA PRIVATE KEY` (PKCS#1) or `EC PRIVATE KEY` (SEC 1) — what Kubernetes TLS consumers take.

Where upstream writes an empty key for an unreadable one, kvfs refuses that Secret with a reason.
Messages name files and keys, never bytes.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from kvfs.config.model import SecretObject
from kvfs.config.spc import TLS_SECRET_TYPE

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)
_CERTIFICATE = "CERTIFICATE"


class SecretDataError(Exception):
    """The files cannot fill the Secret; the message names the Secret, the key and the file."""


def secret_data(obj: SecretObject, files: Mapping[str, bytes]) -> dict[str, bytes]:
    """`data` of `obj` from `files` (name → bytes); every file it names must be there."""
    data: dict[str, bytes] = {}
    for entry in obj.data:
        content = files.get(entry.object_name)
        if content is None:
            raise SecretDataError(f"Secret {obj.secret_name}: key {entry.key}: file {entry.object_name} was not read")
        if obj.type != TLS_SECRET_TYPE:
            data[entry.key] = content
            continue
        try:
            data[entry.key] = tls_part(content, entry.key)
        except ValueError as exc:
            raise SecretDataError(f"Secret {obj.secret_name}: key {entry.key} from file {entry.object_name}: {exc}") from None
    return data


def tls_part(content: bytes, key: str) -> bytes:
    """`tls.crt` or `tls.key` of a PEM (or binary PFX) file; ValueError saying what is missing."""
    blocks = _pem_blocks(content)
    if key == "tls.crt":
        certs = [der for kind, der in blocks if kind == _CERTIFICATE]
        if not certs and not blocks:
            certs = [c.public_bytes(serialization.Encoding.DER) for c in _pfx_certificates(content)]
        if not certs:
            raise ValueError("the file holds no certificate")
        return b"".join(_pem(_CERTIFICATE, der) for der in certs)
    if key == "tls.key":
        keys = [der for kind, der in blocks if kind != _CERTIFICATE]
        if keys:
            private = _private_key(keys[-1])
        elif not blocks:
            private = _pfx_key(content)
        else:
            raise ValueError("the file holds no private key")
        return _traditional(private)
    raise ValueError(f"key {key!r} is not supported: only tls.crt and tls.key")


def _pem_blocks(content: bytes) -> list[tuple[str, bytes]]:
    """(type, DER) of each PEM block; a block whose body is not base64 is a ValueError."""
    blocks = []
    for match in _PEM_BLOCK.finditer(content):
        lines = match.group(2).splitlines()
        while lines and b":" in lines[0]:  # RFC 1421 headers (Proc-Type: ...) come first: dropped
            lines.pop(0)
        body = b"".join(line.strip() for line in lines)
        try:
            blocks.append((match.group(1).decode(), base64.b64decode(body, validate=True)))
        except binascii.Error:
            raise ValueError(f"a {match.group(1).decode()} block is not valid base64") from None
    return blocks


def _pem(kind: str, der: bytes) -> bytes:
    text = base64.b64encode(der)
    lines = b"".join(text[i : i + 64] + b"\n" for i in range(0, len(text), 64))
    return f"-----BEGIN {kind}-----\n".encode() + lines + f"-----END {kind}-----\n".encode()


def _private_key(der: bytes) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_der_private_key(der, None)
    except (ValueError, TypeError):
        raise ValueError("its private key cannot be read (an encrypted or unknown key format)") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ValueError("its private key is neither RSA nor EC")
    return key


def _load_pfx(content: bytes) -> pkcs12.PKCS12KeyAndCertificates:
    try:
        return pkcs12.load_pkcs12(content, None)
    except ValueError:
        raise ValueError("the file is neither PEM nor a password-less PFX") from None


def _pfx_certificates(content: bytes) -> list[x509.Certificate]:
    loaded = _load_pfx(content)
    return [c.certificate for c in ([loaded.cert] if loaded.cert else []) + list(loaded.additional_certs)]


def _pfx_key(content: bytes) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    key = _load_pfx(content).key
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ValueError("the PFX holds no RSA or EC private key")
    return key


def _traditional(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#1 `RSA PRIVATE KEY` or SEC 1 `EC PRIVATE KEY`, as upstream re-encodes keys for tls.key."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
