"""PEM, PFX and JWK conversions that reproduce the upstream Azure provider byte for byte.

Why a module of its own: users' files must be byte-identical to what the Go provider writes, so
the PEM codec here is a faithful port of Go's `encoding/pem` (block detection, headers, 64-column
lines) and the chain ordering follows upstream's `fetchCertChains` step by step. All crypto and
ASN.1 work is done by `cryptography`; only PEM text framing and base64 rules live here.

Every function is pure (no I/O). Errors are `RenderError` with messages that never contain key
material or secret values; callers add the `failed to get objectType:...` prefix.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from kvfs.errors import RenderError

log = logging.getLogger(__name__)

__all__ = [
    "CHAIN_INCOMPLETE_WARNING",
    "PemBlock",
    "b64decode_std",
    "cer_to_pem",
    "go_string_bytes",
    "jwk_to_pem",
    "order_chain",
    "pem_blocks",
    "pem_decode",
    "pem_encode",
    "pfx_to_pem",
    "split_pem",
]

CERTIFICATE = "CERTIFICATE"
PRIVATE_KEY = "PRIVATE KEY"
PUBLIC_KEY = "PUBLIC KEY"

# Upstream's klog text, kept verbatim: users grep their logs for it.
CHAIN_INCOMPLETE_WARNING = (
    "certificate chain is not complete due to missing intermediate/root certificates"
    " in the cert from key vault"
)

# ---------------------------------------------------------------------------------------------
# Base64 with Go's `base64.StdEncoding.DecodeString` rules
# ---------------------------------------------------------------------------------------------

# Go's accepted language once CR/LF are dropped: whole quanta, then optionally "xx==" or "xxx=".
# (Python's own strict mode also accepts e.g. "QUJD=", which Go rejects.)
_B64_STD = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
_B64_URL_RAW = re.compile(rb"[A-Za-z0-9_-]*")
_NEWLINES = (0x0A, 0x0D)


def go_string_bytes(text: str | bytes) -> bytes:
    """The bytes a Go string holds for this JSON string (lone surrogates become U+FFFD)."""
    if isinstance(text, bytes):
        return text
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return re.sub("[\ud800-\udfff]", "\ufffd", text).encode("utf-8")


def _b64_error_offset(src: bytes) -> int | None:
    """Offset Go reports in `illegal base64 data at input byte N`; None if Go accepts `src`.

    A port of Go's `decodeQuantum`, used only to explain a rejection.
    """
    si, n = 0, len(src)
    while True:
        j = 0
        while j < 4:
            if si == n:
                return si - j if j else None
            c = src[si]
            si += 1
            if c in _B64_ALPHABET:
                j += 1
                continue
            if c in _NEWLINES:
                continue
            if c != 0x3D or j < 2:  # not "=", or padding too early
                return si - 1
            if j == 2:  # "==" expected; the first "=" is consumed
                while si < n and src[si] in _NEWLINES:
                    si += 1
                if si == n:
                    return n
                if src[si] != 0x3D:
                    return si - 1
                si += 1
            while si < n and src[si] in _NEWLINES:
                si += 1
            return si if si < n else None  # anything after the padding is garbage


def b64decode_std(data: str | bytes) -> bytes:
    """Decode standard base64 exactly as Go's StdEncoding does: padding required, CR/LF ignored.

    Raises ValueError("illegal base64 data at input byte N"); the message never echoes the input.
    """
    raw = go_string_bytes(data)
    compact = raw.replace(b"\n", b"").replace(b"\r", b"") if b"\n" in raw or b"\r" in raw else raw
    if _B64_STD.fullmatch(compact):
        return binascii.a2b_base64(compact)
    offset = _b64_error_offset(raw)
    raise ValueError(f"illegal base64 data at input byte {len(raw) if offset is None else offset}")


def _b64url_decode(value: Any, member: str) -> bytes:
    """Decode a JWK member (base64url, padding tolerated like the Azure SDK does)."""
    if value is None:
        return b""
    if not isinstance(value, str):
        raise RenderError(f"JWK member '{member}' must be a base64url string")
    raw = value.encode("ascii", "replace").rstrip(b"=")
    if not _B64_URL_RAW.fullmatch(raw) or len(raw) % 4 == 1:
        raise RenderError(f"JWK member '{member}' is not valid base64url")
    return base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))


# ---------------------------------------------------------------------------------------------
# PEM: a port of Go's encoding/pem Decode / Encode
# ---------------------------------------------------------------------------------------------

_PEM_START = b"\n-----BEGIN "
_PEM_END = b"\n-----END "
_PEM_EOL = b"-----"
_ASCII_SPACE = b" \t\n\v\f\r"


@dataclass(frozen=True)
class PemBlock:
    """One decoded PEM block: type, optional RFC 1421 headers, DER bytes."""

    type: str
    data: bytes = field(repr=False)
    headers: Mapping[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return pem_encode(self.type, self.data, self.headers)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _get_line(data: bytes) -> tuple[bytes, bytes]:
    """First LF / CRLF line without trailing spaces and tabs, and the rest (Go's getLine)."""
    i = data.find(b"\n")
    if i < 0:
        i = j = len(data)
    else:
        j = i + 1
        if i > 0 and data[i - 1] == 0x0D:
            i -= 1
    return data[:i].rstrip(b" \t"), data[j:]


def pem_decode(data: bytes) -> tuple[PemBlock | None, bytes]:
    """Find the next PEM block like Go's `pem.Decode`; (None, data) when there is none."""
    rest = data
    while True:
        if rest.startswith(_PEM_START[1:]):
            rest = rest[len(_PEM_START) - 1 :]
        else:
            at = rest.find(_PEM_START)
            if at < 0:
                return None, data
            rest = rest[at + len(_PEM_START) :]

        type_line, rest = _get_line(rest)
        if not type_line.endswith(_PEM_EOL):
            continue
        type_line = type_line[: -len(_PEM_EOL)]

        headers: dict[str, str] = {}
        while True:
            if not rest:
                return None, data
            line, following = _get_line(rest)
            key, colon, val = line.partition(b":")
            if not colon:
                break
            headers[_text(key.strip(_ASCII_SPACE))] = _text(val.strip(_ASCII_SPACE))
            rest = following

        if not headers and rest.startswith(_PEM_END[1:]):
            end_index, end_trailer_index = 0, len(_PEM_END) - 1
        else:
            end_index = rest.find(_PEM_END)
            end_trailer_index = end_index + len(_PEM_END)
        if end_index < 0:
            continue

        end_trailer = rest[end_trailer_index:]
        trailer_len = len(type_line) + len(_PEM_EOL)
        if len(end_trailer) < trailer_len:
            continue
        rest_of_end_line = end_trailer[trailer_len:]
        end_trailer = end_trailer[:trailer_len]
        if not end_trailer.startswith(type_line) or not end_trailer.endswith(_PEM_EOL):
            continue
        if _get_line(rest_of_end_line)[0]:
            continue

        try:
            der = b64decode_std(rest[:end_index].replace(b" ", b"").replace(b"\t", b""))
        except ValueError:
            continue
        _, rest = _get_line(rest[end_index + len(_PEM_END) - 1 :])
        return PemBlock(_text(type_line), der, headers), rest


def pem_blocks(data: bytes) -> list[PemBlock]:
    """Every PEM block in `data`, in order; text outside blocks is ignored (as Go does)."""
    blocks: list[PemBlock] = []
    while True:
        block, data = pem_decode(data)
        if block is None:
            return blocks
        blocks.append(block)


def pem_encode(block_type: str, data: bytes, headers: Mapping[str, str] | None = None) -> bytes:
    """Encode like Go's `pem.EncodeToMemory`: Proc-Type first, other headers sorted, 64 columns."""
    kind = _raw(block_type)
    out = [b"-----BEGIN ", kind, b"-----\n"]
    if headers:
        if any(":" in key for key in headers):
            raise ValueError("pem: cannot encode a header key that contains a colon")
        keys = sorted((k for k in headers if k != "Proc-Type"), key=_raw)
        if "Proc-Type" in headers:
            keys.insert(0, "Proc-Type")
        out.extend(_raw(f"{k}: {headers[k]}\n") for k in keys)
        out.append(b"\n")
    b64 = base64.b64encode(data)
    for start in range(0, len(b64), 64):
        out += [b64[start : start + 64], b"\n"]
    out += [b"-----END ", kind, b"-----\n"]
    return b"".join(out)


def split_pem(text: bytes) -> tuple[bytes, bytes]:
    """(all CERTIFICATE blocks, all other blocks), each re-encoded, in content order.

    The `.crt` / `.key` files of --write-cert-and-key-in-separate-files, split as upstream does.
    """
    certs: list[bytes] = []
    others: list[bytes] = []
    for block in pem_blocks(text):
        (certs if block.type == CERTIFICATE else others).append(block.encode())
    return b"".join(certs), b"".join(others)


# ---------------------------------------------------------------------------------------------
# Certificate chain ordering (upstream's fetchCertChains in pkg/provider/provider.go)
# ---------------------------------------------------------------------------------------------


def _key_ids(cert: x509.Certificate) -> tuple[bytes | None, bytes | None]:
    """(AuthorityKeyId, SubjectKeyId) as Go's x509 exposes them; None when absent."""
    try:
        aki_ext = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
        aki = aki_ext.value.key_identifier
    except x509.ExtensionNotFound:
        aki = None
    try:
        ski: bytes | None = cert.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value.digest
    except x509.ExtensionNotFound:
        ski = None
    return aki, ski


def order_chain(pem_text: bytes, *, label: str = "") -> bytes:
    """Reorder certificates leaf → intermediates → root by AKI/SKI, exactly as upstream does.

    When the walk from the leaf does not reach every certificate (missing intermediate, unrelated
    extras) a warning is logged and `pem_text` is returned unchanged. `label` (e.g. the object
    id) is appended to that warning so operators know which object it concerns.
    """
    blocks = pem_blocks(pem_text)
    aki: list[bytes | None] = []
    ski: list[bytes | None] = []
    for index, block in enumerate(blocks, start=1):
        try:
            ids = _key_ids(x509.load_der_x509_certificate(block.data))
        except ValueError:
            raise RenderError(
                f"PEM block {index} ({block.type}) is not a valid X.509 certificate"
            ) from None
        aki.append(ids[0])
        ski.append(ids[1])

    count = len(blocks)
    parent: list[int | None] = [None] * count
    is_parent = [False] * count
    for i in range(count):
        for j in range(count):
            if i == j or (aki[i] is None and ski[j] is None):
                continue
            if (aki[i] or b"") == (ski[j] or b""):
                is_parent[j] = True
                parent[i] = j
                break

    leaf = next((i for i in range(count) if not is_parent[i]), None)
    if leaf is None:
        raise RenderError("no leaf found")
    chain: list[int] = []
    node: int | None = leaf
    while node is not None:
        if len(chain) >= count:
            raise RenderError("constructing chain resulted in cycle")
        chain.append(node)
        node = parent[node]

    if len(chain) != count:
        log.warning("%s%s", CHAIN_INCOMPLETE_WARNING, f" ({label})" if label else "")
        return pem_text
    return b"".join(pem_encode(CERTIFICATE, blocks[i].data) for i in chain)


# ---------------------------------------------------------------------------------------------
# PKCS#12 → PEM (upstream decodePKCS12)
# ---------------------------------------------------------------------------------------------


def _load_passwordless_pfx(raw: bytes) -> pkcs12.PKCS12KeyAndCertificates:
    """Load a PFX protected by no password or the empty password (Key Vault uses either)."""
    for password in (None, b""):
        try:
            return pkcs12.load_pkcs12(raw, password)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
    raise RenderError(
        "failed to decode PKCS#12 (PFX) data: not a valid password-less PFX"
        " (Key Vault stores certificates with content type application/x-pkcs12 as a"
        " base64 PFX without password; re-import the certificate or use objectFormat: pfx)"
    )


def _bag_order(raw: bytes, certs: list[x509.Certificate]) -> list[x509.Certificate]:
    """Put certificates back into PFX bag order when that order is observable.

    OpenSSL hands out the certificate matching the key first, then the others in bag order.
    When the certificate bags are not encrypted, each DER appears verbatim in the PFX, so
    sorting by position restores the exact order Go's pkcs12.ToPEM sees. Otherwise the
    OpenSSL order (matching certificate first, as Key Vault itself writes) is kept.
    """
    positions: list[int] = []
    search_from: dict[bytes, int] = {}
    for cert in certs:
        der = cert.public_bytes(serialization.Encoding.DER)
        at = raw.find(der, search_from.get(der, 0))
        if at < 0:
            return certs
        search_from[der] = at + 1
        positions.append(at)
    return [cert for _, cert in sorted(zip(positions, certs, strict=True), key=lambda pair: pair[0])]


def pfx_to_pem(pfx_b64: str | bytes, *, construct_chain: bool = True, label: str = "") -> bytes:
    """Base64 password-less PFX → PEM: the private key as PKCS#8 first, then the certificates.

    Certificates are chain-ordered (see `order_chain`) when `construct_chain`, else kept in
    PFX bag order. Headers (friendlyName, localKeyId) are dropped, as upstream does.
    """
    try:
        raw = b64decode_std(pfx_b64)
    except ValueError as err:
        raise RenderError(
            f"failed to decode PFX: {err} (the value must be a standard base64 PFX)"
        ) from None
    bundle = _load_passwordless_pfx(raw)

    key_pem = b""
    if bundle.key is not None:
        der = bundle.key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        key_pem = pem_encode(PRIVATE_KEY, der)

    certs = [bundle.cert.certificate] if bundle.cert is not None else []
    certs += [extra.certificate for extra in bundle.additional_certs]
    cert_pem = b"".join(
        pem_encode(CERTIFICATE, cert.public_bytes(serialization.Encoding.DER))
        for cert in _bag_order(raw, certs)
    )
    if construct_chain:
        cert_pem = order_chain(cert_pem, label=label)
    return key_pem + cert_pem


# ---------------------------------------------------------------------------------------------
# Certificates and keys
# ---------------------------------------------------------------------------------------------


def cer_to_pem(cer_b64: str | bytes) -> bytes:
    """A CertificateBundle's `cer` (standard base64 DER) → one CERTIFICATE block, as upstream."""
    try:
        der = b64decode_std(cer_b64)
    except ValueError as err:
        raise RenderError(f"certificate 'cer' is not standard base64: {err}") from None
    return pem_encode(CERTIFICATE, der)


_CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}


def jwk_to_pem(jwk: Mapping[str, Any] | None) -> bytes:
    """A Key Vault JsonWebKey → its public key as SubjectPublicKeyInfo PEM (`PUBLIC KEY`).

    RSA/RSA-HSM and EC/EC-HSM on P-256/P-384/P-521 only, like upstream; the private members
    (if any) are ignored.
    """
    if jwk is None:
        raise RenderError("key value is nil")
    if jwk.get("kid") is None:
        raise RenderError("key id is nil")
    kty = jwk.get("kty") or ""
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    if kty in ("RSA", "RSA-HSM"):
        n = int.from_bytes(_b64url_decode(jwk.get("n"), "n"), "big")
        e = int.from_bytes(_b64url_decode(jwk.get("e"), "e"), "big")
        try:
            public_key = rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError:
            raise RenderError("invalid RSA public key in JWK members 'n' and 'e'") from None
    elif kty in ("EC", "EC-HSM"):
        x = int.from_bytes(_b64url_decode(jwk.get("x"), "x"), "big")
        y = int.from_bytes(_b64url_decode(jwk.get("y"), "y"), "big")
        crv = jwk.get("crv") or ""
        curve = _CURVES.get(crv)
        if curve is None:
            raise RenderError(f"curve {crv} is not supported")
        try:
            public_key = ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
        except ValueError:
            raise RenderError(f"invalid EC public key: point (x, y) is not on curve {crv}") from None
    else:
        raise RenderError(f"failed to get key. key type '{kty}' currently not supported")
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem_encode(PUBLIC_KEY, der)
