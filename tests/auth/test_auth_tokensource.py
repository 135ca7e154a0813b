"""FileTokenSource re-reads on change; PushedTokenSource waits for a republish when expired."""

from __future__ import annotations

import os

import jwt
import pytest
import trio
import trio.testing

from kvfs.auth.tokensource import FileTokenSource, PushedTokenSource, unverified_claims
from kvfs.errors import AuthError


async def test_file_token_stripped_and_reread_on_change(tmp_path) -> None:
    path = tmp_path / "azure-identity-token"
    path.write_text("first-token\n")
    source = FileTokenSource(str(path))
    assert await source.get() == "first-token"

    # kubelet's atomic writer swaps the file: new inode, new content
    new = tmp_path / "new"
    new.write_text("  second-token-longer \n")
    os.replace(new, path)
    assert await source.get() == "second-token-longer"


async def test_file_token_same_size_rewrite_detected_by_mtime(tmp_path) -> None:
    path = tmp_path / "token"
    path.write_text("aaaa")
    source = FileTokenSource(str(path))
    assert await source.get() == "aaaa"
    st = os.stat(path)
    path.write_text("bbbb")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert await source.get() == "bbbb"


async def test_file_token_not_reread_when_unchanged(tmp_path, monkeypatch) -> None:
    path = tmp_path / "token"
    path.write_text("tok")
    source = FileTokenSource(str(path))
    await source.get()
    opened: list[str] = []
    real_open = open

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(str(args[0]))
        return real_open(*args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    assert await source.get() == "tok"
    assert opened == []


async def test_file_token_missing_empty_unreadable(tmp_path) -> None:
    missing = FileTokenSource(str(tmp_path / "nope"))
    with pytest.raises(AuthError) as exc:
        await missing.get()
    assert "nope" in str(exc.value) and "AZURE_FEDERATED_TOKEN_FILE" in str(exc.value)
    assert exc.value.code == "token_file_missing"

    empty = tmp_path / "empty"
    empty.write_text(" \n")
    with pytest.raises(AuthError) as exc:
        await FileTokenSource(str(empty)).get()
    assert str(empty) in str(exc.value) and exc.value.code == "token_file_empty"

    directory = FileTokenSource(str(tmp_path))  # reading a directory fails like an unreadable file
    with pytest.raises(AuthError) as exc:
        await directory.get()
    assert exc.value.code == "token_file_unreadable" and str(tmp_path) in str(exc.value)

    with pytest.raises(AuthError):
        await FileTokenSource("").get()


async def test_file_token_content_never_in_errors(tmp_path) -> None:
    path = tmp_path / "token"
    path.write_bytes(b"secret-token-\xff\xfe")  # not UTF-8
    with pytest.raises(AuthError) as exc:
        await FileTokenSource(str(path)).get()
    assert "secret-token" not in str(exc.value)
    assert "secret-token" not in repr(FileTokenSource(str(path)))


async def test_pushed_token_returned_while_valid(sa_token) -> None:
    token = sa_token(3600)
    source = PushedTokenSource(token + "\n")
    assert await source.get() == token
    assert token not in repr(source)


async def test_pushed_token_waits_for_push_when_expired(autojump_clock, sa_token) -> None:
    expired = sa_token(-10)
    fresh = sa_token(3600)
    source = PushedTokenSource(expired)
    got: list[str] = []

    async def reader() -> None:
        got.append(await source.get())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(5)
        assert got == []  # still waiting, did not hand out the expired token
        source.push(fresh)
    assert got == [fresh]


async def test_pushed_token_expired_push_keeps_waiting(autojump_clock, sa_token) -> None:
    source = PushedTokenSource(sa_token(-10))
    fresh = sa_token(3600)
    got: list[str] = []

    async def reader() -> None:
        got.append(await source.get())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(1)
        source.push(sa_token(-5))  # a stale republish does not wake the reader for good
        await trio.sleep(1)
        assert got == []
        source.push(fresh)
    assert got == [fresh]


async def test_pushed_token_gives_up_after_bounded_wait(autojump_clock, sa_token) -> None:
    source = PushedTokenSource(sa_token(-10), wait_for_push=30.0)
    start = trio.current_time()
    with pytest.raises(AuthError) as exc:
        await source.get()
    assert trio.current_time() - start == pytest.approx(30.0)
    assert "service account token expired; waiting for kubelet to republish" in str(exc.value)
    assert exc.value.code == "sa_token_expired"


async def test_pushed_opaque_token_passes_through() -> None:
    assert await PushedTokenSource("not-a-jwt").get() == "not-a-jwt"
    source = PushedTokenSource("a")
    source.push("   ")  # ignored
    assert await source.get() == "a"


@pytest.mark.parametrize(
    "token",
    ["", "opaque", "a.b", "a.b.c.d", "x.!!!.y", "x." + "bm90IGpzb24" + ".y", "x." + "WzEsMl0" + ".y", "x.gA.y"],
)
def test_claims_that_cannot_be_read_are_none(token: str) -> None:
    """Not JWT-shaped, not base64, not JSON, not an object (`[1,2]`), not UTF-8: no claims, no error."""
    assert unverified_claims(token) == {}


def test_claims_are_read_as_pyjwt_reads_them() -> None:
    claims = {"iss": "https://issuer", "sub": "system:serviceaccount:ns:sa", "aud": ["api://AzureADTokenExchange"], "exp": 17}
    token = jwt.encode(claims, "a key long enough for HMAC-SHA256 checks", algorithm="HS256")
    assert unverified_claims(token) == jwt.decode(token, options={"verify_signature": False}) == claims
