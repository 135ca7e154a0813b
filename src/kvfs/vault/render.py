"""Turn a fetched Key Vault object into the bytes of its file(s), as the upstream provider does.

Rules (upstream's pkg/provider/provider.go and keyvault.go): a `secret` is its value, except
certificate-backed secrets (`kid` set) whose PFX is converted to PEM unless `objectFormat: pfx`;
a `key` is its public key as PEM; a `cert` is the leaf certificate as PEM. `objectEncoding` is applied last to every file
of a `secret`. With `split_cert_key` (upstream's --write-cert-and-key-in-separate-files),
certificate-backed secrets also get `.crt` and `.key` files, listed before the main file.

kvfs difference (an upstream fault): with `objectFormat: pfx`, upstream writes empty `.crt` and
`.key` files because the content is base64, not PEM. kvfs decodes the PFX and writes the
certificates (chain-ordered like the PEM format) and the PKCS#8 private key there, as PEM text
(objectEncoding, which describes the PFX value, is not applied to them). If the PFX cannot be
decoded, both files stay empty, as upstream, and a warning is logged.
"""

from __future__ import annotations

import binascii
import logging
from collections.abc import Mapping
from typing import Any

from kvfs.config.model import ObjectSpec
from kvfs.errors import RenderError
from kvfs.vault.pem import b64decode_std, cer_to_pem, go_string_bytes, split_pem

log = logging.getLogger(__name__)

__all__ = ["CONTENT_TYPE_PEM", "CONTENT_TYPE_PKCS12", "render_object"]

CONTENT_TYPE_PEM = "application/x-pem-file"
CONTENT_TYPE_PKCS12 = "application/x-pkcs12"

_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


def _prefix(spec: ObjectSpec) -> str:
    """Upstream's error prefix; users alert on it, so it is kept verbatim."""
    return f"failed to get objectType:{spec.type}, objectName:{spec.name}, objectVersion:{spec.version}: "


def _hex_problem(data: bytes) -> str:
    """Why Go's hex.DecodeString rejects `data` (position only, never the character)."""
    for index, byte in enumerate(data):
        if byte not in _HEX_DIGITS:
            return f"invalid hex character at input byte {index}"
    return "odd length hex string"


def _decode(content: bytes, encoding: str) -> bytes:
    """Apply objectEncoding (applied last, to every file of a `secret`) to one file's content."""
    kind = encoding.lower()
    if kind in ("", "utf-8"):
        return content
    if kind == "base64":
        try:
            return b64decode_std(content)
        except ValueError as err:
            raise RenderError(
                f"objectEncoding base64: {err}; the Key Vault value must be standard base64"
                " with padding (not base64url), or remove objectEncoding"
            ) from None
    if kind == "hex":
        try:
            return binascii.unhexlify(content)
        except (binascii.Error, ValueError):
            raise RenderError(
                f"objectEncoding hex: {_hex_problem(content)}; the Key Vault value must be"
                " hex digits only (either case), or remove objectEncoding"
            ) from None
    raise RenderError("invalid objectEncoding. Should be utf-8, base64, or hex")


def _split_pfx(value: str, spec: ObjectSpec, construct_pem_chain: bool) -> tuple[bytes, bytes]:
    """`.crt` / `.key` for `objectFormat: pfx` (kvfs improvement over upstream's empty files)."""
    from kvfs.vault.pkix import pfx_to_pem  # cryptography, only for objects that need it

    try:
        return split_pem(pfx_to_pem(value, construct_chain=construct_pem_chain, label=spec.object_id))
    except RenderError as err:
        log.warning(
            "%s: cannot decode the PFX for the .crt/.key files, leaving them empty: %s",
            spec.object_id,
            err,
        )
        return b"", b""


def _render_secret(
    spec: ObjectSpec, bundle: Mapping[str, Any], split_cert_key: bool, construct_pem_chain: bool
) -> dict[str, bytes]:
    value = bundle.get("value")
    if value is None:
        raise RenderError("secret value is nil")
    if bundle.get("id") is None:
        raise RenderError("secret id is nil")
    if not isinstance(value, str):
        raise RenderError("secret value is not a string")

    content = go_string_bytes(value)
    kid = bundle.get("kid")
    if not (isinstance(kid, str) and kid):
        return {"": _decode(content, spec.encoding)}

    content_type = bundle.get("contentType") or ""
    verbatim_pfx = False
    if content_type == CONTENT_TYPE_PEM:
        pass
    elif content_type == CONTENT_TYPE_PKCS12:
        if spec.format.lower() == "pfx":
            verbatim_pfx = True
        else:
            from kvfs.vault.pkix import pfx_to_pem

            content = pfx_to_pem(value, construct_chain=construct_pem_chain, label=spec.object_id)
    else:
        raise RenderError(f"failed to get certificate. unknown content type '{content_type}'")

    files: dict[str, bytes] = {}
    if split_cert_key:
        if verbatim_pfx:
            files[".crt"], files[".key"] = _split_pfx(value, spec, construct_pem_chain)
        else:
            certs, keys = split_pem(content)
            files[".crt"] = _decode(certs, spec.encoding)
            files[".key"] = _decode(keys, spec.encoding)
    files[""] = _decode(content, spec.encoding)
    return files


def render_object(
    spec: ObjectSpec,
    bundle: Mapping[str, Any],
    *,
    split_cert_key: bool = False,
    construct_pem_chain: bool = True,
) -> dict[str, bytes]:
    """File suffix → bytes for one fetched object: "" is the main file; ".crt"/".key" come first.

    `bundle` is Key Vault's JSON: a SecretBundle for `secret`, a KeyBundle for `key`, a
    CertificateBundle for `cert`. Raises RenderError prefixed like upstream
    (`failed to get objectType:…, objectName:…, objectVersion:…: `); messages never hold secrets.
    """
    try:
        if spec.type == "secret":
            return _render_secret(spec, bundle, split_cert_key, construct_pem_chain)
        if spec.type == "key":
            from kvfs.vault.pkix import jwk_to_pem

            return {"": jwk_to_pem(bundle.get("key"))}
        if spec.type == "cert":
            cer = bundle.get("cer")
            if cer is None:
                raise RenderError("certificate value is nil")
            if bundle.get("id") is None:
                raise RenderError("certificate id is nil")
            return {"": cer_to_pem(cer)}
        raise RenderError("Invalid vaultObjectTypes. Should be secret, key, or cert")
    except RenderError as err:
        raise RenderError(_prefix(spec) + str(err)) from None
