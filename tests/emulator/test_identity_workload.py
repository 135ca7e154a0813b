"""Workload identity: the cluster OIDC issuer and Entra's federated assertion checks."""

from __future__ import annotations

import base64
import hashlib
import time
import uuid

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from idp import ISSUER, JWT_BEARER, KV, TOKEN_PATH
from kvfs.emulator.identity import IdentityProvider

SUBJECT = "system:serviceaccount:default:workload"

_FOREIGN = rsa.generate_private_key(public_exponent=65537, key_size=2048)


async def exchange(client: httpx.AsyncClient, client_id: str, assertion: str, **over: str) -> httpx.Response:
    form = {
        "client_assertion": assertion,
        "client_assertion_type": JWT_BEARER,
        "client_id": client_id,
        "grant_type": "client_credentials",
        "scope": KV + "/.default",
    }
    form.update(over)
    return await client.post(TOKEN_PATH, data=form)


def error_line(r: httpx.Response, status: int, error: str, code: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == error and body["error_codes"] == [code]
    line = body["error_description"].split("\r\n")[0]
    assert line.startswith(f"AADSTS{code}: ")
    return line


async def test_issuer_discovery_and_jwks_verify_minted_tokens(
    provider: IdentityProvider, client: httpx.AsyncClient
) -> None:
    conf = (await client.get("/oidc/.well-known/openid-configuration")).json()
    assert conf["issuer"] == ISSUER
    assert conf["jwks_uri"] == ISSUER + "/openid/v1/jwks"
    assert conf["id_token_signing_alg_values_supported"] == ["RS256"]
    jwks = (await client.get("/oidc/openid/v1/jwks")).json()
    (key,) = jwks["keys"]
    assert key["kty"] == "RSA" and key["alg"] == "RS256" and key["use"] == "sig"
    spki = jwt.PyJWK(key).key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert key["kid"] == base64.urlsafe_b64encode(hashlib.sha256(spki).digest()).rstrip(b"=").decode()

    token = provider.mint_sa_token("team-a", "reader", lifetime=7200, pod="web-0")
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "RS256", "kid": key["kid"]}
    claims = jwt.decode(
        token, jwt.PyJWK(key).key, algorithms=["RS256"], audience="api://AzureADTokenExchange", issuer=ISSUER
    )
    assert claims["aud"] == ["api://AzureADTokenExchange"]
    assert claims["sub"] == "system:serviceaccount:team-a:reader"
    assert claims["exp"] - claims["iat"] == 7200 and claims["nbf"] == claims["iat"]
    uuid.UUID(claims["jti"])
    k8s = claims["kubernetes.io"]
    assert k8s["namespace"] == "team-a" and k8s["serviceaccount"]["name"] == "reader"
    assert k8s["pod"]["name"] == "web-0"


async def test_default_app_federates_default_workload(
    provider: IdentityProvider, client: httpx.AsyncClient
) -> None:
    r = await exchange(
        client, provider.default_app.client_id, provider.mint_sa_token("default", "workload") + "\n"
    )
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    assert jwt.decode(token, options={"verify_signature": False})["appidacr"] == "2"
    assert provider.verify_access_token(token, audience=KV).client_id == provider.default_app.client_id


async def test_user_assigned_identity_can_carry_fic(
    provider: IdentityProvider, client: httpx.AsyncClient
) -> None:
    mi = provider.add_managed_identity()
    provider.add_federated_credential(
        mi.client_id,
        issuer=ISSUER,
        subject="system:serviceaccount:ns1:sa1",
        audience="api://AKSIdentityBinding",
    )
    sa = provider.mint_sa_token("ns1", "sa1", audience="api://AKSIdentityBinding")
    r = await exchange(client, mi.client_id, sa)
    assert r.status_code == 200, r.text
    assert provider.verify_access_token(r.json()["access_token"], audience=KV).object_id == mi.object_id


@pytest.mark.parametrize(
    ("namespace", "sa", "audience", "issuer"),
    [
        ("default", "Workload", "api://AzureADTokenExchange", None),  # subject is case-sensitive
        ("Default", "workload", "api://AzureADTokenExchange", None),
        ("default", "workload", "api://AKSIdentityBinding", None),  # audience
        ("default", "workload", "api://AzureADTokenExchange", ISSUER + "/"),  # trailing slash on iss
        ("default", "workload", "api://AzureADTokenExchange", ISSUER.upper()),
    ],
)
async def test_fic_mismatch_is_70021_naming_the_assertion(
    provider: IdentityProvider,
    client: httpx.AsyncClient,
    namespace: str,
    sa: str,
    audience: str,
    issuer: str | None,
) -> None:
    token = provider.mint_sa_token(namespace, sa, audience=audience, issuer=issuer)
    line = error_line(
        await exchange(client, provider.default_app.client_id, token), 400, "invalid_request", 70021
    )
    assert line.startswith(
        "AADSTS70021: No matching federated identity record found for presented assertion. "
        f"Assertion Issuer: '{issuer or ISSUER}'. "
        f"Assertion Subject: 'system:serviceaccount:{namespace}:{sa}'. "
        f"Assertion Audience: '{audience}'."
    )


async def test_fic_registered_with_trailing_slash_does_not_match(
    provider: IdentityProvider, client: httpx.AsyncClient
) -> None:
    app = provider.add_app()
    provider.add_federated_credential(app.client_id, issuer=ISSUER + "/", subject=SUBJECT)
    r = await exchange(client, app.client_id, provider.mint_sa_token("default", "workload"))
    error_line(r, 400, "invalid_request", 70021)


async def test_app_without_fic_is_70021(provider: IdentityProvider, client: httpx.AsyncClient) -> None:
    provider.refined_fic_errors = True  # no FIC at all stays the general code
    app = provider.add_app()
    r = await exchange(client, app.client_id, provider.mint_sa_token("default", "workload"))
    error_line(r, 400, "invalid_request", 70021)


@pytest.mark.parametrize(
    ("kwargs", "code", "field", "value"),
    [
        ({"issuer": ISSUER + "/"}, 700211, "issuer", ISSUER + "/"),
        ({"service_account": "other"}, 700213, "subject", "system:serviceaccount:default:other"),
        ({"audience": "api://other"}, 700212, "audience", "api://other"),
    ],
)
async def test_refined_fic_codes(
    provider: IdentityProvider,
    client: httpx.AsyncClient,
    kwargs: dict[str, str],
    code: int,
    field: str,
    value: str,
) -> None:
    provider.refined_fic_errors = True
    args = {"namespace": "default", "service_account": "workload", **kwargs}
    token = provider.mint_sa_token(**args)
    line = error_line(
        await exchange(client, provider.default_app.client_id, token), 400, "invalid_request", code
    )
    assert f"No matching federated identity record found for presented assertion {field} '{value}'." in line


async def test_expired_assertion_is_700024(provider: IdentityProvider, client: httpx.AsyncClient) -> None:
    token = provider.mint_sa_token("default", "workload", lifetime=-5)
    line = error_line(
        await exchange(client, provider.default_app.client_id, token), 401, "invalid_client", 700024
    )
    assert "Client assertion is not within its valid time range." in line


async def test_not_yet_valid_assertion_is_700024(
    provider: IdentityProvider, client: httpx.AsyncClient
) -> None:
    provider.clock = lambda: time.time() + 600
    token = provider.mint_sa_token("default", "workload")
    provider.clock = time.time
    error_line(await exchange(client, provider.default_app.client_id, token), 401, "invalid_client", 700024)


async def test_assertion_valid_until_its_expiry(
    provider: IdentityProvider, client: httpx.AsyncClient
) -> None:
    start = time.time()
    provider.clock = lambda: start
    token = provider.mint_sa_token("default", "workload", lifetime=100)
    provider.clock = lambda: start + 99
    assert (await exchange(client, provider.default_app.client_id, token)).status_code == 200
    provider.clock = lambda: start + 100
    error_line(await exchange(client, provider.default_app.client_id, token), 401, "invalid_client", 700024)


def _forge(provider: IdentityProvider, kid: str) -> str:
    now = int(time.time())
    claims = {
        "aud": ["api://AzureADTokenExchange"],
        "iss": ISSUER,
        "sub": SUBJECT,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    return jwt.encode(claims, _FOREIGN, algorithm="RS256", headers={"kid": kid})


async def test_assertion_signed_by_foreign_key_is_700027(
    provider: IdentityProvider, client: httpx.AsyncClient
) -> None:
    forged = _forge(provider, provider.oidc.key.kid)  # right kid, wrong key
    line = error_line(
        await exchange(client, provider.default_app.client_id, forged), 401, "invalid_client", 700027
    )
    assert "invalid signature" in line
    forged = _forge(provider, "unknown-kid")
    line = error_line(
        await exchange(client, provider.default_app.client_id, forged), 401, "invalid_client", 700027
    )
    assert "The key was not found." in line and "unknown-kid" in line


async def test_unreachable_issuer_is_90061(provider: IdentityProvider, client: httpx.AsyncClient) -> None:
    elsewhere = "https://oidc.elsewhere.example/cluster"
    app = provider.add_app()
    provider.add_federated_credential(app.client_id, issuer=elsewhere, subject=SUBJECT)
    token = provider.mint_sa_token("default", "workload", issuer=elsewhere)
    error_line(await exchange(client, app.client_id, token), 400, "invalid_request", 90061)


async def test_malformed_assertion_is_50027_and_not_echoed(
    provider: IdentityProvider, client: httpx.AsyncClient
) -> None:
    r = await exchange(client, provider.default_app.client_id, "not.a.jwt-at-all")
    error_line(r, 400, "invalid_request", 50027)
    assert "not.a.jwt-at-all" not in r.text


async def test_assertion_type_is_checked(provider: IdentityProvider, client: httpx.AsyncClient) -> None:
    token = provider.mint_sa_token("default", "workload")
    r = await exchange(client, provider.default_app.client_id, token, client_assertion_type="urn:other")
    error_line(r, 400, "invalid_request", 900144)
    form = {
        "client_assertion": token,
        "client_id": provider.default_app.client_id,
        "grant_type": "client_credentials",
        "scope": KV + "/.default",
    }
    r = await client.post(TOKEN_PATH, data=form)
    assert "'client_assertion_type'" in error_line(r, 400, "invalid_request", 900144)
    assert token not in r.text


def test_resolve_keys_only_for_this_exact_issuer(provider: IdentityProvider) -> None:
    keys = provider.oidc.resolve_keys(ISSUER)
    assert keys is not None and set(keys) == {provider.oidc.key.kid}
    assert provider.oidc.resolve_keys(ISSUER + "/") is None
    assert provider.oidc.resolve_keys("https://localhost:8443/OIDC") is None
