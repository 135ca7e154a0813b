"""PEM / PFX / JWK conversions against the upstream provider's rules and its unit-test vectors.

Expected bytes are built from the generated objects with `cryptography`'s own serialisers
(PKCS#8 / SPKI / certificate PEM) concatenated in the order the rules prescribe.
"""

from __future__ import annotations

import base64
import itertools
import logging

import certgen as g
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from kvfs.errors import RenderError
from kvfs.vault import pem
from kvfs.vault.pem import b64decode_std, cer_to_pem, pem_blocks, pem_decode, pem_encode, split_pem
from kvfs.vault.pkix import CHAIN_INCOMPLETE_WARNING, jwk_to_pem, order_chain, pfx_to_pem

WARNING_START = "certificate chain is not complete due to missing intermediate"


@pytest.fixture(scope="module")
def ec_chain() -> g.Chain:
    return g.make_chain(3, key_type="ec")


@pytest.fixture(scope="module")
def rsa_chain_no_leaf_ski() -> g.Chain:
    # No SKI on the leaf and no AKI on the root: upstream's skip rule (PR #1509) is what keeps
    # the root from being "signed by" the leaf here.
    return g.make_chain(4, key_type="rsa", leaf_ski=False, root_aki=False)


@pytest.fixture(scope="module")
def rsa_key() -> g.PrivateKey:
    return g.rsa_key()


def blank_line_blocks(certs: list[x509.Certificate]) -> bytes:
    """Upstream's test input: every block preceded by a blank line."""
    return b"".join(b"\n" + g.cert_pem(c) for c in certs)


# --- base64 (Go StdEncoding rules) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("QmFzZTY0RW5jb2RlZFN0cmluZw==", b"Base64EncodedString"),
        ("", b""),
        ("QQ==", b"A"),
        ("QUI=", b"AB"),
        ("QmFz\r\nZTY0", b"Base64"),
        ("QQ\n==\n", b"A"),
    ],
)
def test_b64decode_std_accepts_go_inputs(text: str, expected: bytes) -> None:
    assert b64decode_std(text) == expected


@pytest.mark.parametrize(
    ("text", "offset"),
    [
        ("A", 0),  # one char left over
        ("QQ", 0),  # padding required
        ("QQ=", 3),  # not enough padding
        ("Q!==", 1),  # not in the alphabet
        ("QUJD=", 4),  # padding where a quantum starts (Python's strict mode accepts this)
        ("QQ==QQ==", 4),  # data after padding
        ("-_8=", 0),  # URL alphabet is not standard base64
        ("QQ =", 2),  # spaces are not skipped
    ],
)
def test_b64decode_std_rejects_like_go(text: str, offset: int) -> None:
    with pytest.raises(ValueError, match=f"^illegal base64 data at input byte {offset}$"):
        b64decode_std(text)


def test_b64decode_std_acceptance_equals_go_quantum_decoder() -> None:
    # The fast regex path must accept exactly what the port of Go's decodeQuantum accepts.
    for length in range(7):
        for chars in itertools.product(b"QA=\n!", repeat=length):
            text = bytes(chars)
            go_accepts = pem._b64_error_offset(text) is None
            try:
                decoded = b64decode_std(text)
            except ValueError:
                assert not go_accepts, text
            else:
                assert go_accepts, text
                assert decoded == base64.b64decode(text.replace(b"\n", b""))


# --- PEM codec (Go encoding/pem) -------------------------------------------------------------


def test_pem_encode_matches_64_column_layout_of_certificates(ec_chain: g.Chain) -> None:
    for cert in ec_chain.certs:
        assert pem_encode("CERTIFICATE", g.cert_der(cert)) == g.cert_pem(cert)


@pytest.mark.parametrize("size", [0, 1, 47, 48, 49, 96, 1000])
def test_pem_encode_line_breaks(size: int) -> None:
    data = bytes(range(256)) * 4
    data = data[:size]
    body = base64.b64encode(data)
    lines = b"".join(body[i : i + 64] + b"\n" for i in range(0, len(body), 64))
    assert pem_encode("X", data) == b"-----BEGIN X-----\n" + lines + b"-----END X-----\n"


def test_pem_encode_headers_proc_type_first_then_sorted() -> None:
    out = pem_encode("RSA PRIVATE KEY", b"abc", {"Z": "1", "DEK-Info": "AES-128-CBC,00", "Proc-Type": "4,ENCRYPTED"})
    assert out == (
        b"-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\nZ: 1\n\n"
        b"YWJj\n-----END RSA PRIVATE KEY-----\n"
    )


def test_pem_decode_skips_text_and_malformed_blocks() -> None:
    good = pem_encode("CERTIFICATE", b"good")
    text = (
        b"garbage before\n"
        b"-----BEGIN A-----\nYWJj\n-----END B-----\n"  # END type does not match
        b"-----BEGIN C-----\n!!!!\n-----END C-----\n"  # bad base64
        + good
        + b"trailing text"
    )
    block, rest = pem_decode(text)
    assert block is not None and block.type == "CERTIFICATE" and block.data == b"good"
    assert rest == b"trailing text"
    assert pem_decode(rest) == (None, rest)


def test_pem_decode_crlf_and_indented_base64() -> None:
    text = b"-----BEGIN X-----\r\n  YWJj\tZGVm\r\n-----END X-----\r\nrest"
    block, rest = pem_decode(text)
    assert block is not None and (block.type, block.data, dict(block.headers)) == ("X", b"abcdef", {})
    assert rest == b"rest"


def test_pem_block_repr_hides_bytes() -> None:
    block = pem_blocks(pem_encode("PRIVATE KEY", b"very-secret-key-bytes"))[0]
    assert "very-secret" not in repr(block)
    assert base64.b64encode(b"very-secret-key-bytes").decode() not in repr(block)


# --- split_pem: `.crt` the CERTIFICATE blocks, `.key` the others, in content order ---------------


def test_split_pem_key_first_bundle(ec_chain: g.Chain) -> None:
    bundle = g.pem_bundle(ec_chain.leaf_key, ec_chain.certs)
    assert split_pem(bundle) == (g.certs_pem(ec_chain.certs), g.key_pem(ec_chain.leaf_key))


def test_split_pem_keeps_content_order_drops_text_and_rewraps(ec_chain: g.Chain) -> None:
    root, leaf = ec_chain.root, ec_chain.leaf
    key_b64 = base64.b64encode(
        ec_chain.leaf_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    odd_key = b"-----BEGIN PRIVATE KEY-----\r\n" + key_b64 + b"\r\n-----END PRIVATE KEY-----\r\n"
    text = b"Bag Attributes\n" + g.cert_pem(root) + b"\nsubject=leaf\n" + odd_key + g.cert_pem(leaf) + b"\n"
    certs, others = split_pem(text)
    assert certs == g.cert_pem(root) + g.cert_pem(leaf)
    assert others == g.key_pem(ec_chain.leaf_key)


def test_split_pem_reencodes_headers_go_style() -> None:
    text = b"-----BEGIN EC PRIVATE KEY-----\nDEK-Info: AES-128-CBC,AA\nProc-Type: 4,ENCRYPTED\n\nYWJj\n-----END EC PRIVATE KEY-----\n"
    certs, others = split_pem(text)
    assert certs == b""
    assert others == (
        b"-----BEGIN EC PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,AA\n\n"
        b"YWJj\n-----END EC PRIVATE KEY-----\n"
    )


def test_split_pem_empty() -> None:
    assert split_pem(b"no pem here") == (b"", b"")


# --- chain ordering: leaf → intermediates → root by AKI/SKI; an incomplete chain unchanged -------


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_order_chain_ec_all_six_orders(ec_chain: g.Chain, order: tuple[int, ...]) -> None:
    shuffled = [ec_chain.certs[i] for i in order]
    assert order_chain(blank_line_blocks(shuffled)) == g.certs_pem(ec_chain.certs)


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_order_chain_rsa_leaf_without_ski_all_orders(
    rsa_chain_no_leaf_ski: g.Chain, order: tuple[int, ...]
) -> None:
    chain = rsa_chain_no_leaf_ski
    with pytest.raises(x509.ExtensionNotFound):
        chain.leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    shuffled = [chain.certs[i] for i in order]
    # leaf, int2, int1, root
    assert order_chain(blank_line_blocks(shuffled)) == g.certs_pem(chain.certs)


@pytest.mark.parametrize("order", [(0, 2), (2, 0)])
def test_order_chain_incomplete_returns_input_and_warns(
    ec_chain: g.Chain, order: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    text = blank_line_blocks([ec_chain.certs[i] for i in order])  # server + root only
    with caplog.at_level(logging.WARNING, logger="kvfs.vault.pkix"):
        assert order_chain(text, label="secret/web") == text
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1
    assert messages[0].startswith(WARNING_START)
    assert messages[0] == CHAIN_INCOMPLETE_WARNING + " (secret/web)"


def test_order_chain_unrelated_certificates_fall_back(caplog: pytest.LogCaptureFixture) -> None:
    a, b = g.self_signed(g.ec_key(), "a"), g.self_signed(g.ec_key(), "b")
    text = g.certs_pem([a, b])
    with caplog.at_level(logging.WARNING, logger="kvfs.vault.pkix"):
        assert order_chain(text) == text
    assert any(r.getMessage().startswith(WARNING_START) for r in caplog.records)


def test_order_chain_single_self_signed_cert_is_reencoded(caplog: pytest.LogCaptureFixture) -> None:
    cert = g.self_signed(g.ec_key())
    with caplog.at_level(logging.WARNING, logger="kvfs.vault.pkix"):
        assert order_chain(b"\n\n" + g.cert_pem(cert) + b"\n") == g.cert_pem(cert)
    assert not caplog.records


def test_order_chain_cycle() -> None:
    ka, kb, kl = g.ec_key(), g.ec_key(), g.ec_key()
    a = g.make_cert(ka, "a", ski=b"A" * 20, aki=b"B" * 20)
    b = g.make_cert(kb, "b", ski=b"B" * 20, aki=b"A" * 20)
    leaf = g.make_cert(kl, "leaf", ski=b"L" * 20, aki=b"A" * 20)
    with pytest.raises(RenderError, match="^constructing chain resulted in cycle$"):
        order_chain(g.certs_pem([a, leaf, b]))


def test_order_chain_no_leaf() -> None:
    a = g.make_cert(g.ec_key(), "a", ski=b"A" * 20, aki=b"B" * 20)
    b = g.make_cert(g.ec_key(), "b", ski=b"B" * 20, aki=b"A" * 20)
    with pytest.raises(RenderError, match="^no leaf found$"):
        order_chain(g.certs_pem([a, b]))
    with pytest.raises(RenderError, match="^no leaf found$"):
        order_chain(b"")


def test_order_chain_rejects_non_certificate_block(ec_chain: g.Chain) -> None:
    text = g.cert_pem(ec_chain.leaf) + g.key_pem(ec_chain.leaf_key)
    with pytest.raises(RenderError, match=r"PEM block 2 \(PRIVATE KEY\) is not a valid X.509 certificate"):
        order_chain(text)


# --- PKCS#12 → PEM: every key as PKCS#8 first, then the certificates -----------------------------


def test_pfx_a_rsa_2048_self_signed(rsa_key: g.PrivateKey) -> None:
    cert = g.self_signed(rsa_key, "rsa-leaf")
    out = pfx_to_pem(g.pfx_b64(rsa_key, [cert]))
    assert out == g.key_pem(rsa_key) + g.cert_pem(cert)
    assert out.startswith(b"-----BEGIN PRIVATE KEY-----\n")


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_pfx_b_ec_chain_any_bag_order(ec_chain: g.Chain, order: tuple[int, ...]) -> None:
    bags = [ec_chain.certs[i] for i in order]
    expected = g.key_pem(ec_chain.leaf_key) + g.certs_pem(ec_chain.certs)
    assert pfx_to_pem(g.pfx_b64(ec_chain.leaf_key, bags)) == expected


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_pfx_without_chain_construction_keeps_bag_order(ec_chain: g.Chain, order: tuple[int, ...]) -> None:
    bags = [ec_chain.certs[i] for i in order]
    out = pfx_to_pem(g.pfx_b64(ec_chain.leaf_key, bags), construct_chain=False)
    assert out == g.key_pem(ec_chain.leaf_key) + g.certs_pem(bags)


def test_pfx_incomplete_chain_keeps_bag_order_and_warns(
    ec_chain: g.Chain, caplog: pytest.LogCaptureFixture
) -> None:
    bags = [ec_chain.root, ec_chain.leaf]
    with caplog.at_level(logging.WARNING, logger="kvfs.vault.pkix"):
        out = pfx_to_pem(g.pfx_b64(ec_chain.leaf_key, bags), label="secret/web")
    assert out == g.key_pem(ec_chain.leaf_key) + g.certs_pem(bags)
    assert [r.getMessage() for r in caplog.records] == [CHAIN_INCOMPLETE_WARNING + " (secret/web)"]


@pytest.mark.parametrize("curve", ["P-384", "P-521"])
def test_pfx_other_curves(curve: str) -> None:
    key = g.ec_key(curve)
    cert = g.self_signed(key)
    assert pfx_to_pem(g.pfx_b64(key, [cert])) == g.key_pem(key) + g.cert_pem(cert)


def test_pfx_certificates_only(ec_chain: g.Chain) -> None:
    bags = [ec_chain.certs[2], ec_chain.certs[0], ec_chain.certs[1]]
    assert pfx_to_pem(g.pfx_b64(None, bags)) == g.certs_pem(ec_chain.certs)


def test_pfx_key_only_follows_upstream(ec_chain: g.Chain) -> None:
    value = g.pfx_b64(ec_chain.leaf_key, [])
    assert pfx_to_pem(value, construct_chain=False) == g.key_pem(ec_chain.leaf_key)
    with pytest.raises(RenderError, match="^no leaf found$"):
        pfx_to_pem(value)


def test_pfx_encrypted_with_empty_password_like_key_vault(ec_chain: g.Chain) -> None:
    raw = g.pfx_openssl(ec_chain.leaf_key, [ec_chain.root, ec_chain.certs[1], ec_chain.leaf])
    if raw is None:
        pytest.skip("openssl CLI not installed")
    value = base64.b64encode(raw).decode()
    key = g.key_pem(ec_chain.leaf_key)
    assert pfx_to_pem(value) == key + g.certs_pem(ec_chain.certs)
    # Encrypted bags: the certificate matching the key comes first, the others in bag order.
    assert pfx_to_pem(value, construct_chain=False) == key + g.certs_pem(
        [ec_chain.leaf, ec_chain.root, ec_chain.certs[1]]
    )


def test_pfx_rsa_encrypted_with_empty_password(rsa_key: g.PrivateKey) -> None:
    cert = g.self_signed(rsa_key)
    raw = g.pfx_openssl(rsa_key, [cert])
    if raw is None:
        pytest.skip("openssl CLI not installed")
    assert pfx_to_pem(base64.b64encode(raw).decode()) == g.key_pem(rsa_key) + g.cert_pem(cert)


def test_pfx_base64_split_over_lines(ec_chain: g.Chain) -> None:
    value = base64.encodebytes(g.pfx(ec_chain.leaf_key, list(ec_chain.certs))).decode()
    assert "\n" in value
    assert pfx_to_pem(value) == g.key_pem(ec_chain.leaf_key) + g.certs_pem(ec_chain.certs)


def test_pfx_errors_never_echo_the_value(ec_chain: g.Chain) -> None:
    with pytest.raises(RenderError, match="illegal base64 data at input byte 0") as info:
        pfx_to_pem("-----BEGIN PRIVATE KEY-----")
    assert "PRIVATE KEY" not in str(info.value)

    secret_text = "c2VjcmV0LXZhbHVlLW5vdC1hLXBmeA=="  # base64 of some secret, not a PFX
    with pytest.raises(RenderError, match="password-less PFX") as info:
        pfx_to_pem(secret_text)
    assert secret_text not in str(info.value) and "secret-value" not in str(info.value)

    protected = pkcs12.serialize_key_and_certificates(
        b"x", ec_chain.leaf_key, ec_chain.leaf, None, serialization.BestAvailableEncryption(b"pw")
    )
    with pytest.raises(RenderError, match="password-less PFX"):
        pfx_to_pem(base64.b64encode(protected).decode())


# --- certificates: the leaf only, one CERTIFICATE block ------------------------------------------


def test_cer_to_pem_upstream_vector() -> None:
    assert cer_to_pem("dGVzdA==") == b"-----BEGIN CERTIFICATE-----\ndGVzdA==\n-----END CERTIFICATE-----\n"


def test_cer_to_pem_real_certificate(ec_chain: g.Chain) -> None:
    assert cer_to_pem(g.cert_bundle(ec_chain.leaf)["cer"]) == g.cert_pem(ec_chain.leaf)


def test_cer_to_pem_bad_base64() -> None:
    with pytest.raises(RenderError, match="illegal base64 data at input byte 2"):
        cer_to_pem("dG*zdA==")


# --- keys: the public key as a SPKI `PUBLIC KEY`; RSA, and EC on P-256/384/521 -------------------


@pytest.mark.parametrize("hsm", [False, True])
def test_jwk_rsa(rsa_key: g.PrivateKey, hsm: bool) -> None:
    web_key = g.key_bundle(rsa_key, hsm=hsm)["key"]
    assert web_key["kty"] == ("RSA-HSM" if hsm else "RSA")
    out = jwk_to_pem(web_key)
    assert out == g.public_key_pem(rsa_key)
    assert out.startswith(b"-----BEGIN PUBLIC KEY-----\n")


@pytest.mark.parametrize("curve", ["P-256", "P-384", "P-521"])
@pytest.mark.parametrize("hsm", [False, True])
def test_jwk_ec_curves(curve: str, hsm: bool) -> None:
    key = g.ec_key(curve)
    assert jwk_to_pem(g.key_bundle(key, hsm=hsm)["key"]) == g.public_key_pem(key)


def test_jwk_ec_coordinate_with_leading_zero_byte() -> None:
    key = next(k for k in iter(g.ec_key, None) if k.public_key().public_numbers().x < 1 << 248)
    web_key = g.key_bundle(key)["key"]
    assert base64.urlsafe_b64decode(web_key["x"] + "=")[0] == 0  # fixed 32-byte coordinate
    assert jwk_to_pem(web_key) == g.public_key_pem(key)


def test_jwk_tolerates_padding(rsa_key: g.PrivateKey) -> None:
    web_key = g.key_bundle(rsa_key)["key"]
    web_key["n"] += "=" * (-len(web_key["n"]) % 4)
    assert jwk_to_pem(web_key) == g.public_key_pem(rsa_key)


def test_jwk_p256k_not_supported() -> None:
    web_key = g.key_bundle(g.ec_key("P-256K"))["key"]
    assert web_key["crv"] == "P-256K"
    with pytest.raises(RenderError, match="^curve P-256K is not supported$"):
        jwk_to_pem(web_key)


@pytest.mark.parametrize("kty", ["oct", "oct-HSM", "OKP", ""])
def test_jwk_unsupported_key_types(kty: str) -> None:
    web_key = {"kid": g.object_id("keys", "k"), "kty": kty, "k": g.b64url(b"0123456789abcdef")}
    with pytest.raises(RenderError, match=f"^failed to get key. key type '{kty}' currently not supported$"):
        jwk_to_pem(web_key)


def test_jwk_nil_key_and_kid(rsa_key: g.PrivateKey) -> None:
    with pytest.raises(RenderError, match="^key value is nil$"):
        jwk_to_pem(None)
    with pytest.raises(RenderError, match="^key id is nil$"):
        jwk_to_pem(g.jwk(rsa_key))


def test_jwk_bad_members() -> None:
    key = g.ec_key()
    web_key = g.key_bundle(key)["key"]
    with pytest.raises(RenderError, match="'x' is not valid base64url"):
        jwk_to_pem({**web_key, "x": "not*base64"})
    with pytest.raises(RenderError, match="not on curve P-256"):
        jwk_to_pem({**web_key, "y": web_key["x"]})
    with pytest.raises(RenderError, match="invalid RSA public key"):
        jwk_to_pem({"kid": "k", "kty": "RSA", "n": "", "e": "AQAB"})
