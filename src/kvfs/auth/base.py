"""The credential seam: anything that can produce a Key Vault access token.

Expiry is kept in trio's clock (`trio.current_time()`), converted once when a token arrives,
so refresh-ahead logic runs under `trio.testing.MockClock` in tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class AccessToken:
    token: str = field(repr=False)
    expires_at: float  # trio.current_time() deadline
    issuer: str = ""  # who answered it, for messages: "Entra ID at https://login.microsoftonline.com"


class Credential(Protocol):
    """Gets tokens for a scope such as ``https://vault.azure.net/.default``.

    Raises `kvfs.errors.AuthError` (safe message, Entra/IMDS error code, errno).
    """

    async def get_token(self, scope: str) -> AccessToken: ...

    async def aclose(self) -> None: ...


class TokenSource(Protocol):
    """Where a workload identity's service account token comes from (file or CSI republish)."""

    async def get(self) -> str: ...
