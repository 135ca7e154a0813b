"""PEM text and base64 exactly as the upstream Azure provider (Go) writes and reads them.

Why a module of its own: users' files must be byte-identical to what the Go provider writes, so
the PEM codec here is a faithful port of Go's `encoding/pem` (block detection, headers, 64-column
lines), with Go's base64 rules. Certificates and keys (PFX, chains, JWK) are kvfs.vault.pkix,
which needs `cryptography`; this module does not, so a mount of plain secrets never loads it.

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


from kvfs.errors import RenderError

log = logging.getLogger(__name__)

__all__ = [
    "PemBlock",
    "b64decode_std",
    "b64url_decode",
    "cer_to_pem",
    "go_string_bytes",
    "pem_blocks",
    "pem_decode",
    "pem_encode",
    "split_pem",
]

CERTIFICATE = "CERTIFICATE"
PRIVATE_KEY = "PRIVATE KEY"
PUBLIC_KEY = "PUBLIC KEY"

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


def b64url_decode(value: Any, member: str) -> bytes:
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
# Certificates
# ---------------------------------------------------------------------------------------------


def cer_to_pem(cer_b64: str | bytes) -> bytes:
    """A CertificateBundle's `cer` (standard base64 DER) → one CERTIFICATE block, as upstream."""
    try:
        der = b64decode_std(cer_b64)
    except ValueError as err:
        raise RenderError(f"certificate 'cer' is not standard base64: {err}") from None
    return pem_encode(CERTIFICATE, der)
