"""A synced Secret's data from a volume's files: bytes as they are, and upstream's tls.crt / tls.key."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization

import certgen
from kvfs.config.model import SecretObject, SecretObjectData
from kvfs.csi.secretdata import SecretDataError, secret_data, tls_part


def traditional(key: certgen.PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def tls(*data: tuple[str, str]) -> SecretObject:
    return SecretObject("web-tls", "kubernetes.io/tls", tuple(SecretObjectData(f, k) for f, k in data))


def test_opaque_data_is_the_files_bytes_whatever_they_hold() -> None:
    obj = SecretObject("db", "Opaque", (SecretObjectData("conf/db", "password"), SecretObjectData("bin", "blob")))
    files = {"conf/db": b"p@ss\n", "bin": bytes(range(256)), "other": b"unused"}
    assert secret_data(obj, files) == {"password": b"p@ss\n", "blob": bytes(range(256))}
    with pytest.raises(SecretDataError, match="Secret db: key blob: file bin was not read"):
        secret_data(obj, {"conf/db": b"x"})


@pytest.mark.parametrize("key_type", ["rsa", "ec"])
def test_tls_from_kvfs_pem_file_as_upstream(key_type: str) -> None:
    chain = certgen.make_chain(3, key_type=key_type)  # type: ignore[arg-type]
    pem = certgen.key_pem(chain.leaf_key) + certgen.certs_pem(chain.certs)  # what a PFX-backed secret shows
    data = secret_data(tls(("web", "tls.crt"), ("web", "tls.key")), {"web": pem})
    assert data == {"tls.crt": certgen.certs_pem(chain.certs), "tls.key": traditional(chain.leaf_key)}
    header = b"RSA PRIVATE KEY" if key_type == "rsa" else b"EC PRIVATE KEY"
    assert data["tls.key"].startswith(b"-----BEGIN " + header + b"-----\n")


def test_tls_parts_of_split_files_blocks_with_headers_and_crlf() -> None:
    chain = certgen.make_chain(2, key_type="rsa")
    key_der = chain.leaf_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    body = base64.encodebytes(key_der).replace(b"\n", b"\r\n")
    key_file = b"Bag Attributes\r\n-----BEGIN RSA PRIVATE KEY-----\r\nProc-Type: 4,X\r\n\r\n" + body + b"-----END RSA PRIVATE KEY-----\r\n"
    crt_file = b"subject=CN=leaf\n" + certgen.certs_pem(chain.certs)
    data = secret_data(tls(("web.crt", "tls.crt"), ("web.key", "tls.key")), {"web.crt": crt_file, "web.key": key_file})
    assert data == {"tls.crt": certgen.certs_pem(chain.certs), "tls.key": traditional(chain.leaf_key)}


def test_tls_from_a_binary_pfx() -> None:
    chain = certgen.make_chain(2, key_type="ec")
    pfx = certgen.pfx(chain.leaf_key, chain.certs)  # objectFormat: pfx + objectEncoding: base64
    assert tls_part(pfx, "tls.crt") == certgen.certs_pem(chain.certs)
    assert tls_part(pfx, "tls.key") == traditional(chain.leaf_key)


@pytest.mark.parametrize(
    ("content", "key", "says"),
    [
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "tls.crt", "holds no certificate"),
        (None, "tls.key", "holds no private key"),
        (b"just text", "tls.crt", "neither PEM nor a password-less PFX"),
        (b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n", "tls.crt", "not valid base64"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "tls.key", "cannot be read"),
        (b"x", "ca.crt", "only tls.crt and tls.key"),
    ],
)
def test_tls_parts_that_cannot_be_made_are_refused_with_the_reason(content: bytes | None, key: str, says: str) -> None:
    if content is None:
        content = certgen.certs_pem(certgen.make_chain(1).certs)
    with pytest.raises(ValueError, match=says):
        tls_part(content, key)
    if key in ("tls.crt", "tls.key"):
        with pytest.raises(SecretDataError, match=f"Secret web-tls: key {key} from file web: .*{says}"):
            secret_data(tls(("web", key)), {"web": content})
