"""Fault knobs and counters as units, and injected latency under trio's MockClock (no real sleeps)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio
from starlette.types import Receive, Scope, Send

from kvfs.emulator.faults import Counts, Faults
from kvfs.emulator.identity import IdentityProvider
from kvfs.emulator.vault_api import VaultApi
from kvfs.emulator.vaults import VaultStore

KV = "https://vault.localhost:1"


class _Outage:
    outage = False


def make_api() -> tuple[VaultApi, IdentityProvider, Faults, Counts, VaultStore]:
    identity = IdentityProvider(authority_host="https://localhost:1", tenant_id="t-1", kv_resource=KV,
                                oidc_issuer="https://localhost:1/oidc")
    store, faults, counts = VaultStore(), Faults(identity), Counts()
    store.add_vault("demo", "https://demo.vault.localhost:1")
    store.grant("demo", identity.default_app.client_id)

    async def dropper(scope: Scope) -> None:
        return None

    api = VaultApi(store, identity=identity, faults=faults, counts=counts, authority_host="https://localhost:1",
                   tenant_id="t-1", kv_resource=KV, dropper=dropper)
    return api, identity, faults, counts, store


def asgi(api: VaultApi) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await api.handle("demo", scope, receive, send)

    return app


async def test_latency_is_trio_time(autojump_clock: trio.testing.MockClock) -> None:
    api, identity, faults, _, store = make_api()
    store.set_secret("demo", "s", "v")
    faults.latency(30)
    headers = {"Authorization": f"Bearer {identity.mint_access_token(identity.default_app.client_id)}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi(api)), base_url="https://demo.vault.localhost:1") as c:
        start = trio.current_time()
        r = await c.get("/secrets/s?api-version=7.6", headers=headers)
        assert r.status_code == 200 and r.json()["value"] == "v"
        assert trio.current_time() - start >= 30
        faults.reset()
        start = trio.current_time()
        await c.get("/secrets/s?api-version=7.6", headers=headers)
        assert trio.current_time() - start < 30


def test_faults_are_consumed_in_order() -> None:
    outage = _Outage()
    f = Faults(outage)
    f.throttle(1, retry_after=2.5)
    f.fail(502, 1)
    f.drop(1)
    assert [f.decide().action for _ in range(4)] == ["drop", "fail", "throttle", "none"]
    f.throttle(1, retry_after=2.5)
    d = f.decide()
    assert (d.status, d.retry_after) == (429, 2.5)
    f.entra_outage(True)
    assert outage.outage is True and f.state()["entra_outage"] is True
    f.reset()
    assert outage.outage is False
    with pytest.raises(ValueError, match="not an HTTP error status"):
        f.fail(200, 1)


def test_faults_apply_admin_form() -> None:
    f = Faults(_Outage())
    f.apply({"throttle": {"n": 2}, "latency": 0.5, "empty_pages": 1, "fail": {"status": 500, "n": 1}})
    state = f.state()
    assert state["throttle"] == {"remaining": 2, "retry_after": None}
    assert state["latency"] == 0.5 and state["empty_pages"] == 1 and state["fail"] == {"remaining": 1, "status": 500}
    f.apply({"reset": True})
    assert f.state()["throttle"]["remaining"] == 0


def test_counts_filter_and_case() -> None:
    c = Counts()
    c.add("Demo", "get_secret", "ABC")
    c.add("demo", "get_secret", "abc")
    c.add(None, "token", "abc")
    assert c.count("demo", "get_secret", "abc") == 2
    assert c.count(client_id="abc") == 3 and c.count(route="token") == 1 and c.count(vault="x") == 0
    c.reset()
    assert c.count() == 0
