"""Body caps: Key Vault answers at 4 MiB, token endpoints at 1 MiB, decompressed bytes counted."""

from __future__ import annotations

import errno
import gzip
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from kvfs.auth.base import AccessToken
from kvfs.auth.flows import ClientSecretCredential, ImdsCredential
from kvfs.errors import AuthError, VaultError
from kvfs.net.body import TOKEN_BODY_CAP, VAULT_BODY_CAP, BodyError, send
from kvfs.net.http import make_http_client
from kvfs.vault.client import VaultClient

MiB = 1024 * 1024
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"


class Streamed(httpx.AsyncByteStream):
    """A body that arrives over time, as from a socket (httpx does not pre-read it)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.sent += len(chunk)
            yield chunk


def chunked(data: bytes, size: int = 64 * 1024) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def gzip_bomb(decompressed: int) -> bytes:
    """`decompressed` zero bytes, gzip-compressed (about a thousandth of the size)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = bytes(MiB)
    out = [packer.compress(block) for _ in range(decompressed // MiB)]
    out.append(packer.flush())
    return b"".join(out)


def client(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.AsyncClient:
    return make_http_client(transport=httpx.MockTransport(handler))


class Token:
    async def get_token(self, scope: str) -> AccessToken:
        return AccessToken("tok", expires_at=1e12)

    async def aclose(self) -> None:
        return None


async def read(response: httpx.Response, cap: int) -> bytes:
    async with client(lambda request: response) as http:
        answer = await send(http, http.build_request("GET", "https://example.test/"), cap=cap, what="example")
    return answer.content


async def test_a_body_at_the_cap_is_read_whole_and_decompressed() -> None:
    data = b"x" * 1000
    plain = await read(httpx.Response(200, stream=Streamed(chunked(data, 7))), cap=1000)
    packed = await read(
        httpx.Response(200, headers={"Content-Encoding": "gzip"}, stream=Streamed(chunked(gzip.compress(data), 5))),
        cap=1000,
    )
    deflated = await read(
        httpx.Response(200, headers={"Content-Encoding": "deflate"}, stream=Streamed([zlib.compress(data)])),
        cap=1000,
    )
    assert plain == packed == deflated == data


@pytest.mark.parametrize("encoding", ["", "gzip"])
async def test_one_byte_over_the_cap_is_refused(encoding: str) -> None:
    data = b"y" * 1001
    body = gzip.compress(data) if encoding else data
    headers = {"Content-Encoding": encoding} if encoding else {}
    with pytest.raises(BodyError) as caught:
        await read(httpx.Response(200, headers=headers, stream=Streamed(chunked(body, 100))), cap=1000)
    assert caught.value.code == "ResponseTooLarge"


async def test_a_gzip_bomb_is_never_decompressed_beyond_the_cap() -> None:
    bomb = gzip_bomb(256 * MiB)
    assert len(bomb) < MiB  # small on the wire
    stream = Streamed(chunked(bomb))
    tracemalloc.start()
    try:
        with pytest.raises(BodyError) as caught:
            await read(httpx.Response(200, headers={"Content-Encoding": "gzip"}, stream=stream), cap=VAULT_BODY_CAP)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.code == "ResponseTooLarge"
    # Decompressing one 64 KiB network chunk at once would already take about 64 MiB.
    assert peak < 4 * VAULT_BODY_CAP
    assert stream.sent < len(bomb)  # reading stopped at the cap


async def test_an_encoding_kvfs_did_not_ask_for_is_refused() -> None:
    with pytest.raises(BodyError) as caught:
        await read(httpx.Response(200, headers={"Content-Encoding": "br"}, stream=Streamed([b"x"])), cap=100)
    assert caught.value.code == "BadResponse"
    with pytest.raises(BodyError) as caught:
        await read(httpx.Response(200, headers={"Content-Encoding": "gzip"}, stream=Streamed([b"not gzip"])), cap=100)
    assert caught.value.code == "BadResponse"


async def test_the_client_asks_only_for_encodings_it_can_bound() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": "https://demo.vault.azure.net/secrets/db/v", "value": "x"})

    async with client(handler) as http:
        await VaultClient("https://demo.vault.azure.net/", Token(), "s", http).get("secret", "db")
    assert seen[0].headers["accept-encoding"] == "gzip, deflate"


@pytest.mark.parametrize("bomb", [False, True])
async def test_key_vault_answer_over_4_mib_fails_that_read(bomb: bool) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if bomb:
            return httpx.Response(200, headers={"Content-Encoding": "gzip"}, stream=Streamed(chunked(gzip_bomb(64 * MiB))))
        return httpx.Response(200, stream=Streamed(chunked(b'{"value": "' + b"a" * VAULT_BODY_CAP + b'"}')))

    async with client(handler) as http:
        vault = VaultClient("https://demo.vault.azure.net/", Token(), "s", http)
        with pytest.raises(VaultError) as caught:
            await vault.get("secret", "db")
    err = caught.value
    assert err.code == "ResponseTooLarge" and err.errno == errno.EIO
    assert str(err) == "secret 'db': vault demo.vault.azure.net answered with more than 4096 KiB"
    assert calls == 1  # not retried: it would only come back as large


async def test_token_endpoint_answer_over_1_mib_is_an_auth_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        padding = "p" * TOKEN_BODY_CAP
        return httpx.Response(200, stream=Streamed([f'{{"access_token": "t", "expires_in": 60, "x": "{padding}"}}'.encode()]))

    async with client(handler) as http:
        entra = ClientSecretCredential("https://login.microsoftonline.com", TENANT, CLIENT_ID, "s3cret", http)
        with pytest.raises(AuthError) as caught:
            await entra.get_token("https://vault.azure.net/.default")
        assert caught.value.code == "ResponseTooLarge" and caught.value.errno == errno.EIO
        assert "Entra ID at https://login.microsoftonline.com" in str(caught.value)
        with pytest.raises(AuthError) as caught:
            await ImdsCredential(None, http, base_url="http://imds").get_token("https://vault.azure.net/.default")
        assert caught.value.code == "ResponseTooLarge"
