"""Where a workload identity's service account token (the client assertion) comes from.

Kubelet rotates projected tokens (default lifetime 1 h): on disk by atomically swapping the
file, in CSI by republishing the volume. Both sources therefore return the *current* token on
every `get()` and never cache one forever.
"""

from __future__ import annotations

import base64
import binascii
import errno as _errno
import json
import logging
import os
import time
from typing import Any

import trio

from kvfs.config.parameters import WORKLOAD_IDENTITY_AUDIENCE
from kvfs.errors import AuthError

log = logging.getLogger(__name__)


class FileTokenSource:
    """Reads the token from a file (AZURE_FEDERATED_TOKEN_FILE), re-reading it when it changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sig: tuple[int, int, int] | None = None
        self._token = ""

    def __repr__(self) -> str:
        return f"FileTokenSource(path={self.path!r})"

    async def get(self) -> str:
        if not self.path:
            raise AuthError(
                "no service account token file: set AZURE_FEDERATED_TOKEN_FILE to the projected"
                " token path (the workload identity webhook injects it) or run under the CSI driver",
                code="token_file_missing",
            )
        try:
            st = os.stat(self.path)
            sig = (st.st_mtime_ns, st.st_size, st.st_ino)
            if sig != self._sig:
                with open(self.path, encoding="utf-8") as fh:
                    token = fh.read().strip()
                self._sig, self._token = sig, token
                log.debug("read service account token file %s (%d bytes)", self.path, len(token))
        except FileNotFoundError:
            raise AuthError(
                f"service account token file {self.path!r} does not exist: check"
                " AZURE_FEDERATED_TOKEN_FILE and that the projected token volume is mounted",
                code="token_file_missing",
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise AuthError(
                f"cannot read service account token file {self.path!r}: {reason}"
                " (check its permissions for the kvfs user)",
                code="token_file_unreadable",
            ) from None
        if not self._token:
            raise AuthError(
                f"service account token file {self.path!r} is empty: kubelet has not written the"
                " projected token yet, or AZURE_FEDERATED_TOKEN_FILE names the wrong file",
                code="token_file_empty",
            )
        return self._token


def unverified_claims(token: str) -> dict[str, Any]:
    """A JWT's claims, not verified (only Entra ID verifies them): {} when they cannot be read.

    For an expiry check and error messages. By hand rather than PyJWT, whose import pulls in
    `cryptography`: a mount of plain secrets then starts ~20 ms sooner (README, Performance).
    """
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return {}
    return claims if isinstance(claims, dict) else {}


def _expired(token: str, now: float) -> bool:
    """True when the token's `exp` claim has passed; tokens without a readable exp never expire here."""
    exp = unverified_claims(token).get("exp")
    return isinstance(exp, (int, float)) and exp <= now


class PushedTokenSource:
    """Holds the token from the CSI request; `push()` swaps in the one a republish brings.

    An expired assertion would only earn AADSTS700024 from Entra, so `get()` waits (bounded)
    for kubelet's next push instead.
    """

    def __init__(self, initial: str, *, wait_for_push: float = 30.0) -> None:
        self._token = initial.strip()
        self._wait = wait_for_push
        self._pushed = trio.Event()

    def __repr__(self) -> str:
        return "PushedTokenSource(<redacted>)"

    def push(self, token: str) -> None:
        token = token.strip()
        if not token:
            log.warning("ignoring an empty service account token push")
            return
        self._token = token
        event, self._pushed = self._pushed, trio.Event()
        event.set()

    async def get(self) -> str:
        with trio.move_on_after(self._wait):
            while _expired(self._token, time.time()):
                log.info("service account token expired; waiting up to %gs for a republish", self._wait)
                await self._pushed.wait()
            if not self._token:
                raise AuthError(
                    "no service account token in the CSI request (tokenRequests for audience"
                    f" {WORKLOAD_IDENTITY_AUDIENCE} missing in the CSIDriver object?)",
                    code="sa_token_missing",
                )
            return self._token
        raise AuthError(
            "service account token expired; waiting for kubelet to republish"
            " (the CSIDriver needs requiresRepublish: true so kubelet sends fresh tokens)",
            code="sa_token_expired",
            errno=_errno.EACCES,
        )
