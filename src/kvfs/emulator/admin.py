"""The admin API, `https://localhost:P/_emulator/...`: info, counters, faults, content, grants.

It hands out the app's client secret and changes what the vaults hold, so every request needs
`Authorization: Bearer <token>` with the token from DIR/admin-token (compared in constant time).
It is served on the HTTPS port only.
"""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope, Send

from .vault_api import ApiError, read_body, send_json

if TYPE_CHECKING:
    from .server import Emulator

PREFIX = "/_emulator/"


class Admin:
    """ASGI app for `/_emulator/...` (the caller routes by path)."""

    def __init__(self, emu: Emulator) -> None:
        self.emu = emu

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.strip().partition(" ")
        expected = self.emu.admin_token.encode()
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        extra: dict[str, str] = {}
        try:
            body = await read_body(receive, headers)
            if not self._authorized(headers.get("authorization", "")):
                extra = {"WWW-Authenticate": 'Bearer realm="kvfs-emulator-admin"'}
                raise ApiError(
                    401, "Unauthorized",
                    "The emulator's admin API needs the header 'Authorization: Bearer <token>'; the token is in "
                    f"{self.emu.admin_token_file} (also admin_token in {self.emu.dir / 'emulator.json'}).",
                )
            status, payload = self._route(scope["method"].upper(), scope["path"], scope, body)
        except ApiError as err:
            status, payload = err.status, err.body()
        except (ValueError, KeyError, TypeError) as err:
            status, payload = 400, ApiError(400, "BadParameter", f"Bad admin request: {err}").body()
        except Exception:  # noqa: BLE001 - only a closed connection gets here
            return
        await send_json(send, status, payload, extra)

    def _route(self, method: str, path: str, scope: Scope, raw: bytes) -> tuple[int, dict[str, Any]]:
        emu = self.emu
        body: dict[str, Any] = json.loads(raw) if raw.strip() else {}
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        path = path.rstrip("/")
        if (method, path) == ("GET", "/_emulator/info"):
            return 200, emu.info
        if (method, path) == ("GET", "/_emulator/counts"):
            q = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            n = emu.count(q.get("vault"), q.get("route"), q.get("client_id"))
            return 200, {"count": n, "entries": emu.counts.snapshot()}
        if (method, path) == ("POST", "/_emulator/counts/reset"):
            emu.reset_counts()
            return 200, {"count": 0}
        if (method, path) == ("GET", "/_emulator/faults"):
            return 200, emu.faults.state()
        if (method, path) == ("POST", "/_emulator/faults"):
            emu.faults.apply(body)
            return 200, emu.faults.state()
        if (method, path) == ("POST", "/_emulator/secrets"):
            version = emu.set_secret(
                body["vault"], body["name"], str(body["value"]),
                content_type=body.get("content_type"), enabled=bool(body.get("enabled", True)),
            )
            return 200, {"version": version}
        if (method, path) == ("POST", "/_emulator/enabled"):
            emu.set_enabled(body["vault"], body["kind"], body["name"], body.get("version"), bool(body["enabled"]))
            return 200, {"enabled": bool(body["enabled"])}
        if (method, path) == ("POST", "/_emulator/grants"):
            (emu.grant if body.get("granted", True) else emu.revoke)(body["vault"], body["client_id"])
            return 200, {"granted": bool(body.get("granted", True))}
        if (method, path) == ("POST", "/_emulator/sa-token"):
            emu.rotate_sa_token()
            return 200, {"sa_token_file": str(emu.sa_token_file)}
        raise ApiError(404, "NotFound", f"No admin endpoint {method} {path}.")
