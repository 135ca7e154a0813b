"""Test fixtures: keys, certificates, chains, PFX and PEM bundles, JWKs and Key Vault JSON.

Everything is generated with `cryptography` at test time (no captured blobs). The bundle
builders return dicts shaped like Key Vault's REST JSON (secret, key and certificate bundles),
so they can be served by the emulator, fed to `kvfs.vault.render.render_object`, or compared
with files.

Typical use::

    chain = make_chain(3, key_type="ec")                # root → intermediate → leaf
    value = pfx_b64(chain.leaf_key, chain.certs)        # what Key Vault stores for pkcs12
    bundle = cert_secret_bundle(value, CONTENT_TYPE_PKCS12, name="web")
    expected = key_pem(chain.leaf_key) + certs_pem(chain.certs)

Import from tests as `import certgen` (tests/ is on sys.path through tests/conftest.py).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

VAULT_URL = "https://test.vault.azure.net"
DEFAULT_VERSION = "4387e9f3d6e14c459867679a90fd0f79"
CONTENT_TYPE_PEM = "application/x-pem-file"
CONTENT_TYPE_PKCS12 = "application/x-pkcs12"

CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
    "P-256K": ec.SECP256K1(),
}
_COORD_LEN = {"P-256": 32, "P-384": 48, "P-521": 66, "P-256K": 32}
_NOT_BEFORE = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
_ATTRIBUTES = {
    "enabled": True,
    "created": 1704067200,
    "updated": 1704067200,
    "recoveryLevel": "Recoverable+Purgeable",
    "recoverableDays": 90,
}

# ------------------------------------------------------------------------------------------
# Keys and certificates
# ------------------------------------------------------------------------------------------


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    """A fresh RSA key (e = 65537). Costs ~50 ms at 2048 bits: reuse it within a test."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def ec_key(curve: str = "P-256") -> ec.EllipticCurvePrivateKey:
    """A fresh EC key on a JWK curve name: P-256, P-384, P-521 or P-256K."""
    return ec.generate_private_key(CURVES[curve])


def make_key(key_type: Literal["rsa", "ec"] = "ec", curve: str = "P-256") -> PrivateKey:
    """`rsa_key()` or `ec_key(curve)`."""
    return rsa_key() if key_type == "rsa" else ec_key(curve)


def key_id_of(key: PrivateKey | PublicKey) -> bytes:
    """The SubjectKeyIdentifier value (SHA-1 method) for a key."""
    public = key.public_key() if isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)) else key
    return x509.SubjectKeyIdentifier.from_public_key(public).digest


def make_cert(
    key: PrivateKey,
    cn: str,
    *,
    issuer: tuple[x509.Certificate, PrivateKey] | None = None,
    ca: bool = False,
    ski: bool | bytes = True,
    aki: bool | bytes = True,
    days: int = 3650,
) -> x509.Certificate:
    """A certificate for `key`, self-signed when `issuer` (cert, key) is None.

    `ski`: True computes the SubjectKeyIdentifier, bytes sets it, False omits it.
    `aki`: True copies the issuer's SKI (its own for self-signed) when there is one, bytes sets
    the keyIdentifier, False omits the extension. Bytes let tests build cycles and disjoint sets.
    """
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    if issuer is None:
        issuer_name, signer, issuer_ski = subject, key, (key_id_of(key) if ski is True else ski)
    else:
        issuer_cert, signer = issuer
        issuer_name = issuer_cert.subject
        extensions = issuer_cert.extensions
        try:
            issuer_ski = extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        except x509.ExtensionNotFound:
            issuer_ski = False
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_BEFORE + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ski is True:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    elif ski:
        builder = builder.add_extension(x509.SubjectKeyIdentifier(ski), critical=False)
    aki_value = issuer_ski if aki is True else aki
    if aki_value:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier(aki_value, None, None), critical=False
        )
    return builder.sign(signer, hashes.SHA256())


def self_signed(key: PrivateKey, cn: str = "self-signed", **kwargs: Any) -> x509.Certificate:
    """A self-signed end-entity certificate, like a `Self`-issued Key Vault certificate."""
    return make_cert(key, cn, **kwargs)


@dataclass(frozen=True)
class Chain:
    """A certificate chain, leaf first and root last, with the private key of each cert."""

    certs: tuple[x509.Certificate, ...]
    keys: tuple[PrivateKey, ...]

    @property
    def leaf(self) -> x509.Certificate:
        return self.certs[0]

    @property
    def leaf_key(self) -> PrivateKey:
        return self.keys[0]

    @property
    def root(self) -> x509.Certificate:
        return self.certs[-1]


def make_chain(
    depth: int = 3,
    *,
    key_type: Literal["rsa", "ec"] = "ec",
    curve: str = "P-256",
    leaf_ski: bool = True,
    root_aki: bool = True,
) -> Chain:
    """root → int1 → … → leaf (`depth` certs, CNs "root", "int1", "int2", …, "leaf").

    Every cert has an SKI except the leaf with `leaf_ski=False`; every cert has an AKI except
    the root with `root_aki=False` (many real roots carry none).
    """
    keys = [make_key(key_type, curve) for _ in range(depth)]  # root first
    certs = [make_cert(keys[0], "root", ca=True, aki=root_aki)]
    for level in range(1, depth):
        is_leaf = level == depth - 1
        certs.append(
            make_cert(
                keys[level],
                "leaf" if is_leaf else f"int{level}",
                issuer=(certs[-1], keys[level - 1]),
                ca=not is_leaf,
                ski=leaf_ski or not is_leaf,
            )
        )
    return Chain(tuple(reversed(certs)), tuple(reversed(keys)))


# ------------------------------------------------------------------------------------------
# Serialisations
# ------------------------------------------------------------------------------------------


def cert_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def cert_pem(cert: x509.Certificate) -> bytes:
    """One CERTIFICATE block (64-column lines, LF, trailing newline)."""
    return cert.public_bytes(serialization.Encoding.PEM)


def certs_pem(certs: Sequence[x509.Certificate]) -> bytes:
    """CERTIFICATE blocks concatenated in the given order, no blank lines."""
    return b"".join(cert_pem(c) for c in certs)


def key_pem(key: PrivateKey) -> bytes:
    """The private key as unencrypted PKCS#8 `PRIVATE KEY` PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(key: PrivateKey | PublicKey) -> bytes:
    """SubjectPublicKeyInfo `PUBLIC KEY` PEM of a key (private keys: their public half)."""
    public = key.public_key() if isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)) else key
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def pem_bundle(key: PrivateKey | None, certs: Sequence[x509.Certificate]) -> bytes:
    """Key Vault's `application/x-pem-file` layout: PKCS#8 key first, then the certificates."""
    return (key_pem(key) if key is not None else b"") + certs_pem(certs)


def pfx(key: PrivateKey | None, certs: Sequence[x509.Certificate], *, name: bytes = b"kvfs") -> bytes:
    """A password-less PFX whose certificate bags are in exactly the order of `certs`.

    The bags are unencrypted (cryptography cannot encrypt with an empty password); see
    `pfx_openssl` for a Key Vault-like encrypted one.
    """
    return pkcs12.serialize_key_and_certificates(
        name, key, None, list(certs) or None, serialization.NoEncryption()
    )


def pfx_b64(key: PrivateKey | None, certs: Sequence[x509.Certificate]) -> str:
    """`pfx(...)` as standard base64 text: the `value` Key Vault returns for pkcs12 certificates."""
    return base64.b64encode(pfx(key, certs)).decode("ascii")


def pfx_openssl(key: PrivateKey, certs: Sequence[x509.Certificate]) -> bytes | None:
    """A PFX like Key Vault's: empty password, 3DES-encrypted bags, SHA-1 MAC (openssl CLI).

    OpenSSL puts the certificate matching the key first, then the others in the given order.
    Returns None when no `openssl` binary is installed (callers skip).
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        key_file, certs_file, out = Path(tmp, "k.pem"), Path(tmp, "c.pem"), Path(tmp, "o.pfx")
        key_file.write_bytes(key_pem(key))
        certs_file.write_bytes(certs_pem(certs))
        subprocess.run(
            [openssl, "pkcs12", "-export", "-inkey", str(key_file), "-in", str(certs_file),
             "-passout", "pass:", "-certpbe", "PBE-SHA1-3DES", "-keypbe", "PBE-SHA1-3DES",
             "-macalg", "sha1", "-out", str(out)],
            check=True,
            capture_output=True,
        )
        return out.read_bytes()


# ------------------------------------------------------------------------------------------
# JWK and Key Vault JSON
# ------------------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    """base64url without padding (every binary JWK member)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk(
    key: PrivateKey | PublicKey,
    *,
    kid: str | None = None,
    hsm: bool = False,
    key_ops: Sequence[str] = ("sign", "verify"),
) -> dict[str, Any]:
    """A public JsonWebKey as Key Vault returns it (kty RSA/EC, `-HSM` when `hsm`)."""
    public = key.public_key() if isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)) else key
    out: dict[str, Any] = {}
    if kid is not None:
        out["kid"] = kid
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        out["kty"] = "RSA-HSM" if hsm else "RSA"
        out["key_ops"] = list(key_ops)
        out["n"] = b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"))
        out["e"] = b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big"))
        return out
    ec_numbers = public.public_numbers()
    crv = next(name for name, curve in CURVES.items() if curve.name == public.curve.name)
    size = _COORD_LEN[crv]
    out["kty"] = "EC-HSM" if hsm else "EC"
    out["key_ops"] = list(key_ops)
    out["crv"] = crv
    out["x"] = b64url(ec_numbers.x.to_bytes(size, "big"))
    out["y"] = b64url(ec_numbers.y.to_bytes(size, "big"))
    return out


def object_id(collection: str, name: str, version: str = DEFAULT_VERSION, vault: str = VAULT_URL) -> str:
    """A versioned Key Vault id, e.g. https://test.vault.azure.net/secrets/name/<version>."""
    return f"{vault.rstrip('/')}/{collection}/{name}/{version}"


def secret_bundle(
    value: str,
    *,
    name: str = "secret1",
    version: str = DEFAULT_VERSION,
    content_type: str | None = None,
    kid: str | None = None,
    managed: bool | None = None,
    tags: Mapping[str, str] | None = None,
    vault: str = VAULT_URL,
) -> dict[str, Any]:
    """A SecretBundle. Unset optional members are absent, as Key Vault sends them."""
    out: dict[str, Any] = {
        "value": value,
        "id": object_id("secrets", name, version, vault),
        "attributes": dict(_ATTRIBUTES),
    }
    if content_type is not None:
        out["contentType"] = content_type
    if tags is not None:
        out["tags"] = dict(tags)
    if kid is not None:
        out["kid"] = kid
    if managed is not None:
        out["managed"] = managed
    return out


def cert_secret_bundle(
    value: str,
    content_type: str,
    *,
    name: str = "cert1",
    version: str = DEFAULT_VERSION,
    vault: str = VAULT_URL,
) -> dict[str, Any]:
    """The SecretBundle backing a certificate: `kid` set and `managed: true`."""
    return secret_bundle(
        value,
        name=name,
        version=version,
        content_type=content_type,
        kid=object_id("keys", name, version, vault),
        managed=True,
        vault=vault,
    )


def key_bundle(
    key: PrivateKey | PublicKey | Mapping[str, Any],
    *,
    name: str = "key1",
    version: str = DEFAULT_VERSION,
    hsm: bool = False,
    vault: str = VAULT_URL,
) -> dict[str, Any]:
    """A KeyBundle for a key (public part only) or a ready JWK mapping (its kid is set)."""
    web_key = dict(key) if isinstance(key, Mapping) else jwk(key, hsm=hsm)
    web_key["kid"] = object_id("keys", name, version, vault)
    return {"key": web_key, "attributes": dict(_ATTRIBUTES, exportable=False)}


def cert_bundle(
    cert: x509.Certificate,
    *,
    name: str = "cert1",
    version: str = DEFAULT_VERSION,
    content_type: str = CONTENT_TYPE_PKCS12,
    vault: str = VAULT_URL,
) -> dict[str, Any]:
    """A CertificateBundle: `cer` is the standard base64 DER of the leaf; id/kid/sid share a version."""
    der = cert_der(cert)
    return {
        "id": object_id("certificates", name, version, vault),
        "kid": object_id("keys", name, version, vault),
        "sid": object_id("secrets", name, version, vault),
        "x5t": b64url(hashlib.sha1(der).digest()),
        "cer": base64.b64encode(der).decode("ascii"),
        "contentType": content_type,
        "attributes": dict(
            _ATTRIBUTES,
            nbf=int(cert.not_valid_before_utc.timestamp()),
            exp=int(cert.not_valid_after_utc.timestamp()),
        ),
        "policy": {
            "id": f"{vault.rstrip('/')}/certificates/{name}/policy",
            "secret_props": {"contentType": content_type},
            "issuer": {"name": "Self"},
        },
    }
