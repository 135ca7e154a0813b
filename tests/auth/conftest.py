"""Fixtures for the auth tests: a jumping MockClock, SA-token-shaped JWTs, Entra error bodies, a fixed TokenSource.

Import helpers as `from auth.conftest import StaticSource` (tests/ is on sys.path).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
import trio.testing

ISSUER = "https://oidc.prod-aks.azure.com/abc/"
SUBJECT = "system:serviceaccount:demo:workload-sa"
AUDIENCE = "api://AzureADTokenExchange"


class StaticSource:
    """A TokenSource that always hands out the same assertion (no expiry wait, unlike PushedTokenSource)."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def get(self) -> str:
        return self.token


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """Time jumps whenever every task waits: backoff and expiry run instantly."""
    return trio.testing.MockClock(autojump_threshold=0)


def _sa_token(exp_in: float = 3600.0, **extra: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER, "sub": SUBJECT, "aud": [AUDIENCE], "iat": now, "exp": int(now + exp_in),
    }
    claims.update(extra)
    return jwt.encode(claims, "test-signing-key-that-is-long-enough-32b", algorithm="HS256")


def _entra_body(code: int, error: str, text: str) -> dict[str, Any]:
    return {
        "error": error,
        "error_description": f"AADSTS{code}: {text}\r\nTrace ID: 0e7e1c7a-aaaa\r\n"
        "Correlation ID: 5d3c-bbbb\r\nTimestamp: 2026-06-11 10:00:00Z",
        "error_codes": [code],
        "timestamp": "2026-06-11 10:00:00Z",
        "trace_id": "0e7e1c7a-aaaa",
        "correlation_id": "5d3c-bbbb",
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    }


@pytest.fixture
def sa_token() -> Callable[..., str]:
    """Factory: a JWT with SA-token claims (iss/sub/aud/iat/exp); only its claims matter to kvfs."""
    return _sa_token


@pytest.fixture
def entra_body() -> Callable[[int, str, str], dict[str, Any]]:
    """Factory: an Entra ID error body as Entra sends it (error, error_description, error_codes, ...)."""
    return _entra_body
