"""Fixtures of the emulator's identity tests: a provider and an httpx client on its HTTPS routes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette

from idp import AUTH, make_provider
from kvfs.emulator.identity import IdentityProvider


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch) -> IdentityProvider:
    return make_provider(monkeypatch)


@pytest.fixture
async def client(provider: IdentityProvider) -> AsyncIterator[httpx.AsyncClient]:
    app = Starlette(routes=provider.https_routes())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=AUTH) as c:
        yield c
