"""Entra ID token endpoint of the emulator: client credentials, error shapes, discovery."""

from __future__ import annotations

import base64
import logging
import re
import uuid
from collections.abc import Callable
from urllib.parse import quote

import httpx
import jwt
import pytest

from idp import AUTH, ISSUER, KV, SCOPE, TENANT, TOKEN_PATH
from kvfs.emulator.identity import IdentityProvider


def secret_form(provider: IdentityProvider, **over: str) -> dict[str, str]:
    form = {
        "client_id": provider.default_app.client_id,
        "client_secret": provider.default_app.client_secret or "",
        "grant_type": "client_credentials",
        "scope": SCOPE,
    }
    form.update(over)
    return {k: v for k, v in form.items() if v is not None}


def assert_entra_error(r: httpx.Response, status: int, error: str, code: int) -> str:
    """Check Entra's full error shape; returns the first line of the description."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {
        "error",
        "error_description",
        "error_codes",
        "timestamp",
        "trace_id",
        "correlation_id",
        "error_uri",
    }
    assert body["error"] == error
    assert body["error_codes"] == [code]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", body["timestamp"])
    uuid.UUID(body["trace_id"])
    uuid.UUID(body["correlation_id"])
    assert body["error_uri"].endswith(f"/error?code={code}")
    lines = body["error_description"].split("\r\n")
    assert lines[0].startswith(f"AADSTS{code}: ")
    assert lines[1:] == [
        f"Trace ID: {body['trace_id']}",
        f"Correlation ID: {body['correlation_id']}",
        f"Timestamp: {body['timestamp']}",
    ]
    assert "no-store" in r.headers["cache-control"]
    return lines[0]


async def test_client_secret_issues_v1_shaped_access_token(
    provider: IdentityProvider, client: httpx.AsyncClient
) -> None:
    r = await client.post(TOKEN_PATH, data=secret_form(provider))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"token_type", "expires_in", "ext_expires_in", "access_token"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == body["ext_expires_in"] == 3600
    assert "no-store" in r.headers["cache-control"]
    token = body["access_token"]
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256" and header["typ"] == "JWT"
    assert header["kid"] == header["x5t"] == provider.entra_key.kid
    claims = jwt.decode(token, provider.entra_key.public_key, algorithms=["RS256"], audience=KV)
    app = provider.default_app
    assert claims["aud"] == KV
    assert claims["iss"] == f"https://sts.windows.net/{TENANT}/"
    assert (claims["appid"], claims["oid"], claims["sub"], claims["tid"]) == (
        app.client_id,
        app.object_id,
        app.object_id,
        TENANT,
    )
    assert claims["ver"] == "1.0" and claims["appidacr"] == "1"
    assert claims["exp"] - claims["iat"] == 3600 and claims["nbf"] == claims["iat"]
    principal = provider.verify_access_token(token, audience=KV)
    assert principal.client_id == app.client_id and principal.object_id == app.object_id


async def test_token_lifetime_is_configurable(provider: IdentityProvider, client: httpx.AsyncClient) -> None:
    provider.token_lifetime = 90
    body = (await client.post(TOKEN_PATH, data=secret_form(provider))).json()
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert body["expires_in"] == 90 and claims["exp"] - claims["iat"] == 90


async def test_client_secret_via_http_basic(provider: IdentityProvider, client: httpx.AsyncClient) -> None:
    app = provider.add_app(secret="p+w:d/=% é")
    basic = base64.b64encode(
        f"{quote(app.client_id)}:{quote(app.client_secret or '', safe='')}".encode()
    ).decode()
    form = {"grant_type": "client_credentials", "scope": SCOPE}
    r = await client.post(TOKEN_PATH, data=form, headers={"Authorization": f"Basic {basic}"})
    assert r.status_code == 200, r.text
    assert provider.verify_access_token(r.json()["access_token"], audience=KV).client_id == app.client_id
    bad = base64.b64encode(f"{app.client_id}:nope".encode()).decode()
    r = await client.post(TOKEN_PATH, data=form, headers={"Authorization": f"Basic {bad}"})
    assert_entra_error(r, 401, "invalid_client", 7000215)


async def test_v1_endpoint_takes_resource_and_answers_strings(
    provider: IdentityProvider, client: httpx.AsyncClient
) -> None:
    form = secret_form(provider)
    del form["scope"]
    form["resource"] = KV
    r = await client.post(f"/{TENANT}/oauth2/token", data=form)
    assert r.status_code == 200, r.text
    body = r.json()
    for field in ("expires_in", "ext_expires_in", "expires_on", "not_before"):
        assert isinstance(body[field], str) and body[field].isdigit()
    assert int(body["expires_on"]) - int(body["not_before"]) == int(body["expires_in"]) == 3600
    assert body["resource"] == KV
    provider.verify_access_token(body["access_token"], audience=KV)
    del form["resource"]
    line = assert_entra_error(
        await client.post(f"/{TENANT}/oauth2/token", data=form), 400, "invalid_request", 900144
    )
    assert "'resource'" in line


async def test_wrong_secret_is_7000215_and_never_echoed(
    provider: IdentityProvider, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    r = await client.post(TOKEN_PATH, data=secret_form(provider, client_secret="Sup3r-Wr0ng-Secret"))
    line = assert_entra_error(r, 401, "invalid_client", 7000215)
    assert line.startswith("AADSTS7000215: Invalid client secret provided.")
    assert provider.default_app.client_id in line
    assert "Sup3r-Wr0ng-Secret" not in r.text and "Sup3r-Wr0ng-Secret" not in caplog.text
    assert (provider.default_app.client_secret or "") not in caplog.text
    assert "AADSTS7000215" in caplog.text


async def test_app_without_secret_refuses_any_secret(
    provider: IdentityProvider, client: httpx.AsyncClient
) -> None:
    app = provider.add_app(secret="")
    assert app.client_secret is None
    r = await client.post(TOKEN_PATH, data=secret_form(provider, client_id=app.client_id, client_secret="x"))
    assert_entra_error(r, 401, "invalid_client", 7000215)


async def test_no_credential_is_7000218(provider: IdentityProvider, client: httpx.AsyncClient) -> None:
    form = secret_form(provider)
    del form["client_secret"]
    line = assert_entra_error(await client.post(TOKEN_PATH, data=form), 401, "invalid_client", 7000218)
    assert "'client_assertion' or 'client_secret'" in line


async def test_unknown_client_is_700016(provider: IdentityProvider, client: httpx.AsyncClient) -> None:
    stranger = str(uuid.uuid4())
    r = await client.post(TOKEN_PATH, data=secret_form(provider, client_id=stranger))
    line = assert_entra_error(r, 400, "unauthorized_client", 700016)
    assert f"Application with identifier '{stranger}' was not found in the directory '{TENANT}'" in line


async def test_unknown_tenant_is_90002(provider: IdentityProvider, client: httpx.AsyncClient) -> None:
    other = str(uuid.uuid4())
    r = await client.post(f"/{other}/oauth2/v2.0/token", data=secret_form(provider))
    line = assert_entra_error(r, 400, "invalid_request", 90002)
    assert f"Tenant '{other}' not found." in line
    # tenant ids are GUIDs: case does not matter
    r = await client.post(f"/{TENANT.upper()}/oauth2/v2.0/token", data=secret_form(provider))
    assert r.status_code == 200


@pytest.mark.parametrize(
    "scope",
    [
        KV,
        KV + "/secrets.read",
        f"{KV}/.default https://management.azure.com/.default",
        "/.default",
        "not-a-resource/.default",
    ],
)
async def test_bad_scope_is_70011(provider: IdentityProvider, client: httpx.AsyncClient, scope: str) -> None:
    r = await client.post(TOKEN_PATH, data=secret_form(provider, scope=scope))
    line = assert_entra_error(r, 400, "invalid_scope", 70011)
    assert f"The scope {scope} is not valid." in line


async def test_oidc_scopes_alongside_default_are_tolerated(
    provider: IdentityProvider, client: httpx.AsyncClient
) -> None:
    r = await client.post(TOKEN_PATH, data=secret_form(provider, scope=f"openid {SCOPE} offline_access"))
    assert r.status_code == 200
    assert jwt.decode(r.json()["access_token"], options={"verify_signature": False})["aud"] == KV


async def test_trailing_slash_resource_keeps_its_slash(
    provider: IdentityProvider, client: httpx.AsyncClient
) -> None:
    r = await client.post(TOKEN_PATH, data=secret_form(provider, scope=KV + "//.default"))
    token = r.json()["access_token"]
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == KV + "/"
    provider.verify_access_token(token, audience=KV)


@pytest.mark.parametrize("field", ["grant_type", "client_id", "scope"])
async def test_missing_parameter_is_900144(
    provider: IdentityProvider, client: httpx.AsyncClient, field: str
) -> None:
    form = secret_form(provider)
    del form[field]
    line = assert_entra_error(await client.post(TOKEN_PATH, data=form), 400, "invalid_request", 900144)
    assert line == f"AADSTS900144: The request body must contain the following parameter: '{field}'."


async def test_json_body_reads_as_missing_parameters(
    provider: IdentityProvider, client: httpx.AsyncClient
) -> None:
    r = await client.post(TOKEN_PATH, json=secret_form(provider))
    assert "'grant_type'" in assert_entra_error(r, 400, "invalid_request", 900144)


async def test_unsupported_grant_and_get(provider: IdentityProvider, client: httpx.AsyncClient) -> None:
    r = await client.post(TOKEN_PATH, data=secret_form(provider, grant_type="password"))
    assert_entra_error(r, 400, "unsupported_grant_type", 70003)
    assert_entra_error(await client.get(TOKEN_PATH), 400, "invalid_request", 900561)


async def test_outage_answers_503_until_cleared(
    provider: IdentityProvider, client: httpx.AsyncClient
) -> None:
    provider.outage = True
    r = await client.post(TOKEN_PATH, data=secret_form(provider))
    assert_entra_error(r, 503, "temporarily_unavailable", 90033)
    assert "retry-after" not in r.headers
    provider.outage_retry_after = 7
    r = await client.post(TOKEN_PATH, data=secret_form(provider))
    assert r.status_code == 503 and r.headers["retry-after"] == "7"
    provider.outage = False
    assert (await client.post(TOKEN_PATH, data=secret_form(provider))).status_code == 200


async def test_on_request_counts_every_token_request(
    provider: IdentityProvider, client: httpx.AsyncClient, expect_logs: Callable[..., None]
) -> None:
    seen: list[tuple[str, str]] = []
    provider.on_request = lambda route, cid: seen.append((route, cid))
    cid = provider.default_app.client_id
    await client.post(TOKEN_PATH, data=secret_form(provider))
    await client.post(TOKEN_PATH, data=secret_form(provider, client_secret="bad"))
    provider.outage = True
    await client.post(TOKEN_PATH, data=secret_form(provider))
    assert seen == [("token", cid)] * 3

    def broken(route: str, client_id: str) -> None:
        raise RuntimeError("hook bug")

    provider.outage = False
    provider.on_request = broken
    expect_logs(r"on_request hook failed", level=logging.ERROR)
    assert (await client.post(TOKEN_PATH, data=secret_form(provider))).status_code == 200


async def test_correlation_id_echoes_client_request_id(
    provider: IdentityProvider, client: httpx.AsyncClient
) -> None:
    rid = str(uuid.uuid4())
    r = await client.post(
        TOKEN_PATH, data=secret_form(provider, client_secret="bad"), headers={"client-request-id": rid}
    )
    assert r.json()["correlation_id"] == rid


async def test_entra_discovery_and_keys_verify_issued_tokens(
    provider: IdentityProvider, client: httpx.AsyncClient
) -> None:
    conf = (await client.get(f"/{TENANT}/v2.0/.well-known/openid-configuration")).json()
    assert conf["issuer"] == f"{AUTH}/{TENANT}/v2.0"
    assert conf["token_endpoint"] == AUTH + TOKEN_PATH
    assert {"authorization_endpoint", "jwks_uri"} <= set(conf)
    r = await client.post(conf["token_endpoint"], data=secret_form(provider))
    token = r.json()["access_token"]
    jwks = (await client.get(conf["jwks_uri"])).json()
    kid = jwt.get_unverified_header(token)["kid"]
    (key,) = [k for k in jwks["keys"] if k["kid"] == kid]
    assert key["x5t"] == kid and key["x5c"]
    jwt.decode(token, jwt.PyJWK(key).key, algorithms=["RS256"], audience=KV)
    v1 = (await client.get(f"/{TENANT}/.well-known/openid-configuration")).json()
    assert v1["issuer"] == f"https://sts.windows.net/{TENANT}/"
    assert v1["token_endpoint"] == f"{AUTH}/{TENANT}/oauth2/token"
    r = await client.get(f"/{uuid.uuid4()}/v2.0/.well-known/openid-configuration")
    assert_entra_error(r, 400, "invalid_tenant", 90002)
    inst = (
        await client.get(
            "/common/discovery/instance",
            params={"authorization_endpoint": f"{AUTH}/{TENANT}/oauth2/v2.0/authorize"},
        )
    ).json()
    assert inst["tenant_discovery_endpoint"] == f"{AUTH}/{TENANT}/v2.0/.well-known/openid-configuration"


def test_reprs_hide_secrets(provider: IdentityProvider) -> None:
    secret = provider.default_app.client_secret
    assert secret and secret not in repr(provider.default_app) and secret not in repr(provider)


def test_directory_rejects_duplicates_and_unknowns(provider: IdentityProvider) -> None:
    with pytest.raises(ValueError):
        provider.add_app(provider.default_app.client_id)
    with pytest.raises(ValueError):
        provider.add_federated_credential(str(uuid.uuid4()), issuer=ISSUER, subject="s")
    with pytest.raises(ValueError):  # (issuer, subject) is unique per app
        provider.add_federated_credential(
            provider.default_app.client_id, issuer=ISSUER, subject="system:serviceaccount:default:workload"
        )
    app = provider.add_app()
    for i in range(20):
        provider.add_federated_credential(app.client_id, issuer=ISSUER, subject=f"s{i}")
    with pytest.raises(ValueError):
        provider.add_federated_credential(app.client_id, issuer=ISSUER, subject="one-too-many")
