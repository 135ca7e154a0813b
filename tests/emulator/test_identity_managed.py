"""Managed identities over HTTP: IMDS (VM identities) and NMI (aad-pod-identity)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import jwt
import pytest
from starlette.applications import Starlette

from idp import KV
from kvfs.emulator.identity import IdentityProvider

IMDS = "/metadata/identity/oauth2/token"
MD = {"Metadata": "true"}
MULTIPLE = (
    "Multiple user assigned identities exist, please specify the clientId / resourceId of the "
    "identity in the token request"
)


@pytest.fixture
async def client(provider: IdentityProvider) -> AsyncIterator[httpx.AsyncClient]:
    """IMDS and NMI are plain HTTP on the node: this overrides conftest's HTTPS client."""
    app = Starlette(routes=provider.http_routes())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://169.254.169.254"
    ) as c:
        yield c


def params(**extra: str) -> dict[str, str]:
    return {"api-version": "2018-02-01", "resource": KV, **extra}


async def test_metadata_header_is_required(client: httpx.AsyncClient) -> None:
    for headers in ({}, {"Metadata": "false"}):
        r = await client.get(IMDS, params=params(), headers=headers)
        assert r.status_code == 400
        assert r.json() == {
            "error": "bad_request_102",
            "error_description": "Required metadata header not specified",
        }


async def test_default_identity_numbers_are_strings(
    provider: IdentityProvider, client: httpx.AsyncClient
) -> None:
    provider.token_lifetime = 1234
    r = await client.get(IMDS, params=params(), headers=MD)
    assert r.status_code == 200, r.text
    body = r.json()
    for field in ("expires_in", "expires_on", "not_before", "ext_expires_in"):
        assert isinstance(body[field], str) and body[field].isdigit(), field
    assert body["expires_in"] == "1234"
    assert int(body["expires_on"]) - int(body["not_before"]) == 1234
    assert body["resource"] == KV and body["token_type"] == "Bearer"
    mi = provider.default_managed_identity
    assert body["client_id"] == mi.client_id
    principal = provider.verify_access_token(body["access_token"], audience=KV)
    assert (principal.client_id, principal.object_id) == (mi.client_id, mi.object_id)
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["xms_mirid"] == mi.resource_id and claims["aud"] == KV


async def test_user_assigned_selectors(provider: IdentityProvider, client: httpx.AsyncClient) -> None:
    second = provider.add_managed_identity()
    for selector in (
        {"client_id": second.client_id},
        {"client_id": second.client_id.upper()},
        {"object_id": second.object_id},
        {"msi_res_id": second.resource_id},
        {"mi_res_id": second.resource_id.lower()},
    ):
        r = await client.get(IMDS, params=params(**selector), headers=MD)
        assert r.status_code == 200, (selector, r.text)
        assert (
            provider.verify_access_token(r.json()["access_token"], audience=KV).client_id == second.client_id
        )


async def test_multiple_user_assigned_need_a_selector(
    provider: IdentityProvider, client: httpx.AsyncClient
) -> None:
    provider.add_managed_identity()
    r = await client.get(IMDS, params=params(), headers=MD)
    assert r.status_code == 400
    assert r.json() == {"error": "invalid_request", "error_description": MULTIPLE}


async def test_system_assigned_is_the_default_when_present(
    provider: IdentityProvider, client: httpx.AsyncClient
) -> None:
    ua = provider.default_managed_identity.client_id
    provider.add_managed_identity()
    system = provider.add_managed_identity(system=True)
    assert system.system_assigned and system.managed
    assert provider.default_managed_identity is system
    r = await client.get(IMDS, params=params(), headers=MD)
    assert r.status_code == 200
    assert provider.verify_access_token(r.json()["access_token"], audience=KV).object_id == system.object_id
    # a user-assigned one is still reachable by its client id, and NMI follows the default
    r = await client.get(IMDS, params=params(client_id=ua), headers=MD)
    assert provider.verify_access_token(r.json()["access_token"], audience=KV).client_id == ua
    r = await client.get("/host/token/", params={"resource": KV}, headers={"podname": "p", "podns": "n"})
    assert r.json()["clientid"] == system.client_id
    with pytest.raises(ValueError):
        provider.add_managed_identity(system=True)


async def test_unknown_identity(provider: IdentityProvider, client: httpx.AsyncClient) -> None:
    for selector in ({"client_id": provider.default_app.client_id}, {"msi_res_id": "/subscriptions/x/nope"}):
        r = await client.get(IMDS, params=params(**selector), headers=MD)
        assert r.status_code == 400
        assert r.json() == {"error": "invalid_request", "error_description": "Identity not found"}


async def test_bad_requests(provider: IdentityProvider, client: httpx.AsyncClient) -> None:
    r = await client.get(IMDS, params={"resource": KV}, headers=MD)
    assert r.status_code == 400 and "api-version" in r.json()["error_description"]
    r = await client.get(IMDS, params={"api-version": "2018-02-01"}, headers=MD)
    assert r.status_code == 400 and "'resource'" in r.json()["error_description"]
    r = await client.get(IMDS, params=params(resource=KV + "/.default"), headers=MD)
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_resource"
    assert r.json()["error_description"].startswith("AADSTS50001: ")


async def test_imds_outage_and_request_hook(provider: IdentityProvider, client: httpx.AsyncClient) -> None:
    seen: list[tuple[str, str]] = []
    provider.on_request = lambda route, cid: seen.append((route, cid))
    await client.get(IMDS, params=params(), headers=MD)
    provider.outage = True
    r = await client.get(IMDS, params=params(), headers=MD)
    assert r.status_code == 503 and r.json()["error"] == "temporarily_unavailable"
    assert seen == [("imds", provider.default_managed_identity.client_id)] * 2


async def test_nmi_serves_the_default_identity(provider: IdentityProvider, client: httpx.AsyncClient) -> None:
    provider.token_lifetime = 600
    r = await client.get(
        "/host/token/", params={"resource": KV}, headers={"podname": "web-0", "podns": "shop"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"token", "clientid"}
    assert body["clientid"] == provider.default_managed_identity.client_id
    token = body["token"]
    assert set(token) >= {"access_token", "expires_on", "resource", "token_type", "expires_in"}
    assert token["expires_in"] == 600 and token["expires_on"] - token["not_before"] == 600
    assert token["resource"] == KV and token["token_type"] == "Bearer"
    principal = provider.verify_access_token(token["access_token"], audience=KV)
    assert principal.client_id == body["clientid"]


async def test_nmi_binding(provider: IdentityProvider, client: httpx.AsyncClient) -> None:
    other = provider.add_managed_identity()
    provider.bind_pod("shop", "web-1", other.client_id)
    provider.bind_pod("shop", "web-2", None)
    seen: list[tuple[str, str]] = []
    provider.on_request = lambda route, cid: seen.append((route, cid))
    r = await client.get(
        "/host/token", params={"resource": KV}, headers={"podname": "web-1", "podns": "shop"}
    )
    assert r.status_code == 200 and r.json()["clientid"] == other.client_id
    r = await client.get(
        "/host/token/", params={"resource": KV}, headers={"podname": "web-2", "podns": "shop"}
    )
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("text/plain")
    assert "shop/web-2" in r.text
    assert seen == [("nmi", other.client_id), ("nmi", "")]
    with pytest.raises(ValueError):
        provider.bind_pod("shop", "web-3", "00000000-0000-0000-0000-000000000000")


async def test_nmi_bad_requests(provider: IdentityProvider, client: httpx.AsyncClient) -> None:
    r = await client.get("/host/token/", params={"resource": KV}, headers={"podname": "web-0"})
    assert r.status_code == 400 and "podns" in r.text
    r = await client.get("/host/token/", headers={"podname": "web-0", "podns": "shop"})
    assert r.status_code == 400 and "resource" in r.text
    provider.outage = True
    r = await client.get(
        "/host/token/", params={"resource": KV}, headers={"podname": "web-0", "podns": "shop"}
    )
    assert r.status_code == 500
