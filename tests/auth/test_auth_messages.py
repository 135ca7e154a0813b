"""Every Entra / IMDS / NMI error becomes one message naming what was presented and the fix."""

from __future__ import annotations

import dataclasses
import errno

import httpx
import pytest

from auth.conftest import StaticSource
from kvfs.auth.flows import AssertionCredential, ClientSecretCredential
from kvfs.auth.messages import EntraContext, entra_error, imds_error, safe_text
from kvfs.errors import AuthError
from kvfs.net.retry import ENTRA_RETRY

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
AUTHORITY = "https://login.microsoftonline.com"
SCOPE = "https://vault.azure.net/.default"
SECRET = "Xy8Q~super.secret-value_123"
# what Entra echoes for 70021: deliberately different from the presented token's claims
ECHO_ISS = "https://oidc.prod-aks.azure.com/echoed-issuer/"
ECHO_SUB = "system:serviceaccount:echoed-ns:echoed-sa"
ECHO_AUD = "api://AzureADTokenExchange"
ONE_ATTEMPT = dataclasses.replace(ENTRA_RETRY, max_attempts=1)


async def exchange(status: int, body: dict, assertion: str | None) -> AuthError:
    """Run the real flow against an Entra-shaped error response; return the AuthError."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        if assertion is None:
            cred = ClientSecretCredential(AUTHORITY, TENANT, CLIENT_ID, SECRET, http, retry=ONE_ATTEMPT)
        else:
            cred = AssertionCredential(AUTHORITY, TENANT, CLIENT_ID, StaticSource(assertion), http, retry=ONE_ATTEMPT)
        with pytest.raises(AuthError) as exc:
            await cred.get_token(SCOPE)
    return exc.value


async def test_70021_names_echoed_claims_ids_and_fix(sa_token, entra_body) -> None:
    body = entra_body(
        70021, "invalid_request",
        "No matching federated identity record found for presented assertion. "
        f"Assertion Issuer: '{ECHO_ISS}'. Assertion Subject: '{ECHO_SUB}'. Assertion Audience: '{ECHO_AUD}'.",
    )
    err = await exchange(400, body, sa_token())
    msg = str(err)
    assert err.code == "AADSTS70021" and err.errno == errno.EACCES
    for value in (ECHO_ISS, ECHO_SUB, ECHO_AUD, CLIENT_ID, TENANT):
        assert value in msg
    assert "az identity federated-credential create" in msg
    assert "az ad app federated-credential create" in msg
    assert f"--issuer '{ECHO_ISS}'" in msg and f"--subject '{ECHO_SUB}'" in msg
    assert "Trace ID" not in msg


async def test_70021_without_echo_uses_presented_claims(sa_token, entra_body) -> None:
    token = sa_token(iss="https://issuer.example/cluster-7", sub="system:serviceaccount:x:y")
    body = entra_body(70021, "invalid_request", "No matching federated identity record found.")
    msg = str(await exchange(400, body, token))
    assert "https://issuer.example/cluster-7" in msg and "system:serviceaccount:x:y" in msg


@pytest.mark.parametrize(
    ("code", "claims", "must"),
    [
        (700211, {"iss": "https://issuer.example/no-slash"},
         ["'https://issuer.example/no-slash'", "trailing '/'", "oidcIssuerProfile.issuerUrl"]),
        (700212, {"aud": "api://SomethingElse"}, ["'api://SomethingElse'", "audiences", "api://AzureADTokenExchange"]),
        (700213, {"sub": "system:serviceaccount:Demo:SA"}, ["'system:serviceaccount:Demo:SA'", "case-sensitive"]),
    ],
)
async def test_fic_field_mismatch(sa_token, entra_body, code: int, claims: dict, must: list[str]) -> None:
    err = await exchange(400, entra_body(code, "invalid_request", "No matching federated identity record."),
                         sa_token(**claims))
    assert err.code == f"AADSTS{code}"
    msg = str(err)
    for text in must + [CLIENT_ID, TENANT, "federated-credential create"]:
        assert text in msg, text


async def test_700016_client_not_in_tenant(entra_body) -> None:
    err = await exchange(400, entra_body(
        700016, "unauthorized_client",
        f"Application with identifier '{CLIENT_ID}' was not found in the directory '{TENANT}'."), None)
    msg = str(err)
    assert CLIENT_ID in msg and TENANT in msg and "clientId" in msg and "object" in msg
    assert err.code == "AADSTS700016"


async def test_7000215_secret_value_vs_id(entra_body) -> None:
    err = await exchange(401, entra_body(
        7000215, "invalid_client",
        "Invalid client secret provided. Ensure the secret being sent in the request is the client "
        "secret value, not the client secret ID, for a secret added to app '...'."), None)
    msg = str(err)
    assert "Value, not its Secret ID" in msg and CLIENT_ID in msg and "clientsecret" in msg
    assert SECRET not in msg and err.errno == errno.EACCES


async def test_700024_expired_assertion(sa_token, entra_body) -> None:
    token = sa_token(exp_in=-120)
    err = await exchange(400, entra_body(700024, "invalid_client",
                                         "Client assertion is not within its valid time range."), token)
    msg = str(err)
    assert "clock" in msg and "kubelet" in msg and CLIENT_ID in msg
    import jwt as pyjwt
    exp = pyjwt.decode(token, options={"verify_signature": False})["exp"]
    assert f"exp={exp}" in msg


async def test_90002_tenant_not_found(entra_body) -> None:
    err = await exchange(400, entra_body(90002, "invalid_request", f"Tenant '{TENANT}' not found."), None)
    msg = str(err)
    assert TENANT in msg and "tenantID" in msg and "cloudName" in msg and AUTHORITY in msg


async def test_70011_scope(entra_body) -> None:
    err = await exchange(400, entra_body(70011, "invalid_scope", "The provided value for scope is not valid."),
                         None)
    msg = str(err)
    assert SCOPE in msg and "keyVaultEndpoint" in msg and err.code == "AADSTS70011"


@pytest.mark.parametrize("code", [50166, 90061])
async def test_oidc_endpoint_unreachable(sa_token, entra_body, code: int) -> None:
    err = await exchange(400, entra_body(code, "invalid_request", "Request to External OIDC endpoint failed."),
                         sa_token(iss="https://private-issuer.internal/x"))
    msg = str(err)
    assert "https://private-issuer.internal/x/.well-known/openid-configuration" in msg
    assert "publicly reachable" in msg and err.code == f"AADSTS{code}"


async def test_unknown_code_shows_code_and_first_line(entra_body) -> None:
    err = await exchange(400, entra_body(53003, "invalid_grant", "Access has been blocked by Conditional Access."),
                         None)
    msg = str(err)
    assert "AADSTS53003" in msg and "Conditional Access" in msg and "Trace ID" not in msg
    assert err.code == "AADSTS53003"


async def test_branches_on_error_codes_not_description(entra_body) -> None:
    body = entra_body(90002, "invalid_request", "a reworded description mentioning nothing")
    err = await exchange(400, body, None)
    assert err.code == "AADSTS90002" and "tenantID" in str(err)


async def test_entra_5xx_and_non_json() -> None:
    def ctx() -> EntraContext:
        return EntraContext("service principal", AUTHORITY, TENANT, CLIENT_ID, SCOPE)

    err = entra_error(502, "<html>Bad gateway</html>", ctx())
    assert err.errno == errno.EIO and err.code == "entra_http_502" and "activeDirectoryEndpoint" in str(err)
    err = entra_error(500, {"error": "server_error", "error_description": "AADSTS90033: transient",
                            "error_codes": [90033]}, ctx())
    assert err.errno == errno.EIO and err.code == "AADSTS90033"


def test_throttling_is_eio_not_eacces() -> None:
    ctx = EntraContext("service principal", AUTHORITY, TENANT, CLIENT_ID, SCOPE)
    body = {"error": "temporarily_unavailable", "error_description": "AADSTS50196: loop detected",
            "error_codes": [50196]}
    assert entra_error(429, body, ctx).errno == errno.EIO
    assert entra_error(400, body, ctx).errno == errno.EACCES


def test_imds_messages() -> None:
    base = "http://169.254.169.254"
    err = imds_error(400, {"error": "invalid_request", "error_description": "Identity not found"},
                     base_url=base, client_id="cid-1")
    assert "cid-1" in str(err) and "userAssignedIdentityID" in str(err) and err.code == "imds_identity_not_found"
    err = imds_error(400, {"error": "invalid_request", "error_description":
                           "Multiple user assigned identities exist, please specify the clientId / resourceId"},
                     base_url=base, client_id=None)
    assert "userAssignedIdentityID" in str(err) and err.code == "imds_multiple_identities"
    err = imds_error(410, "", base_url=base, client_id=None)
    assert err.errno == errno.EIO and "system-assigned" in str(err)


def test_safe_text_redacts() -> None:
    jwt_like = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.sig-part_01"
    text = safe_text(f"first {jwt_like} {SECRET}\nsecond line", [SECRET])
    assert text == "first <redacted-jwt> <redacted>"
    assert len(safe_text("x" * 10_000)) < 400
