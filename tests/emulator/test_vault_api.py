"""Key Vault wire fidelity of the emulator, over real HTTPS from inside the test's trio run."""

from __future__ import annotations

import json
import logging
import re
import ssl
from typing import Any

import httpx
import pytest
import trio

from kvfs.emulator import pki
from kvfs.emulator.server import Emulator

API = "7.6"


def tls(emu: Emulator) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(emu.ca_file))


def token(emu: Emulator, client_id: str | None = None, **kw: Any) -> str:
    return emu.identity.mint_access_token(client_id or emu.info["app"]["client_id"], **kw)


async def kv(
    emu: Emulator, method: str, path: str, *, auth: str | None | bool = True, api: str | None = API,
    vault: str = "demo", **kw: Any,
) -> httpx.Response:
    headers = dict(kw.pop("headers", {}))
    if auth is True:
        headers["Authorization"] = f"Bearer {token(emu)}"
    elif isinstance(auth, str):
        headers["Authorization"] = auth
    params = dict(kw.pop("params", {}))
    if api is not None:
        params["api-version"] = api
    async with httpx.AsyncClient(verify=tls(emu)) as c:
        return await c.request(method, emu.vault_url(vault) + path.lstrip("/"), params=params, headers=headers, **kw)


def error(r: httpx.Response) -> dict[str, Any]:
    return r.json()["error"]


async def test_emulator_json_has_the_contract_fields(emulator: Emulator) -> None:
    info = json.loads((emulator.dir / "emulator.json").read_text())
    assert info == emulator.info
    for k in ("tenant_id", "authority_host", "ca_file", "cloud_env_file", "vaults", "app", "sa_token_file"):
        assert k in info
    assert info["vaults"] == {"demo": f"https://demo.vault.localhost:{emulator.https_port}/"}
    assert set(info["app"]) == {"client_id", "client_secret"}
    cloud = json.loads(emulator.cloud_env_file.read_text())
    assert cloud["name"] == "AzureStackCloud"
    assert cloud["keyVaultDNSSuffix"] == f"vault.localhost:{emulator.https_port}"
    assert cloud["keyVaultEndpoint"] == f"https://vault.localhost:{emulator.https_port}/"
    assert cloud["activeDirectoryEndpoint"] == f"https://localhost:{emulator.https_port}/"
    assert emulator.sa_token_file.read_text().count(".") == 2  # a JWT


async def test_secret_bundle_shape(emulator: Emulator) -> None:
    version = emulator.set_secret("demo", "Shape-Name", "v1", tags={"a": "b"})
    r = await kv(emulator, "GET", "/secrets/shape-name/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json; charset=utf-8"
    assert r.headers["cache-control"] == "no-cache" and "x-ms-request-id" in r.headers
    body = r.json()
    assert body["value"] == "v1"
    assert body["id"] == f"{emulator.vault_url('demo')}secrets/Shape-Name/{version}"
    assert re.fullmatch(r"[0-9a-f]{32}", version)
    assert body["tags"] == {"a": "b"}
    attrs = body["attributes"]
    assert attrs["enabled"] is True and isinstance(attrs["created"], int) and isinstance(attrs["updated"], int)
    assert "nbf" not in attrs and "exp" not in attrs and "contentType" not in body
    assert "kid" not in body and "managed" not in body
    by_version = await kv(emulator, "GET", f"/secrets/SHAPE-NAME/{version}")
    assert by_version.json() == body


async def test_unauthenticated_gets_the_challenge(emulator: Emulator) -> None:
    r = await kv(emulator, "GET", "/secrets/x", auth=None)
    assert r.status_code == 401
    assert error(r) == {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer or PoP token."}
    assert r.headers["www-authenticate"] == (
        f'Bearer authorization="https://localhost:{emulator.https_port}/{emulator.tenant_id}", '
        f'resource="https://vault.localhost:{emulator.https_port}"'
    )


@pytest.mark.parametrize("bad", ["Bearer garbage", "Bearer a.b.c", "Basic dXNlcjpwYXNz", "Bearer " + "x" * 5000])
async def test_garbage_tokens_get_401(emulator: Emulator, bad: str) -> None:
    r = await kv(emulator, "GET", "/secrets/x", auth=bad)
    assert r.status_code == 401
    assert error(r)["code"] == "Unauthorized" and error(r)["message"].startswith("AKV")
    assert "www-authenticate" in r.headers
    assert bad.split(" ", 1)[1][:40] not in r.text


async def test_wrong_audience_is_akv10022(emulator: Emulator) -> None:
    tok = token(emulator, resource="https://management.azure.com")
    r = await kv(emulator, "GET", "/secrets/x", auth=f"Bearer {tok}")
    assert r.status_code == 401 and error(r)["message"].startswith("AKV10022: Invalid audience.")


@pytest.mark.parametrize("api", ["2016-10-01", "7.0", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "2025-07-01", "2026-04-01"])
async def test_known_api_versions(emulator: Emulator, api: str) -> None:
    emulator.set_secret("demo", "api", "ok")
    assert (await kv(emulator, "GET", "/secrets/api", api=api)).status_code == 200


async def test_missing_and_unknown_api_version(emulator: Emulator) -> None:
    r = await kv(emulator, "GET", "/secrets/api", api=None)
    assert r.status_code == 400 and error(r)["code"] == "BadParameter" and "api-version" in error(r)["message"]
    r = await kv(emulator, "GET", "/secrets/api", api="9.9")
    assert r.status_code == 400 and error(r) == {
        "code": "BadParameter",
        "message": "The specified version (9.9) is not recognized. Consider using the latest supported version (2026-04-01).",
    }


async def test_not_found_codes_and_messages(emulator: Emulator) -> None:
    emulator.set_secret("demo", "exists", "x")
    r = await kv(emulator, "GET", "/secrets/missing")
    assert r.status_code == 404 and error(r)["code"] == "SecretNotFound"
    assert error(r)["message"].startswith("A secret with (name/id) missing was not found in this key vault.")
    r = await kv(emulator, "GET", "/secrets/exists/0123456789abcdef0123456789abcdef")
    assert r.status_code == 404 and "exists/0123456789abcdef0123456789abcdef" in error(r)["message"]
    r = await kv(emulator, "GET", "/keys/missing")
    assert r.status_code == 404 and error(r)["code"] == "KeyNotFound"
    r = await kv(emulator, "GET", "/certificates/missing")
    assert (r.status_code, error(r)) == (404, {"code": "CertificateNotFound", "message": "Certificate not found: missing"})


async def test_paging_with_absolute_next_links(emulator: Emulator) -> None:
    names = {f"p{i}" for i in range(5)}
    for n in names:
        emulator.set_secret("demo", n, "secret-value-" + n)
    seen: list[str] = []
    url: str | None = emulator.vault_url("demo") + f"secrets?api-version={API}&maxresults=2"
    links = []
    async with httpx.AsyncClient(verify=tls(emulator), headers={"Authorization": f"Bearer {token(emulator)}"}) as c:
        while url:
            body = (await c.get(url)).json()
            assert "secret-value" not in json.dumps(body)
            seen += [item["id"].rsplit("/", 1)[1] for item in body["value"]]
            url = body["nextLink"]
            links.append(url)
    assert sorted(seen) == sorted(names)
    assert links[-1] is None and len(links) == 3
    first = links[0]
    assert first.startswith(f"https://demo.vault.localhost:{emulator.https_port}/secrets?api-version={API}&$skiptoken=")
    assert first.endswith("&maxresults=2")


async def test_version_listing_and_bad_maxresults(emulator: Emulator) -> None:
    versions = [emulator.set_secret("demo", "many", f"v{i}") for i in range(3)]
    body = (await kv(emulator, "GET", "/secrets/many/versions")).json()
    assert [i["id"].rsplit("/", 1)[1] for i in body["value"]] == versions
    assert body["nextLink"] is None and all("value" not in i for i in body["value"])
    for bad in ("0", "26", "abc"):
        r = await kv(emulator, "GET", "/secrets", params={"maxresults": bad})
        assert r.status_code == 400 and error(r)["code"] == "BadParameter"
    r = await kv(emulator, "GET", "/secrets", params={"$skiptoken": "!!!"})
    assert r.status_code == 400


async def test_empty_pages_still_carry_a_next_link(emulator: Emulator) -> None:
    emulator.set_secret("demo", "only", "x")
    emulator.faults.empty_pages(1)
    body = (await kv(emulator, "GET", "/secrets")).json()
    assert body["value"] == [] and body["nextLink"]
    async with httpx.AsyncClient(verify=tls(emulator)) as c:
        nxt = (await c.get(body["nextLink"], headers={"Authorization": f"Bearer {token(emulator)}"})).json()
    assert [i["id"].rsplit("/", 1)[1] for i in nxt["value"]] == ["only"]


async def test_disabled_secret_and_rbac_forbidden(emulator: Emulator) -> None:
    emulator.set_secret("demo", "off", "x", enabled=False)
    r = await kv(emulator, "GET", "/secrets/off")
    assert r.status_code == 403 and error(r) == {
        "code": "Forbidden",
        "message": "Operation get is not allowed on a disabled secret.",
        "innererror": {"code": "SecretDisabled"},
    }
    stranger = emulator.identity.add_app()
    r = await kv(emulator, "GET", "/secrets/off", auth=f"Bearer {token(emulator, stranger.client_id)}")
    assert r.status_code == 403 and error(r)["innererror"] == {"code": "ForbiddenByRbac"}
    msg = error(r)["message"]
    assert msg.startswith("Caller is not authorized to perform action on resource.\r\n")
    assert f"Caller: appid={stranger.client_id};oid={stranger.object_id};iss=https://sts.windows.net/{emulator.tenant_id}/" in msg
    assert "Action: 'Microsoft.KeyVault/vaults/secrets/getSecret/action'" in msg
    emulator.revoke("demo", emulator.info["app"]["client_id"])
    assert (await kv(emulator, "GET", "/secrets/off")).status_code == 403


async def test_write_routes(emulator: Emulator) -> None:
    r = await kv(emulator, "PUT", "/secrets/written", json={"value": "w", "contentType": "text/plain",
                                                            "attributes": {"exp": 2000000000}})
    assert r.status_code == 200 and r.json()["attributes"]["exp"] == 2000000000
    version = r.json()["id"].rsplit("/", 1)[1]
    r = await kv(emulator, "PATCH", f"/secrets/written/{version}", json={"attributes": {"enabled": False}})
    assert r.status_code == 200 and r.json()["attributes"]["enabled"] is False and "value" not in r.json()
    r = await kv(emulator, "POST", "/keys/k1/create", json={"kty": "EC", "crv": "P-521"})
    jwk = r.json()["key"]
    assert r.status_code == 200 and jwk["kty"] == "EC" and jwk["crv"] == "P-521" and jwk["key_ops"] == ["sign", "verify"]
    assert len(pki.b64url_decode(jwk["x"])) == 66 and "=" not in jwk["x"] and "d" not in jwk
    r = await kv(emulator, "POST", "/keys/k2/create", json={"kty": "RSA-HSM", "key_size": 3072})
    assert r.json()["key"]["kty"] == "RSA-HSM" and r.json()["key"]["e"] == "AQAB"
    assert len(pki.b64url_decode(r.json()["key"]["n"])) == 384


async def test_certificate_bundle_and_out_content_type(emulator: Emulator) -> None:
    material = pki.generate_cert_material("CN=conv", kty="EC", chained=True)
    pfx = pki.PKCS12
    import base64

    r = await kv(emulator, "POST", "/certificates/conv/import",
                 json={"value": material.secret_value(pfx), "policy": {"secret_props": {"contentType": pfx}}})
    assert r.status_code == 200
    cert = r.json()
    version = cert["id"].rsplit("/", 1)[1]
    assert cert["kid"].endswith(f"/keys/conv/{version}") and cert["sid"].endswith(f"/secrets/conv/{version}")
    assert base64.b64decode(cert["cer"]) == material.der and cert["x5t"] == material.x5t
    assert cert["attributes"]["exp"] == int(material.leaf.not_valid_after_utc.timestamp())
    assert cert["policy"]["secret_props"] == {"contentType": pfx}
    r = await kv(emulator, "GET", "/secrets/conv", api="2025-07-01", params={"outContentType": pki.PEM})
    assert r.status_code == 200 and r.json()["value"].startswith("-----BEGIN PRIVATE KEY-----")
    assert r.json()["contentType"] == pki.PEM
    r = await kv(emulator, "GET", "/secrets/conv", api="7.4", params={"outContentType": pki.PEM})
    assert r.status_code == 400
    emulator.set_enabled("demo", "cert", "conv", None, False)
    r = await kv(emulator, "GET", f"/secrets/conv/{version}")
    assert r.status_code == 403  # disabling a certificate disables its secret too
    key = (await kv(emulator, "GET", "/keys/conv")).json()
    assert key.get("managed") is True or key["error"]["innererror"]["code"] == "KeyDisabled"


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("PUT", "/secrets/bad", {"content": b"{not json"}, 400, "BadParameter"),
        ("PUT", "/secrets/bad", {"content": b"[1,2]"}, 400, "BadParameter"),
        ("PUT", "/secrets/bad", {"json": {"value": 5}}, 400, "BadParameter"),
        ("PUT", "/secrets/bad", {"json": {"value": "x" * 30000}}, 400, "BadParameter"),
        ("PUT", "/secrets/bad", {"content": b"x" * (1024 * 1024 + 1)}, 413, "RequestEntityTooLarge"),
        ("PUT", "/secrets/bad_name!", {"json": {"value": "x"}}, 400, "BadParameter"),
        ("POST", "/keys/k/create", {"json": {"kty": "oct"}}, 400, "BadParameter"),
        ("PUT", "/keys/k", {"json": {"key": {"kty": "RSA", "n": "AQAB"}}}, 400, "BadParameter"),
        ("POST", "/certificates/c/import", {"json": {"value": "bm90IGEgcGZ4"}}, 400, "BadParameter"),
        ("GET", "/nothing/here", {}, 404, "NotFound"),
        ("DELETE", "/secrets/x", {}, 405, "MethodNotAllowed"),
        ("PUT", "/secrets/bad", {"json": {"value": "x", "attributes": {"enabled": "yes"}}}, 400, "BadParameter"),
    ],
)
async def test_malformed_input_gets_key_vault_errors(
    emulator: Emulator, method: str, path: str, kwargs: dict[str, Any], status: int, code: str
) -> None:
    r = await kv(emulator, method, path, **kwargs)
    assert r.status_code == status
    assert error(r)["code"] == code and error(r)["message"]
    emulator.set_secret("demo", "alive", "yes")
    assert (await kv(emulator, "GET", "/secrets/alive")).json()["value"] == "yes"


async def test_unknown_vault_and_host_case(emulator: Emulator) -> None:
    emulator.set_secret("demo", "cased", "c")
    r = await kv(emulator, "GET", "/secrets/cased", headers={"Host": f"DEMO.Vault.Localhost:{emulator.https_port}"})
    assert r.status_code == 200
    r = await kv(emulator, "GET", "/secrets/cased", headers={"Host": f"nope.vault.localhost:{emulator.https_port}"})
    assert r.status_code == 404 and error(r)["code"] == "VaultNotFound"


async def test_injected_faults_over_the_wire(emulator: Emulator) -> None:
    emulator.set_secret("demo", "f", "v")
    emulator.faults.throttle(1, retry_after=7)
    r = await kv(emulator, "GET", "/secrets/f")
    assert r.status_code == 429 and r.headers["retry-after"] == "7" and error(r)["code"] == "Throttled"
    assert "VaultRequestTypeLimitReached" in error(r)["message"]
    emulator.faults.throttle(1)
    r = await kv(emulator, "GET", "/secrets/f")
    assert r.status_code == 429 and "retry-after" not in r.headers
    emulator.faults.fail(500, 1)
    r = await kv(emulator, "GET", "/secrets/f")
    assert r.status_code == 500 and error(r)["code"] == "InternalServerError"
    emulator.faults.drop(1)
    with pytest.raises(httpx.RemoteProtocolError):
        await kv(emulator, "GET", "/secrets/f")
    assert (await kv(emulator, "GET", "/secrets/f")).status_code == 200


async def test_counts_by_vault_route_and_client(emulator: Emulator) -> None:
    emulator.set_secret("demo", "c", "v")
    emulator.reset_counts()
    await kv(emulator, "GET", "/secrets/c")
    await kv(emulator, "GET", "/secrets/c")
    await kv(emulator, "GET", "/secrets")
    await kv(emulator, "GET", "/secrets/c", auth=None)
    app = emulator.info["app"]["client_id"]
    assert emulator.count(vault="demo", route="get_secret", client_id=app) == 2
    assert emulator.count(route="get_secret") == 3
    assert emulator.count(route="list_secrets") == 1
    assert emulator.count(vault="other") == 0


async def test_secret_values_and_tokens_stay_out_of_logs(emulator: Emulator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    emulator.set_secret("demo", "quiet", "do-not-log-me-123")
    tok = token(emulator)
    await kv(emulator, "GET", "/secrets/quiet", auth=f"Bearer {tok}")
    await kv(emulator, "GET", "/secrets/quiet", auth="Bearer " + tok[:-5] + "xxxxx")
    assert "do-not-log-me-123" not in caplog.text and tok not in caplog.text
    assert "do-not-log-me-123" not in repr(emulator.store.get("demo", "secret", "quiet"))


async def test_holds_200_concurrent_connections(emulator: Emulator) -> None:
    """200 TLS connections are all open at once before any of them sends its request."""
    emulator.set_secret("demo", "conc", "v")
    ctx = tls(emulator)
    host = f"demo.vault.localhost:{emulator.https_port}"
    request = (f"GET /secrets/conc?api-version={API} HTTP/1.1\r\nHost: {host}\r\n"
               f"Authorization: Bearer {token(emulator)}\r\nConnection: close\r\n\r\n").encode()
    all_open = trio.Event()
    opened = 0
    statuses: list[bytes] = []

    async def one() -> None:
        nonlocal opened
        tcp = await trio.open_tcp_stream("127.0.0.1", emulator.https_port)
        stream = trio.SSLStream(tcp, ctx, server_hostname="demo.vault.localhost", https_compatible=True)
        await stream.do_handshake()
        opened += 1
        if opened == 200:
            all_open.set()
        await all_open.wait()
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
        statuses.append(data.split(b" ", 2)[1])
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(200):
            nursery.start_soon(one)
    assert statuses == [b"200"] * 200
