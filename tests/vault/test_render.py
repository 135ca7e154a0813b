"""render_object: bundle → file bytes for every type × format × encoding, by upstream's rules.

Expected bytes are derived from the rules with `cryptography`'s serialisers, never captured
from render_object itself.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import certgen as g
import pytest

from kvfs.config.model import ObjectSpec
from kvfs.errors import RenderError
from kvfs.vault.render import render_object

FORMATS = ["", "pem", "pfx"]
ENCODINGS = ["", "utf-8", "base64", "hex"]
PLAIN_TEXT = "plain text – ünïcode €"
BINARY = b"\x00\x01binary\xff\xfe secret"
ERROR = "error"


def spec(type_: str = "secret", name: str = "secret1", **kwargs: Any) -> ObjectSpec:
    return ObjectSpec(name=name, type=type_, **kwargs)  # type: ignore[arg-type]


def prefix(s: ObjectSpec) -> str:
    return f"failed to get objectType:{s.type}, objectName:{s.name}, objectVersion:{s.version}: "


@pytest.fixture(scope="module")
def chain() -> g.Chain:
    return g.make_chain(3, key_type="ec")


@pytest.fixture(scope="module")
def rsa_key() -> g.PrivateKey:
    return g.rsa_key()


# --- objectEncoding: upstream's unit-test vectors ------------------------------------------------


def test_no_encoding_returns_value() -> None:
    assert render_object(spec(), g.secret_bundle("abcdefg")) == {"": b"abcdefg"}


def test_base64_vector() -> None:
    out = render_object(spec(encoding="base64"), g.secret_bundle("QmFzZTY0RW5jb2RlZFN0cmluZw=="))
    assert out == {"": b"Base64EncodedString"}


@pytest.mark.parametrize("value", ["486578456E636F646564537472696E67", "486578456e636f646564537472696e67"])
def test_hex_vector_either_case(value: str) -> None:
    assert render_object(spec(encoding="hex"), g.secret_bundle(value)) == {"": b"HexEncodedString"}


def test_invalid_encoding() -> None:
    s = spec(encoding="NotAnEncoding")  # type: ignore[arg-type]
    with pytest.raises(RenderError) as info:
        render_object(s, g.secret_bundle("abcdefg"))
    assert str(info.value) == prefix(s) + "invalid objectEncoding. Should be utf-8, base64, or hex"


def test_cert_and_key_ignore_encoding(chain: g.Chain) -> None:
    for encoding in ENCODINGS:
        assert render_object(spec("cert", "c", encoding=encoding), g.cert_bundle(chain.leaf)) == {
            "": g.cert_pem(chain.leaf)
        }
        assert render_object(spec("key", "k", encoding=encoding), g.key_bundle(chain.leaf_key)) == {
            "": g.public_key_pem(chain.leaf_key)
        }


def test_utf8_bytes_pass_through_and_lone_surrogates_become_replacement_char() -> None:
    assert render_object(spec(), g.secret_bundle(PLAIN_TEXT)) == {"": PLAIN_TEXT.encode("utf-8")}
    assert render_object(spec(), g.secret_bundle("a\ud800b")) == {"": "a\ufffdb".encode("utf-8")}


@pytest.mark.parametrize(
    ("encoding", "value", "problem"),
    [
        ("base64", "c2VjcmV0LXZhbHVl*", "illegal base64 data at input byte 16"),
        ("base64", "c2VjcmV0LXZhbHVl=", "illegal base64 data at input byte 16"),
        ("base64", "c2VjcmV0LXZhbHV", "illegal base64 data at input byte 12"),
        ("hex", "73656372657476616c7565zz", "invalid hex character at input byte 22"),
        ("hex", "73656372657476616c75650", "odd length hex string"),
    ],
)
def test_decode_errors_name_the_problem_and_fix_without_the_secret(
    encoding: str, value: str, problem: str
) -> None:
    s = spec(encoding=encoding)  # type: ignore[arg-type]
    with pytest.raises(RenderError) as info:
        render_object(s, g.secret_bundle(value))
    message = str(info.value)
    assert message.startswith(prefix(s) + f"objectEncoding {encoding}: {problem}")
    assert "remove objectEncoding" in message
    assert value not in message and "secret" not in message.removeprefix(prefix(s))
    assert value not in repr(info.value)


# --- certificate-backed secrets: upstream's unit-test vectors ------------------------------------


def test_cert_backed_pem_is_verbatim(chain: g.Chain) -> None:
    # Root first and CRLF: never reordered nor re-encoded. Upstream never orders a PEM content
    # type; kept for compatibility.
    value = (g.certs_pem(reversed(chain.certs)) + g.key_pem(chain.leaf_key)).decode().replace("\n", "\r\n")
    bundle = g.cert_secret_bundle(value, g.CONTENT_TYPE_PEM)
    for fmt in FORMATS:
        s = spec(format=fmt)  # type: ignore[arg-type]
        assert render_object(s, bundle) == {"": value.encode()}


def test_cert_backed_pkcs12_pfx_is_base64_unchanged(chain: g.Chain) -> None:
    value = g.pfx_b64(chain.leaf_key, chain.certs)
    assert render_object(spec(format="pfx"), g.cert_secret_bundle(value, g.CONTENT_TYPE_PKCS12)) == {
        "": value.encode()
    }


def test_cert_backed_pkcs12_pfx_base64_gives_binary_pfx(chain: g.Chain) -> None:
    raw = g.pfx(chain.leaf_key, chain.certs)
    bundle = g.cert_secret_bundle(base64.b64encode(raw).decode(), g.CONTENT_TYPE_PKCS12)
    assert render_object(spec(format="pfx", encoding="base64"), bundle) == {"": raw}


@pytest.mark.parametrize("fmt", ["", "pem"])
def test_cert_backed_pkcs12_pem_is_key_then_chain(chain: g.Chain, rsa_key: g.PrivateKey, fmt: str) -> None:
    bags = [chain.root, chain.leaf, chain.certs[1]]
    bundle = g.cert_secret_bundle(g.pfx_b64(chain.leaf_key, bags), g.CONTENT_TYPE_PKCS12)
    expected = g.key_pem(chain.leaf_key) + g.certs_pem(chain.certs)
    assert render_object(spec(format=fmt), bundle) == {"": expected}  # type: ignore[arg-type]
    unordered = g.key_pem(chain.leaf_key) + g.certs_pem(bags)
    assert render_object(spec(format=fmt), bundle, construct_pem_chain=False) == {"": unordered}  # type: ignore[arg-type]

    cert = g.self_signed(rsa_key)
    bundle = g.cert_secret_bundle(g.pfx_b64(rsa_key, [cert]), g.CONTENT_TYPE_PKCS12)
    assert render_object(spec(format=fmt), bundle) == {"": g.key_pem(rsa_key) + g.cert_pem(cert)}  # type: ignore[arg-type]


def test_split_files_come_first_in_order_crt_key_main(chain: g.Chain) -> None:
    bundle = g.cert_secret_bundle(g.pfx_b64(chain.leaf_key, chain.certs[::-1]), g.CONTENT_TYPE_PKCS12)
    out = render_object(spec(), bundle, split_cert_key=True)
    assert list(out) == [".crt", ".key", ""]
    assert out[".crt"] == g.certs_pem(chain.certs)
    assert out[".key"] == g.key_pem(chain.leaf_key)
    assert out[""] == g.key_pem(chain.leaf_key) + g.certs_pem(chain.certs)


def test_split_pem_content_keeps_key_vault_order_and_reencodes(chain: g.Chain) -> None:
    certs = [chain.root, chain.leaf, chain.certs[1]]
    value = "note\r\n" + g.pem_bundle(chain.leaf_key, certs).decode().replace("\n", "\r\n")
    out = render_object(spec(), g.cert_secret_bundle(value, g.CONTENT_TYPE_PEM), split_cert_key=True)
    assert list(out) == [".crt", ".key", ""]
    assert out[".crt"] == g.certs_pem(certs)
    assert out[".key"] == g.key_pem(chain.leaf_key)
    assert out[""] == value.encode()


def test_split_flag_ignored_for_plain_secrets_keys_and_certs(chain: g.Chain) -> None:
    assert render_object(spec(), g.secret_bundle(PLAIN_TEXT), split_cert_key=True) == {"": PLAIN_TEXT.encode()}
    assert list(render_object(spec("cert"), g.cert_bundle(chain.leaf), split_cert_key=True)) == [""]
    assert list(render_object(spec("key"), g.key_bundle(chain.leaf_key), split_cert_key=True)) == [""]


def test_managed_without_kid_is_a_plain_secret(chain: g.Chain) -> None:
    value = g.pfx_b64(chain.leaf_key, chain.certs)
    bundle = g.secret_bundle(value, content_type=g.CONTENT_TYPE_PKCS12, managed=True)
    assert render_object(spec(), bundle, split_cert_key=True) == {"": value.encode()}
    bundle["kid"] = ""
    assert render_object(spec(), bundle, split_cert_key=True) == {"": value.encode()}


# --- kvfs improvement: with objectFormat pfx upstream's split files are empty, kvfs's hold PEM ---


@pytest.mark.parametrize("encoding", ["", "base64"])
def test_pfx_split_files_hold_pem(chain: g.Chain, encoding: str) -> None:
    raw = g.pfx(chain.leaf_key, [chain.certs[1], chain.leaf, chain.root])
    value = base64.b64encode(raw).decode()
    s = spec(format="pfx", encoding=encoding)  # type: ignore[arg-type]
    out = render_object(s, g.cert_secret_bundle(value, g.CONTENT_TYPE_PKCS12), split_cert_key=True)
    assert list(out) == [".crt", ".key", ""]
    assert out[".crt"] == g.certs_pem(chain.certs)
    assert out[".key"] == g.key_pem(chain.leaf_key)
    assert out[""] == (raw if encoding == "base64" else value.encode())


def test_pfx_split_undecodable_leaves_files_empty(caplog: pytest.LogCaptureFixture) -> None:
    value = base64.b64encode(b"not a pfx but valid base64").decode()
    with caplog.at_level(logging.WARNING, logger="kvfs.vault.render"):
        out = render_object(
            spec(format="pfx"), g.cert_secret_bundle(value, g.CONTENT_TYPE_PKCS12), split_cert_key=True
        )
    assert out == {".crt": b"", ".key": b"", "": value.encode()}
    assert any("secret/secret1" in r.getMessage() for r in caplog.records)
    assert all(value not in r.getMessage() for r in caplog.records)


# --- errors ----------------------------------------------------------------------------------


def test_unknown_content_type_upstream_message() -> None:
    s = spec()
    bundle = g.cert_secret_bundle("x", "text/plain")
    with pytest.raises(RenderError) as info:
        render_object(s, bundle)
    assert str(info.value) == (
        "failed to get objectType:secret, objectName:secret1, objectVersion:: "
        "failed to get certificate. unknown content type 'text/plain'"
    )


def test_prefix_carries_version() -> None:
    s = spec(version="0123456789abcdef0123456789abcdef")
    with pytest.raises(RenderError, match="^failed to get objectType:secret, objectName:secret1, "
                       "objectVersion:0123456789abcdef0123456789abcdef: secret value is nil$"):
        render_object(s, {"id": g.object_id("secrets", "secret1")})


@pytest.mark.parametrize(
    ("type_", "bundle", "message"),
    [
        ("secret", {"id": "x"}, "secret value is nil"),
        ("secret", {"value": "v"}, "secret id is nil"),
        ("key", {"attributes": {}}, "key value is nil"),
        ("key", {"key": {"kty": "RSA", "n": "AQAB", "e": "AQAB"}}, "key id is nil"),
        ("cert", {"id": "x"}, "certificate value is nil"),
        ("cert", {"cer": "dGVzdA=="}, "certificate id is nil"),
    ],
)
def test_nil_members(type_: str, bundle: dict[str, Any], message: str) -> None:
    s = spec(type_, "obj")
    with pytest.raises(RenderError) as info:
        render_object(s, bundle)
    assert str(info.value) == prefix(s) + message


def test_pem_certificate_with_base64_encoding_fails_like_issue_1945(chain: g.Chain) -> None:
    value = g.pem_bundle(chain.leaf_key, chain.certs).decode()
    s = spec(format="pfx", encoding="base64")
    with pytest.raises(RenderError) as info:
        render_object(s, g.cert_secret_bundle(value, g.CONTENT_TYPE_PEM))
    assert str(info.value).startswith(prefix(s) + "objectEncoding base64: illegal base64 data at input byte 0")
    assert "PRIVATE KEY" not in str(info.value)


def test_bad_pfx_error_is_prefixed_and_safe() -> None:
    value = base64.b64encode(b"top-secret-material").decode()
    s = spec()
    with pytest.raises(RenderError) as info:
        render_object(s, g.cert_secret_bundle(value, g.CONTENT_TYPE_PKCS12))
    assert str(info.value).startswith(prefix(s) + "failed to decode PKCS#12 (PFX) data")
    assert value not in str(info.value) and "top-secret" not in str(info.value)


def test_key_type_with_certificate_name_gives_certificate_public_key(chain: g.Chain) -> None:
    # Key Vault's key behind a certificate is the certificate's key (e2e vector).
    out = render_object(spec("key", "web"), g.key_bundle(chain.leaf.public_key(), name="web"))
    assert out == {"": g.public_key_pem(chain.leaf.public_key())}


# --- every type × format × encoding ----------------------------------------------------------

KINDS = ["plain", "pem-cert", "pkcs12-cert", "rsa-key", "ec-key", "cert"]


def _fixture(kind: str, encoding: str, chain: g.Chain, rsa_key: g.PrivateKey) -> tuple[str, dict[str, Any]]:
    if kind == "plain":
        value = {"base64": base64.b64encode(BINARY).decode(), "hex": BINARY.hex().upper()}.get(encoding, PLAIN_TEXT)
        return "secret", g.secret_bundle(value)
    if kind == "pem-cert":
        return "secret", g.cert_secret_bundle(g.pem_bundle(chain.leaf_key, chain.certs[::-1]).decode(), g.CONTENT_TYPE_PEM)
    if kind == "pkcs12-cert":
        return "secret", g.cert_secret_bundle(g.pfx_b64(chain.leaf_key, chain.certs[::-1]), g.CONTENT_TYPE_PKCS12)
    if kind == "rsa-key":
        return "key", g.key_bundle(rsa_key)
    if kind == "ec-key":
        return "key", g.key_bundle(chain.leaf_key, hsm=True)
    return "cert", g.cert_bundle(chain.leaf)


def _expected(
    kind: str, fmt: str, encoding: str, split: bool, stored_value: str, chain: g.Chain, rsa_key: g.PrivateKey
) -> dict[str, bytes] | str:
    """Upstream's bytes per type, format and encoding, written out independently of the implementation."""
    if kind == "rsa-key":
        return {"": g.public_key_pem(rsa_key)}
    if kind == "ec-key":
        return {"": g.public_key_pem(chain.leaf_key)}
    if kind == "cert":
        return {"": g.cert_pem(chain.leaf)}
    if kind == "plain":
        return {"": BINARY if encoding in ("base64", "hex") else PLAIN_TEXT.encode()}
    key, ordered, stored = g.key_pem(chain.leaf_key), g.certs_pem(chain.certs), g.certs_pem(chain.certs[::-1])
    if kind == "pem-cert":
        if encoding in ("base64", "hex"):
            return ERROR  # PEM text is neither base64 nor hex
        files = {".crt": stored, ".key": key} if split else {}
        return {**files, "": key + stored}
    pfx_text = stored_value.encode()  # PFX serialisation is salted: reuse the stored bytes
    if fmt == "pfx":
        if encoding == "hex":
            return ERROR
        main = base64.b64decode(pfx_text) if encoding == "base64" else pfx_text
        files = {".crt": ordered, ".key": key} if split else {}
        return {**files, "": main}
    if encoding in ("base64", "hex"):
        return ERROR
    files = {".crt": ordered, ".key": key} if split else {}
    return {**files, "": key + ordered}


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_matrix(kind: str, fmt: str, encoding: str, split: bool, chain: g.Chain, rsa_key: g.PrivateKey) -> None:
    type_, bundle = _fixture(kind, encoding, chain, rsa_key)
    s = spec(type_, "obj", format=fmt, encoding=encoding)
    expected = _expected(kind, fmt, encoding, split, bundle.get("value", ""), chain, rsa_key)
    if expected == ERROR:
        with pytest.raises(RenderError) as info:
            render_object(s, bundle, split_cert_key=split)
        assert str(info.value).startswith(prefix(s) + f"objectEncoding {encoding}: ")
        return
    out = render_object(s, bundle, split_cert_key=split)
    assert out == expected
    assert list(out) == list(expected)  # type: ignore[arg-type]
