"""Read a response body with a size cap that also holds after decompression.

A Key Vault or token endpoint answer is small (a certificate bundle is a few KiB, the largest
secret 25 KiB); a huge one is a fault or an attack on the daemon's memory. httpx decompresses a
whole network chunk at once (a 64 KiB gzip chunk can hold 64 MiB), so the body is read raw and
decompressed here, never producing more than the cap plus one byte.
"""

from __future__ import annotations

import zlib
from typing import Any, Protocol

import httpx

# Key Vault: a secret value is at most 25 KiB, a certificate bundle with its chain a few KiB;
# version lists come in pages of 25. 4 MiB leaves a wide margin and still bounds memory.
VAULT_BODY_CAP = 4 * 1024 * 1024
# Entra ID, IMDS and NMI answer with one token (a few KiB) or a short error.
TOKEN_BODY_CAP = 1024 * 1024

# Content-Encoding → zlib window bits (`deflate` is tried as zlib first, then raw, as httpx does).
_WBITS = {"gzip": zlib.MAX_WBITS | 16, "x-gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS}
_DROPPED_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})


class BodyError(Exception):
    """The body could not be read within the rules; `code` says why (for logs and metrics)."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class _Decoder(Protocol):
    def decompress(self, data: bytes, max_length: int = ..., /) -> bytes: ...

    @property
    def unconsumed_tail(self) -> bytes: ...

    def flush(self) -> bytes: ...


class _Identity:
    """Passes bytes through, honouring `max_length` like a zlib decompressor."""

    def __init__(self) -> None:
        self.unconsumed_tail = b""

    def decompress(self, data: bytes, max_length: int = 0, /) -> bytes:
        out, self.unconsumed_tail = data[:max_length], data[max_length:]
        return out

    def flush(self) -> bytes:
        return b""


class _Deflate:
    """`Content-Encoding: deflate`: zlib-wrapped as the RFC says, or raw as some servers send."""

    def __init__(self) -> None:
        self._inner: Any = None
        self.unconsumed_tail = b""

    def decompress(self, data: bytes, max_length: int = 0, /) -> bytes:
        if self._inner is None:
            self._inner = zlib.decompressobj(_WBITS["deflate"])
            try:
                out = self._inner.decompress(data, max_length)
            except zlib.error:
                self._inner = zlib.decompressobj(-zlib.MAX_WBITS)
                out = self._inner.decompress(data, max_length)
        else:
            out = self._inner.decompress(data, max_length)
        self.unconsumed_tail = self._inner.unconsumed_tail
        return bytes(out)

    def flush(self) -> bytes:
        return bytes(self._inner.flush()) if self._inner is not None else b""


def _decoder(encoding: str) -> _Decoder:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return _Identity()
    if encoding == "deflate":
        return _Deflate()
    if encoding in _WBITS:
        return zlib.decompressobj(_WBITS[encoding])  # type: ignore[return-value]
    raise BodyError(f"the answer uses Content-Encoding {encoding[:40]!r}, which kvfs did not ask for",
                    code="BadResponse")


async def _read(response: httpx.Response, cap: int, what: str) -> bytes:
    too_large = BodyError(f"{what} answered with more than {cap // 1024} KiB", code="ResponseTooLarge")
    if response.is_stream_consumed:
        # Already in memory (an in-process transport such as httpx.MockTransport).
        if len(response.content) > cap:
            raise too_large
        return response.content
    decoder = _decoder(response.headers.get("content-encoding", ""))
    parts: list[bytes] = []
    total = 0
    try:
        async for raw in response.aiter_raw():
            data = raw
            while data:
                out = decoder.decompress(data, cap + 1 - total)
                total += len(out)
                if total > cap:
                    raise too_large
                parts.append(out)
                data = decoder.unconsumed_tail
        tail = decoder.flush()
    except zlib.error:
        raise BodyError(f"{what} sent a body that does not decompress", code="BadResponse") from None
    total += len(tail)
    if total > cap:
        raise too_large
    parts.append(tail)
    return b"".join(parts)


async def send(http: httpx.AsyncClient, request: httpx.Request, *, cap: int, what: str) -> httpx.Response:
    """Send `request`; the answer's body is in memory, decompressed, at most `cap` bytes.

    Raises `BodyError` (code `ResponseTooLarge` or `BadResponse`) instead of reading more; httpx
    errors (timeouts, connection failures) pass through for the retry policy to judge.
    """
    response = await http.send(request, stream=True)
    try:
        body = await _read(response, cap, what)
    finally:
        await response.aclose()
    headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _DROPPED_HEADERS]
    return httpx.Response(
        response.status_code,
        headers=headers,
        content=body,
        request=request,
        extensions=response.extensions,
    )
