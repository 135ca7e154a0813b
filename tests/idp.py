"""Shared setup for the emulator's identity tests: one tenant, its endpoints, and a fast IdentityProvider.

Import from tests as `import idp` / `from idp import ...` (tests/ is on sys.path through pyproject.toml).
"""

from __future__ import annotations

import itertools

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from kvfs.emulator import oidc
from kvfs.emulator.identity import IdentityProvider

AUTH = "https://localhost:8443"
TENANT = "5b2f3c1e-7d4a-4c8e-9f10-2a3b4c5d6e7f"
KV = "https://vault.localhost:8443"
SCOPE = KV + "/.default"
ISSUER = "https://localhost:8443/oidc"
TOKEN_PATH = f"/{TENANT}/oauth2/v2.0/token"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

# Pre-generated keys keep the suite fast; each provider still gets distinct keys from its neighbours.
_KEYS = itertools.cycle([rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(4)])


def make_provider(monkeypatch: pytest.MonkeyPatch, tenant: str = TENANT) -> IdentityProvider:
    """An IdentityProvider for `tenant` whose signing keys come from the pre-generated pool."""
    monkeypatch.setattr(oidc, "_new_rsa_key", lambda: next(_KEYS))
    return IdentityProvider(authority_host=AUTH, tenant_id=tenant, kv_resource=KV, oidc_issuer=ISSUER)
