"""Certificates and keys for the emulator: its TLS CA + server cert, and generated vault content.

Everything here is pure (no files, no clock other than "now"), so the vault store and the seed
loader can share it and tests can call it directly.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

PKCS12 = "application/x-pkcs12"
PEM = "application/x-pem-file"

CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
    "P-256K": ec.SECP256K1(),
}
_CURVE_NAMES = {type(c).__name__: n for n, c in CURVES.items()}
_CURVE_BYTES = {"P-256": 32, "P-384": 48, "P-521": 66, "P-256K": 32}


def b64url(data: bytes) -> str:
    """base64url without padding: how Key Vault encodes every binary JWK member."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_bytes(value: int, length: int | None = None) -> bytes:
    n = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return value.to_bytes(n, "big")


def generate_key(kty: str = "RSA", *, size: int = 2048, curve: str = "P-256") -> PrivateKey:
    """A fresh RSA or EC private key (`-HSM` kinds are generated the same way)."""
    base = kty.upper().removesuffix("-HSM")
    if base == "RSA":
        return rsa.generate_private_key(public_exponent=65537, key_size=size)
    if base == "EC":
        if curve not in CURVES:
            raise ValueError(f"unsupported curve {curve!r}; use one of {', '.join(CURVES)}")
        return ec.generate_private_key(CURVES[curve])
    raise ValueError(f"unsupported key type {kty!r}; use RSA, RSA-HSM, EC or EC-HSM")


def key_kty(key: PrivateKey, *, hsm: bool = False) -> str:
    base = "RSA" if isinstance(key, rsa.RSAPrivateKey) else "EC"
    return f"{base}-HSM" if hsm else base


def curve_name(key: PrivateKey) -> str | None:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return _CURVE_NAMES[type(key.curve).__name__]
    return None


def public_jwk(key: PrivateKey, *, kid: str, kty: str, key_ops: Sequence[str]) -> dict[str, object]:
    """The public JsonWebKey Key Vault returns (never private members)."""
    jwk: dict[str, object] = {"kid": kid, "kty": kty, "key_ops": list(key_ops)}
    if isinstance(key, rsa.RSAPrivateKey):
        pub = key.public_key().public_numbers()
        jwk["n"] = b64url(_int_bytes(pub.n))
        jwk["e"] = b64url(_int_bytes(pub.e))
    else:
        crv = curve_name(key) or "P-256"
        size = _CURVE_BYTES[crv]
        pub_ec = key.public_key().public_numbers()
        jwk["crv"] = crv
        jwk["x"] = b64url(_int_bytes(pub_ec.x, size))
        jwk["y"] = b64url(_int_bytes(pub_ec.y, size))
    return jwk


def private_key_from_jwk(jwk: dict[str, object]) -> PrivateKey:
    """Build a private key from an import request's JWK (RSA needs n,e,d,p,q; EC needs crv,x,y,d)."""

    def num(name: str) -> int:
        value = jwk.get(name)
        if not isinstance(value, str) or not value:
            raise ValueError(f"JWK member {name!r} is missing")
        return int.from_bytes(b64url_decode(value), "big")

    kty = str(jwk.get("kty", "")).upper().removesuffix("-HSM")
    if kty == "RSA":
        n, e, d, p, q = num("n"), num("e"), num("d"), num("p"), num("q")
        dmp1 = num("dp") if jwk.get("dp") else rsa.rsa_crt_dmp1(d, p)
        dmq1 = num("dq") if jwk.get("dq") else rsa.rsa_crt_dmq1(d, q)
        iqmp = num("qi") if jwk.get("qi") else rsa.rsa_crt_iqmp(p, q)
        pub = rsa.RSAPublicNumbers(e, n)
        return rsa.RSAPrivateNumbers(p, q, d, dmp1, dmq1, iqmp, pub).private_key()
    if kty == "EC":
        crv = str(jwk.get("crv", ""))
        if crv not in CURVES:
            raise ValueError(f"JWK curve {crv!r} is not supported")
        pub_ec = ec.EllipticCurvePublicNumbers(num("x"), num("y"), CURVES[crv])
        return ec.EllipticCurvePrivateNumbers(num("d"), pub_ec).private_key()
    raise ValueError(f"JWK key type {jwk.get('kty')!r} cannot be imported (use RSA or EC)")


def _name(subject: str) -> x509.Name:
    """`CN=foo` or `CN=foo, O=bar` → x509.Name; a bare string becomes the CN."""
    if "=" not in subject:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    try:
        return x509.Name.from_rfc4514_string(subject.replace(", ", ","))
    except ValueError as err:
        raise ValueError(f"certificate subject {subject!r} is not an RFC 4514 name: {err}") from None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _san(names: Sequence[str]) -> list[x509.GeneralName]:
    return [x509.IPAddress(ipaddress.ip_address(n)) if _is_ip(n) else x509.DNSName(n) for n in names]


def make_certificate(
    subject: str,
    key: PrivateKey,
    *,
    issuer_cert: x509.Certificate | None = None,
    issuer_key: PrivateKey | None = None,
    sans: Sequence[str] = (),
    ca: bool = False,
    days: int = 365,
    server: bool = False,
) -> x509.Certificate:
    """Sign a certificate: self-signed when no issuer is given."""
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    name = _name(subject)
    signer = issuer_key if issuer_key is not None else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer_cert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
        )
        ekus = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(_san(sans)), critical=server)
    return builder.sign(signer, hashes.SHA256())


@dataclass
class TlsMaterial:
    """The emulator's own CA and server certificate, PEM-encoded for files and ssl contexts."""

    ca_pem: bytes
    ca_key_pem: bytes = field(repr=False)
    cert_pem: bytes
    key_pem: bytes = field(repr=False)


def private_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM without a password: what Key Vault's PEM secrets and the emulator's files hold."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key(pem: bytes) -> PrivateKey:
    """A password-less PEM private key; only RSA and EC keys are supported."""
    loaded = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(loaded, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ValueError("only RSA and EC private keys are supported")
    return loaded


def make_tls_material(hosts: Sequence[str], ca_pem: bytes | None = None, ca_key_pem: bytes | None = None) -> TlsMaterial:
    """A server cert for `hosts` (DNS names and IP literals), signed by the given CA or a new one."""
    if ca_pem is None or ca_key_pem is None:
        ca_key: PrivateKey = ec.generate_private_key(ec.SECP256R1())
        ca_cert = make_certificate("CN=kvfs emulator CA,O=kvfs", ca_key, ca=True, days=3650)
    else:
        ca_key, ca_cert = load_private_key(ca_key_pem), x509.load_pem_x509_certificate(ca_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = make_certificate(
        "CN=localhost,O=kvfs emulator", key, issuer_cert=ca_cert, issuer_key=ca_key,
        sans=hosts, days=825, server=True,
    )
    return TlsMaterial(
        ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        ca_key_pem=private_pem(ca_key),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=private_pem(key),
    )


def serves(cert_pem: bytes, hosts: Sequence[str], *, min_days: int = 30) -> bool:
    """Whether a saved server cert names every host and stays valid for `min_days` more."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    names = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    names |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    wanted = {str(ipaddress.ip_address(h)) if _is_ip(h) else h.lower() for h in hosts}
    horizon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=min_days)
    return wanted <= names and cert.not_valid_after_utc > horizon


@dataclass
class CertMaterial:
    """A certificate as Key Vault keeps it: private key, leaf, and the rest of the chain."""

    key: PrivateKey = field(repr=False)
    leaf: x509.Certificate
    chain: list[x509.Certificate] = field(default_factory=list)

    @property
    def der(self) -> bytes:
        return self.leaf.public_bytes(serialization.Encoding.DER)

    @property
    def x5t(self) -> str:
        return b64url(hashlib.sha1(self.der).digest())  # noqa: S324 - the thumbprint is SHA-1 by definition

    def secret_value(self, content_type: str) -> str:
        """The backing secret: base64 PFX without password, or PEM with PKCS#8 key first then certs."""
        if content_type == PEM:
            key_pem = private_pem(self.key)
            certs = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [self.leaf, *self.chain])
            return (key_pem + certs).decode("ascii")
        pfx = pkcs12.serialize_key_and_certificates(
            None, self.key, self.leaf, self.chain or None, serialization.NoEncryption()
        )
        return base64.b64encode(pfx).decode("ascii")


def generate_cert_material(
    subject: str,
    *,
    kty: str = "RSA",
    size: int = 2048,
    curve: str = "P-256",
    sans: Sequence[str] = (),
    chained: bool = False,
    days: int = 365,
) -> CertMaterial:
    """A self-signed cert, or (chained) a leaf signed by a fresh intermediate under a fresh root."""
    key = generate_key(kty, size=size, curve=curve)
    if not chained:
        return CertMaterial(key, make_certificate(subject, key, sans=sans, days=days))
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = make_certificate("CN=kvfs emulator seed root", root_key, ca=True, days=days + 365)
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = make_certificate(
        "CN=kvfs emulator seed intermediate", inter_key, issuer_cert=root, issuer_key=root_key,
        ca=True, days=days + 180,
    )
    leaf = make_certificate(subject, key, issuer_cert=inter, issuer_key=inter_key, sans=sans, days=days)
    return CertMaterial(key, leaf, [inter, root])


def _matches(cert: x509.Certificate, key: PrivateKey) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return cert.public_key().public_bytes(enc, fmt) == key.public_key().public_bytes(enc, fmt)


def parse_pem_bundle(pem: bytes) -> CertMaterial:
    """PEM text with one private key and one or more certs, in any order (blocks parsed by type)."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ValueError("the PEM content holds no certificate") from None
    key: PrivateKey | None = None
    start = pem.find(b"-----BEGIN")
    while start != -1:
        end_marker = pem.find(b"-----END", start)
        stop = pem.find(b"-----", end_marker + 8)
        block = pem[start : stop + 5]
        if b"PRIVATE KEY" in block.split(b"\n", 1)[0]:
            key = load_private_key(block)
        start = pem.find(b"-----BEGIN", stop + 5)
    if key is None:
        raise ValueError("the PEM content holds no private key")
    return _assemble(key, certs)


def parse_pfx(pfx: bytes, password: str | None = None) -> CertMaterial:
    """A PFX (password optional) with its private key."""
    pwd = password.encode() if password else None
    try:
        loaded = pkcs12.load_pkcs12(pfx, pwd)
    except ValueError:
        raise ValueError("the PFX content cannot be read (bad data or wrong password)") from None
    key = loaded.key
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ValueError("the PFX holds no RSA or EC private key")
    certs = ([loaded.cert.certificate] if loaded.cert else []) + [c.certificate for c in loaded.additional_certs]
    if not certs:
        raise ValueError("the PFX holds no certificate")
    return _assemble(key, certs)


def _assemble(key: PrivateKey, certs: list[x509.Certificate]) -> CertMaterial:
    leaf = next((c for c in certs if _matches(c, key)), None)
    if leaf is None:
        raise ValueError("no certificate matches the private key")
    return CertMaterial(key, leaf, [c for c in certs if c is not leaf])
