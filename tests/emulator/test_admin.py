"""The admin API needs its bearer token and lives on HTTPS only; foreign Host headers are refused."""

from __future__ import annotations

import httpx
import pytest

from kvfs.emulator.server import Emulator, host_allowed
from emulator.test_vault_api import kv, tls


async def test_admin_endpoints(emulator: Emulator) -> None:
    async with httpx.AsyncClient(
        verify=tls(emulator), base_url=emulator.admin_url + "/", headers=emulator.admin_headers()
    ) as c:
        assert (await c.get("info")).json() == emulator.info
        r = await c.post("secrets", json={"vault": "demo", "name": "adm", "value": "from-admin"})
        version = r.json()["version"]
        assert (await kv(emulator, "GET", f"/secrets/adm/{version}")).json()["value"] == "from-admin"
        await c.post("faults", json={"throttle": {"n": 1, "retry_after": 2}})
        assert (await c.get("faults")).json()["throttle"] == {"remaining": 1, "retry_after": 2.0}
        assert (await kv(emulator, "GET", "/secrets/adm")).status_code == 429
        counts = (await c.get("counts", params={"route": "get_secret"})).json()
        assert counts["count"] == 2
        await c.post("enabled", json={"vault": "demo", "kind": "secret", "name": "adm", "enabled": False})
        assert (await kv(emulator, "GET", "/secrets/adm")).status_code == 403
        await c.post("counts/reset")
        assert emulator.count() == 0
        r = await c.post("faults", content=b"{oops")
        assert r.status_code == 400 and r.json()["error"]["code"] == "BadParameter"
        before = emulator.sa_token_file.read_text()
        r = await c.post("sa-token")
        assert r.json() == {"sa_token_file": str(emulator.sa_token_file)}
        assert emulator.sa_token_file.read_text() != before


@pytest.mark.parametrize(
    "auth",
    [None, "Bearer", "Bearer wrong-token", "Basic {token}", "Bearer {token}x", "Bearer {short}"],
    ids=["none", "empty", "wrong", "basic-scheme", "longer", "prefix"],
)
async def test_admin_without_the_token_is_401(emulator: Emulator, auth: str | None) -> None:
    headers = {} if auth is None else {
        "Authorization": auth.format(token=emulator.admin_token, short=emulator.admin_token[:-1])
    }
    async with httpx.AsyncClient(verify=tls(emulator), base_url=emulator.admin_url + "/") as c:
        r = await c.get("info", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        message = r.json()["error"]["message"]
        assert str(emulator.admin_token_file) in message and "Authorization: Bearer" in message
        assert emulator.admin_token not in r.text and emulator.info["app"]["client_secret"] not in r.text
        r = await c.post("secrets", headers=headers, json={"vault": "demo", "name": "sneaky", "value": "x"})
        assert r.status_code == 401
        assert emulator.store.find("demo") is not None
        assert not emulator.store.histories("demo", "secret"), "a refused admin call changed nothing"
        assert (await c.get("info", headers=emulator.admin_headers())).status_code == 200


def test_admin_token_is_in_its_file_and_emulator_json(emulator_thread: Emulator) -> None:
    emu = emulator_thread
    assert emu.admin_token_file == emu.dir / "admin-token"
    assert emu.admin_token_file.read_text() == emu.admin_token and len(emu.admin_token) >= 40
    assert emu.info["admin_token_file"] == str(emu.admin_token_file) and emu.info["admin_token"] == emu.admin_token


async def test_admin_is_not_served_on_the_plain_http_port(emulator: Emulator) -> None:
    async with httpx.AsyncClient() as plain:
        r = await plain.get(f"{emulator.imds_url}/_emulator/info", headers=emulator.admin_headers())
        assert r.status_code == 404 and emulator.tenant_id not in r.text
        r = await plain.post(f"{emulator.imds_url}/_emulator/secrets", headers=emulator.admin_headers(),
                             json={"vault": "demo", "name": "plain", "value": "x"})
        assert r.status_code == 404 and not emulator.store.histories("demo", "secret")


@pytest.mark.parametrize("host", ["evil.example", "evil.example:443", "localhost.evil.example", "127.0.0.1.nip.io", ""])
async def test_a_foreign_host_is_refused_on_both_ports(emulator: Emulator, host: str) -> None:
    """DNS rebinding: a web page whose name resolves to 127.0.0.1 sends its own name as Host."""
    emulator.set_secret("demo", "s", "secret-value")
    headers = {"Host": host, **emulator.admin_headers()}
    client_id = emulator.info["app"]["client_id"]
    async with httpx.AsyncClient(verify=tls(emulator)) as c:
        answers = [
            await c.get(f"{emulator.admin_url}/info", headers=headers),
            await c.get(f"{emulator.vault_url('demo')}secrets/s?api-version=7.4",
                        headers={"Host": host, "Authorization": f"Bearer {emulator.identity.mint_access_token(client_id)}"}),
            await c.post(f"{emulator.authority_host}/{emulator.tenant_id}/oauth2/v2.0/token", headers={"Host": host},
                         data={"grant_type": "client_credentials", "client_id": client_id,
                               "client_secret": emulator.info["app"]["client_secret"],
                               "scope": emulator.kv_resource + "/.default"}),
            await c.get(f"{emulator.imds_url}/metadata/identity/oauth2/token",
                        params={"api-version": "2018-02-01", "resource": emulator.kv_resource},
                        headers={"Host": host, "Metadata": "true"}),
        ]
    for r in answers:
        assert r.status_code == 421, (r.request.url, r.text)
        assert r.json()["error"]["code"] == "MisdirectedRequest"
        assert "secret-value" not in r.text and "access_token" not in r.text and emulator.tenant_id not in r.text


@pytest.mark.parametrize("host", [
    "localhost", "LOCALHOST:8443", "127.0.0.1", "127.0.0.1:1234", "[::1]", "[::1]:443", "vault.localhost",
    "demo.vault.localhost:8443", "Other.Vault.Localhost.", "127.0.0.2",
])
def test_loopback_and_vault_names_are_served(host: str) -> None:
    assert host_allowed(host, "127.0.0.1")


@pytest.mark.parametrize("host", ["evil.example", "other.localhost", "10.0.0.5", "", "[::2]", "vault.localhost.evil"])
def test_other_names_are_refused(host: str) -> None:
    assert not host_allowed(host, "127.0.0.1")


def test_a_non_loopback_listen_address_is_served_literally() -> None:
    assert host_allowed("10.0.0.5:8443", "10.0.0.5") and host_allowed("[fd00::5]:1", "fd00::5")
    assert not host_allowed("10.0.0.6", "10.0.0.5")


async def test_served_names_answer(emulator: Emulator) -> None:
    """The names clients really use keep working: authority by IP and name, vault by name."""
    async with httpx.AsyncClient(verify=tls(emulator)) as c:
        for host in (f"localhost:{emulator.https_port}", "localhost"):
            r = await c.get(f"{emulator.admin_url}/info", headers={"Host": host, **emulator.admin_headers()})
            assert r.status_code == 200 and r.json()["tenant_id"] == emulator.tenant_id
    async with httpx.AsyncClient() as plain:
        r = await plain.get(f"{emulator.imds_url}/metadata/identity/oauth2/token",
                            params={"api-version": "2018-02-01", "resource": emulator.kv_resource},
                            headers={"Metadata": "true"})
        assert r.status_code == 200 and "access_token" in r.json()
