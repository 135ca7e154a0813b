"""What the emulator keeps in DIR: every object and identity across a restart, private files, --fresh."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from emulator.test_vault_api import kv, tls
from kvfs.emulator import pki
from kvfs.emulator.server import Emulator, open_emulator

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
PLANTED = "planted-s3cret-value"


async def _client_token(emu: Emulator, **form: str) -> httpx.Response:
    async with httpx.AsyncClient(verify=tls(emu)) as c:
        return await c.post(
            f"{emu.authority_host}/{emu.tenant_id}/oauth2/v2.0/token",
            data={"grant_type": "client_credentials", "client_id": emu.info["app"]["client_id"],
                  "scope": emu.kv_resource + "/.default", **form},
        )


async def _everything(emu: Emulator) -> dict[str, Any]:
    """Every version of every object of every vault as the REST API shows it (lists and GETs)."""
    out: dict[str, Any] = {}
    for vault in emu.store.names():
        for noun in ("secrets", "keys", "certificates"):
            listing = (await kv(emu, "GET", f"/{noun}", vault=vault)).json()
            out[f"{vault}/{noun}"] = listing
            for item in listing["value"]:
                name = (item.get("id") or item["kid"]).rsplit("/", 1)[1]
                versions = (await kv(emu, "GET", f"/{noun}/{name}/versions", vault=vault)).json()
                out[f"{vault}/{noun}/{name}"] = versions
                for v in versions["value"]:
                    version = (v.get("id") or v["kid"]).rsplit("/", 1)[1]
                    r = await kv(emu, "GET", f"/{noun}/{name}/{version}", vault=vault)
                    out[f"{vault}/{noun}/{name}/{version}"] = (r.status_code, r.json())
    return out


async def test_a_restart_keeps_tenant_keys_ports_tokens_and_every_object(tmp_path: Path) -> None:
    folder = tmp_path / "emu"
    material = pki.generate_cert_material("CN=web", kty="EC", chained=True)
    async with open_emulator(folder, vaults=("demo", "second")) as emu:
        emu.set_secret("demo", "Mixed-Case", "v1", content_type="text/plain", tags={"env": "dev"})
        emu.set_secret("demo", "Mixed-Case", "v2")
        emu.set_enabled("demo", "secret", "Mixed-Case", None, False)
        key_version = emu.import_key("demo", "signing", pki.generate_key("EC"), hsm=True)
        r = await kv(emu, "PATCH", f"/keys/signing/{key_version}", json={"key_ops": ["sign"], "tags": {"t": "1"}})
        assert r.status_code == 200
        emu.import_certificate("demo", "web", pem=material.secret_value(pki.PEM).encode())
        emu.import_certificate("second", "web-pfx", pfx=base64.b64decode(material.secret_value(pki.PKCS12)))
        emu.grant("second", "11111111-2222-3333-4444-555555555555")
        emu.revoke("second", emu.info["managed_identity"]["client_id"])
        before = await _everything(emu)
        info = dict(emu.info)
        access_token = (await _client_token(emu, client_secret=emu.info["app"]["client_secret"])).json()["access_token"]
        sa_token = emu.sa_token_file.read_text()
        files = {n: (folder / n).read_bytes() for n in ("ca.pem", "ca-key.pem", "server.pem", "server-key.pem", "admin-token")}
    assert not (folder / "emulator.json").exists()

    async with open_emulator(folder, vaults=("demo",)) as emu:
        assert {k: v for k, v in emu.info.items() if k != "pid"} == {k: v for k, v in info.items() if k != "pid"}
        assert await _everything(emu) == before
        assert emu.store.is_granted("second", "11111111-2222-3333-4444-555555555555")
        assert not emu.store.is_granted("second", emu.info["managed_identity"]["client_id"])
        # a token issued before the restart still reads; a service account token still signs in
        r = await kv(emu, "GET", "/secrets/mixed-case", auth=f"Bearer {access_token}")
        assert r.status_code == 403 and r.json()["error"]["innererror"]["code"] == "SecretDisabled"
        r = await _client_token(emu, client_assertion=sa_token, client_assertion_type=JWT_BEARER)
        assert r.status_code == 200, r.text
        assert {n: (folder / n).read_bytes() for n in files} == files
        assert emu.identity.default_managed_identity.client_id == info["managed_identity"]["client_id"]


async def test_a_new_vault_on_restart_gets_the_seed_and_a_cert_that_names_it(tmp_path: Path) -> None:
    folder = tmp_path / "emu"
    seed = {"vaults": {"demo": {"secrets": [{"name": "s", "value": "seeded"}]}}}
    async with open_emulator(folder, seed=seed) as emu:
        emu.set_secret("demo", "s", "changed")
        ca = emu.ca_file.read_bytes()
    seed["vaults"]["later"] = {"secrets": [{"name": "t", "value": "later-seed"}]}
    async with open_emulator(folder, seed=seed) as emu:
        assert (await kv(emu, "GET", "/secrets/s")).json()["value"] == "changed"  # the saved content wins
        assert len(emu.store.versions("demo", "secret", "s")) == 2
        assert (await kv(emu, "GET", "/secrets/t", vault="later")).json()["value"] == "later-seed"
        assert emu.ca_file.read_bytes() == ca
        assert pki.serves(emu.dir.joinpath("server.pem").read_bytes(), ["later.vault.localhost"])


async def test_fresh_starts_over(tmp_path: Path) -> None:
    folder = tmp_path / "emu"
    async with open_emulator(folder) as emu:
        emu.set_secret("demo", "s", "v")
        tenant, token, ca = emu.tenant_id, emu.admin_token, emu.ca_file.read_bytes()
    async with open_emulator(folder, fresh=True) as emu:
        assert emu.tenant_id != tenant and emu.admin_token != token and emu.ca_file.read_bytes() != ca
        assert (await kv(emu, "GET", "/secrets/s")).status_code == 404


async def test_a_fresh_folder_per_test_stays_fresh(tmp_path: Path) -> None:
    async with open_emulator(tmp_path / "a") as a, open_emulator(tmp_path / "b") as b:
        assert a.tenant_id != b.tenant_id and a.https_port != b.https_port


async def test_the_journal_holds_every_change_and_a_restart_compacts_it(tmp_path: Path) -> None:
    folder = tmp_path / "emu"
    journal = folder / "vaults.jsonl"
    async with open_emulator(folder) as emu:
        start = len(journal.read_text().splitlines())
        for i in range(300):
            emu.set_secret("demo", "rotated", f"value-{i}")
            assert len(journal.read_text().splitlines()) == start + i + 1
        emu.set_enabled("demo", "secret", "rotated", None, False)
        assert json.loads(journal.read_text().splitlines()[-1])["v"]["attributes"]["enabled"] is False
    async with open_emulator(folder) as emu:
        assert len(emu.store.versions("demo", "secret", "rotated")) == 300
        assert not emu.store.get("demo", "secret", "rotated").attributes.enabled
        assert len(journal.read_text().splitlines()) == start + 300, "one line per version after compaction"
        assert stat.S_IMODE(os.stat(journal).st_mode) == 0o600


async def test_a_change_cut_short_by_a_kill_is_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "emu"
    async with open_emulator(folder) as emu:
        emu.set_secret("demo", "whole", "v")
    with open(folder / "vaults.jsonl", "ab") as journal:
        journal.write(b'{"vault":"demo","kind":"secret","name":"torn","v":{"version":"ab')
    async with open_emulator(folder) as emu:
        assert (await kv(emu, "GET", "/secrets/whole")).json()["value"] == "v"
        assert (await kv(emu, "GET", "/secrets/torn")).status_code == 404
    assert "the last change was cut short" in caplog.text
