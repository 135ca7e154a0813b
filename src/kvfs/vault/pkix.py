"""Certificates and keys as the upstream Azure provider renders them: PFX → PEM, chain order, JWK → PEM.

All crypto and ASN.1 work is done by `cryptography`; the PEM framing and base64 rules are
kvfs.vault.pem's. A module of its own so that `cryptography` loads only when an object needs it
(kvfs.vault.render imports it then): a mount of plain secrets starts without it.

Every function is pure (no I/O). Errors are `RenderError` with messages that never contain key
material or secret values; callers add the `failed to get objectType:...` prefix.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from kvfs.errors import RenderError
from kvfs.vault.pem import CERTIFICATE, PRIVATE_KEY, PUBLIC_KEY, b64decode_std, b64url_decode, pem_blocks, pem_encode

log = logging.getLogger(__name__)

__all__ = ["CHAIN_INCOMPLETE_WARNING", "jwk_to_pem", "order_chain", "pfx_to_pem"]

# Upstream's klog text, kept verbatim: users grep their logs for it.
CHAIN_INCOMPLETE_WARNING = (
    "certificate chain is not complete due to missing intermediate/root certificates"
    " in the cert from key vault"
)

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
# Keys
# ---------------------------------------------------------------------------------------------


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
        n = int.from_bytes(b64url_decode(jwk.get("n"), "n"), "big")
        e = int.from_bytes(b64url_decode(jwk.get("e"), "e"), "big")
        try:
            public_key = rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError:
            raise RenderError("invalid RSA public key in JWK members 'n' and 'e'") from None
    elif kty in ("EC", "EC-HSM"):
        x = int.from_bytes(b64url_decode(jwk.get("x"), "x"), "big")
        y = int.from_bytes(b64url_decode(jwk.get("y"), "y"), "big")
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
