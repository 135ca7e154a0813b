"""Signing keys and the Kubernetes-like OIDC issuer (discovery document, JWKS, projected tokens).

Entra validates a workload identity assertion by fetching `{iss}/.well-known/openid-configuration`
and then its `jwks_uri`; the documents served here are the ones the token endpoint resolves
in-process, so what clients can fetch and what the emulator trusts never drift apart.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import uuid
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from kvfs.emulator.pki import b64url, load_private_key, private_pem

DISCOVERY_SUFFIX = "/.well-known/openid-configuration"
JWKS_SUFFIX = "/openid/v1/jwks"


def _b64url_uint(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def _new_rsa_key() -> rsa.RSAPrivateKey:
    """One fresh 2048-bit key (a function so tests can hand out pre-generated keys)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class SigningKey:
    """An RS256 key pair with a self-signed certificate, publishable as a JWK.

    `style="entra"` names the key like Entra (kid = x5t = base64url SHA-1 of the certificate);
    `style="k8s"` like the API server (kid = base64url SHA-256 of the public key DER).
    `saved` (from `to_state`) brings back the same key and certificate, so the kid stays the same
    and tokens signed before an emulator restart still verify.
    """

    def __init__(self, common_name: str, *, style: str = "entra", saved: dict[str, str] | None = None) -> None:
        self.style = style
        if saved is None:
            self._private = _new_rsa_key()
            now = dt.datetime.now(dt.UTC)
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
            cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(self._private.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=3650))
                .sign(self._private, hashes.SHA256())
            )
        else:
            key = load_private_key(saved["key"].encode("ascii"))
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ValueError("a signing key must be RSA")
            self._private = key
            cert = x509.load_pem_x509_certificate(saved["cert"].encode("ascii"))
        self._cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.x5t = b64url(hashlib.sha1(self.cert_der).digest())  # noqa: S324 - x5t is SHA-1 by spec
        spki = self._private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.kid = self.x5t if style == "entra" else b64url(hashlib.sha256(spki).digest())

    def to_state(self) -> dict[str, str]:
        """The private key and certificate as PEM text, for the emulator's state file."""
        return {"key": private_pem(self._private).decode("ascii"), "cert": self._cert_pem}

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r})"

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self._private.public_key()

    def jwk(self) -> dict[str, Any]:
        numbers = self.public_key.public_numbers()
        if self.style == "k8s":
            return {
                "use": "sig",
                "kty": "RSA",
                "kid": self.kid,
                "alg": "RS256",
                "n": _b64url_uint(numbers.n),
                "e": _b64url_uint(numbers.e),
            }
        return {
            "kty": "RSA",
            "use": "sig",
            "kid": self.kid,
            "x5t": self.x5t,
            "n": _b64url_uint(numbers.n),
            "e": _b64url_uint(numbers.e),
            "x5c": [base64.b64encode(self.cert_der).decode("ascii")],
        }

    def sign(self, claims: dict[str, Any]) -> str:
        if self.style == "k8s":
            headers: dict[str, Any] = {"alg": "RS256", "kid": self.kid, "typ": None}
        else:
            headers = {"typ": "JWT", "alg": "RS256", "x5t": self.x5t, "kid": self.kid}
        return jwt.encode(claims, self._private, algorithm="RS256", headers=headers)


class OidcIssuer:
    """A Kubernetes service account issuer: what `--service-account-issuer` serves and signs."""

    def __init__(self, issuer: str, saved_key: dict[str, str] | None = None) -> None:
        self.issuer = issuer
        self.key = SigningKey("kvfs-emulator-sa-signer", style="k8s", saved=saved_key)
        self.path = urlsplit(issuer).path.rstrip("/")

    @property
    def jwks_uri(self) -> str:
        return self.issuer.rstrip("/") + JWKS_SUFFIX

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.key.jwk()]}

    def mint(
        self,
        namespace: str,
        service_account: str,
        *,
        audience: str,
        lifetime: int,
        issuer: str | None,
        now: float,
        pod: str | None = None,
    ) -> str:
        """A projected service account token shaped like kubelet's (TokenRequest API)."""
        iat = int(now)
        k8s: dict[str, Any] = {
            "namespace": namespace,
            "serviceaccount": {"name": service_account, "uid": str(uuid.uuid4())},
        }
        if pod is not None:
            k8s["pod"] = {"name": pod, "uid": str(uuid.uuid4())}
            k8s["node"] = {"name": "kvfs-emulator-node", "uid": str(uuid.uuid4())}
        claims = {
            "aud": [audience],
            "exp": iat + lifetime,
            "iat": iat,
            "iss": self.issuer if issuer is None else issuer,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": k8s,
            "nbf": iat,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
        }
        return self.key.sign(claims)

    def resolve_keys(self, issuer: str) -> dict[str, jwt.PyJWK] | None:
        """Discovery + JWKS for `issuer`, resolved in-process; None when it is not this issuer.

        Follows the same documents the routes serve: discovery's `issuer` must equal the
        assertion's `iss`, and `jwks_uri` must point at this issuer's JWKS.
        """
        if issuer != self.issuer:
            return None
        doc = self.discovery()
        if doc["issuer"] != issuer or doc["jwks_uri"] != self.jwks_uri:
            return None
        return {k["kid"]: jwt.PyJWK(k, algorithm="RS256") for k in self.jwks()["keys"]}

    def routes(self) -> list[BaseRoute]:
        async def discovery(request: Request) -> JSONResponse:
            return JSONResponse(self.discovery())

        async def jwks(request: Request) -> JSONResponse:
            return JSONResponse(self.jwks(), media_type="application/jwk-set+json")

        return [
            Route(self.path + DISCOVERY_SUFFIX, discovery, methods=["GET"]),
            Route(self.path + JWKS_SUFFIX, jwks, methods=["GET"]),
        ]
