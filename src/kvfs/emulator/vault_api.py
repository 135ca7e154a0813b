"""The Key Vault data-plane REST API over a `VaultStore`, as an ASGI app routed by vault host.

Order per request: body size cap → route → count → injected faults → api-version → bearer token
(401 challenge) → vault grant (403 ForbiddenByRbac) → handler. Every refusal uses Key Vault's
error envelope and codes; no input can raise out of `__call__`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from starlette.types import Receive, Scope, Send

from . import pki
from .faults import Counts, Faults
from .vaults import (
    CertVersion,
    KeyVersion,
    Kind,
    SecretVersion,
    StoreError,
    Vault,
    VaultStore,
    cert_bundle,
    cert_item,
    cert_policy,
    key_bundle,
    key_item,
    secret_bundle,
    secret_item,
)

log = logging.getLogger(__name__)

API_VERSIONS = frozenset(
    {"2016-10-01", "7.0", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "2025-07-01", "2026-04-01"}
)
LATEST_API = "2026-04-01"
MAX_BODY = 1024 * 1024
DRAIN_MAX = 32 * 1024 * 1024
PAGE_MAX = 25
NAME_RE = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
_SEG = r"(?P<name>[^/]+)"
_VER = r"(?:/(?P<version>[^/]*))?"


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    name: str
    action: str  # the RBAC data action named in 403 messages


def _r(method: str, path: str, name: str, action: str) -> Route:
    return Route(method, re.compile(f"^{path}/?$", re.IGNORECASE), name, action)


_A = "Microsoft.KeyVault/vaults"
ROUTES: tuple[Route, ...] = (
    _r("GET", "/secrets", "list_secrets", f"{_A}/secrets/readMetadata/action"),
    _r("GET", f"/secrets/{_SEG}/versions", "list_secret_versions", f"{_A}/secrets/readMetadata/action"),
    _r("GET", f"/secrets/{_SEG}{_VER}", "get_secret", f"{_A}/secrets/getSecret/action"),
    _r("PUT", f"/secrets/{_SEG}", "set_secret", f"{_A}/secrets/setSecret/action"),
    _r("PATCH", f"/secrets/{_SEG}{_VER}", "update_secret", f"{_A}/secrets/update/action"),
    _r("GET", "/keys", "list_keys", f"{_A}/keys/read"),
    _r("GET", f"/keys/{_SEG}/versions", "list_key_versions", f"{_A}/keys/read"),
    _r("POST", f"/keys/{_SEG}/create", "create_key", f"{_A}/keys/create/action"),
    _r("GET", f"/keys/{_SEG}{_VER}", "get_key", f"{_A}/keys/read"),
    _r("PUT", f"/keys/{_SEG}", "import_key", f"{_A}/keys/import/action"),
    _r("PATCH", f"/keys/{_SEG}{_VER}", "update_key", f"{_A}/keys/update/action"),
    _r("GET", "/certificates", "list_certificates", f"{_A}/certificates/read"),
    _r("GET", f"/certificates/{_SEG}/versions", "list_certificate_versions", f"{_A}/certificates/read"),
    _r("GET", f"/certificates/{_SEG}/policy", "get_certificate_policy", f"{_A}/certificates/read"),
    _r("GET", f"/certificates/{_SEG}/pending", "get_certificate_operation", f"{_A}/certificates/read"),
    _r("POST", f"/certificates/{_SEG}/import", "import_certificate", f"{_A}/certificates/import/action"),
    _r("GET", f"/certificates/{_SEG}{_VER}", "get_certificate", f"{_A}/certificates/read"),
    _r("PATCH", f"/certificates/{_SEG}{_VER}", "update_certificate", f"{_A}/certificates/update/action"),
)
_FAIL_CODES = {
    500: ("InternalServerError", "An unexpected error occurred in the emulated service (injected fault)."),
    502: ("BadGateway", "The gateway received an invalid response (injected fault)."),
    503: ("ServiceUnavailable", "The service is temporarily unavailable (injected fault)."),
    504: ("GatewayTimeout", "The gateway timed out (injected fault)."),
}


class ApiError(Exception):
    """A refusal in Key Vault's envelope."""

    def __init__(
        self, status: int, code: str, message: str, inner: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.inner = inner
        self.headers = headers or {}

    @classmethod
    def from_store(cls, err: StoreError) -> ApiError:
        return cls(err.status, err.code, err.message, err.inner)

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.inner:
            error["innererror"] = {"code": self.inner}
        return {"error": error}


def bad(message: str) -> ApiError:
    return ApiError(400, "BadParameter", message)


Dropper = Callable[[Scope], Awaitable[None]]


@dataclass
class Ctx:
    vault: Vault
    route: Route
    params: dict[str, str]
    query: dict[str, str]
    body: bytes
    api: str


class VaultApi:
    """ASGI app for `https://<vault>.vault.localhost:P/...`; the caller passes the vault name."""

    def __init__(
        self,
        store: VaultStore,
        *,
        identity: Any,
        faults: Faults,
        counts: Counts,
        authority_host: str,
        tenant_id: str,
        kv_resource: str,
        dropper: Dropper,
    ) -> None:
        self.store = store
        self.identity = identity
        self.faults = faults
        self.counts = counts
        self.authority_host = authority_host.rstrip("/")
        self.tenant_id = tenant_id
        self.kv_resource = kv_resource
        self.dropper = dropper

    @property
    def challenge(self) -> str:
        return f'Bearer authorization="{self.authority_host}/{self.tenant_id}", resource="{self.kv_resource}"'

    async def handle(self, vault_name: str, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        extra = {"x-ms-client-request-id": headers["x-ms-client-request-id"]} if "x-ms-client-request-id" in headers else {}
        try:
            status, payload, more = await self._dispatch(vault_name, scope, receive, headers)
        except _Dropped:
            return
        except ApiError as err:
            status, payload, more = err.status, err.body(), err.headers
        except Exception:  # noqa: BLE001 - a bug must not take the server down
            log.exception("unexpected error serving %s %s", scope.get("method"), scope.get("path"))
            status, payload = 500, ApiError(500, "InternalServerError", "Internal emulator error.").body()
            more = {}
        await send_json(send, status, payload, {**extra, **more})

    async def _dispatch(
        self, vault_name: str, scope: Scope, receive: Receive, headers: dict[str, str]
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        method = scope["method"].upper()
        path = scope["path"]
        body = await read_body(receive, headers)
        vault = self.store.find(vault_name)
        if vault is None:
            raise ApiError(404, "VaultNotFound", f"No vault named '{vault_name}' is served by this emulator.")
        route, params, allowed = _match(method, path)
        if route is None:
            if allowed:
                raise ApiError(405, "MethodNotAllowed", f"The requested method {method} is not allowed on {path}.")
            raise ApiError(404, "NotFound", f"The requested resource {path} does not exist.")

        principal, rejection = self._authenticate(headers)
        self.counts.add(vault.name, route.name, principal.client_id if principal else None)

        decision = self.faults.decide(is_list=route.name.startswith("list_"))
        if decision.latency:
            await trio.sleep(decision.latency)
        if decision.action == "drop":
            await self.dropper(scope)
            raise _Dropped()
        if decision.action == "fail":
            code, msg = _FAIL_CODES.get(decision.status, ("Error", "Injected failure."))
            raise ApiError(decision.status, code, msg)
        if decision.action == "throttle":
            more = {}
            if decision.retry_after is not None:
                ra = decision.retry_after
                more["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
            raise ApiError(
                429, "Throttled",
                "Request was not processed because too many requests were received. "
                "Reason: VaultRequestTypeLimitReached",
                headers=more,
            )

        query = _query(scope)
        api = query.get("api-version")
        if api is None:
            raise bad("The api-version query parameter (?api-version=) is required for all requests.")
        if api not in API_VERSIONS:
            raise bad(
                f"The specified version ({api}) is not recognized. "
                f"Consider using the latest supported version ({LATEST_API})."
            )
        if principal is None:
            raise ApiError(401, "Unauthorized", rejection, headers={"WWW-Authenticate": self.challenge})
        if not self.store.is_granted(vault.name, principal.client_id):
            raise ApiError(
                403, "Forbidden", self._rbac_message(principal, route, vault, params), inner="ForbiddenByRbac"
            )
        name = params.get("name")
        if name is not None and not NAME_RE.match(name):
            raise bad(f"The request URI contains an invalid name: {name[:140]}")
        ctx = Ctx(vault, route, params, query, body, api)
        handler = getattr(self, f"_{route.name}")
        try:
            status, payload = handler(ctx, decision.empty_page)
        except StoreError as err:
            raise ApiError.from_store(err) from None
        return status, payload, {}

    def _authenticate(self, headers: dict[str, str]) -> tuple[Any, str]:
        auth = headers.get("authorization", "").strip()
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None, "AKV10000: Request is missing a Bearer or PoP token."
        try:
            return self.identity.verify_access_token(token, audience=self.kv_resource), ""
        except Exception as err:  # noqa: BLE001 - TokenRejected or anything a garbage token causes
            message = getattr(err, "message", None)
            if isinstance(message, str) and message.startswith("AKV"):
                return None, message
            log.info("access token rejected: %s", type(err).__name__)
            return None, "AKV10000: Request is missing a Bearer or PoP token."

    def _rbac_message(self, principal: Any, route: Route, vault: Vault, params: dict[str, str]) -> str:
        coll = route.pattern.pattern.split("/")[1]
        resource = f"/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/kvfs-emulator/providers/microsoft.keyvault/vaults/{vault.name.lower()}"
        if params.get("name"):
            resource += f"/{coll}/{params['name']}"
        return (
            "Caller is not authorized to perform action on resource.\r\n"
            "If role assignments, deny assignments or role definitions were changed recently, "
            "please observe propagation time.\r\n"
            f"Caller: appid={principal.client_id};oid={principal.object_id};"
            f"iss=https://sts.windows.net/{principal.tenant_id}/\r\n"
            f"Action: '{route.action}'\r\n"
            f"Resource: '{resource}'\r\n"
            "Assignment: (not found)\r\nDenyAssignmentId: null\r\nDecisionReason: null \r\n"
            f"Vault: {vault.name};location=emulator\r\n"
        )

    # -- paging -------------------------------------------------------------------------------
    def _page(self, ctx: Ctx, path: str, items: list[dict[str, Any]], empty: bool) -> tuple[int, dict[str, Any]]:
        raw_max = ctx.query.get("maxresults")
        size = PAGE_MAX
        if raw_max is not None:
            try:
                size = int(raw_max)
            except ValueError:
                raise bad(f"Invalid value for maxresults: {raw_max[:40]}. It must be an integer between 1 and {PAGE_MAX}.") from None
            if not 1 <= size <= PAGE_MAX:
                raise bad(f"Invalid value for maxresults: {size}. It must be an integer between 1 and {PAGE_MAX}.")
        offset = _decode_skiptoken(ctx.query["$skiptoken"]) if "$skiptoken" in ctx.query else 0
        if empty:
            page: list[dict[str, Any]] = []
            next_offset: int | None = offset
        else:
            page = items[offset : offset + size]
            next_offset = offset + size if offset + size < len(items) else None
        next_link = None
        if next_offset is not None:
            next_link = f"{ctx.vault.base_url}{path}?api-version={ctx.api}&$skiptoken={_encode_skiptoken(next_offset)}"
            if raw_max is not None:
                next_link += f"&maxresults={size}"
        return 200, {"value": page, "nextLink": next_link}

    def _list_latest(
        self, ctx: Ctx, kind: Kind, cls: type, item: Callable[..., dict[str, Any]], noun: str, empty: bool
    ) -> tuple[int, dict[str, Any]]:
        """One page of the latest version of every object of `kind`, in name order."""
        histories = sorted(self.store.histories(ctx.vault.name, kind), key=lambda h: h.name.lower())
        latest = (h.latest() for h in histories)
        items = [item(ctx.vault, v, versioned=False) for v in latest if isinstance(v, cls)]
        return self._page(ctx, f"/{noun}", items, empty)

    def _list_history(
        self, ctx: Ctx, kind: Kind, cls: type, item: Callable[..., dict[str, Any]], noun: str, empty: bool
    ) -> tuple[int, dict[str, Any]]:
        """One page of every version of the object named in the path."""
        versions = self.store.versions(ctx.vault.name, kind, ctx.params["name"])
        items = [item(ctx.vault, v, versioned=True) for v in versions if isinstance(v, cls)]
        return self._page(ctx, f"/{noun}/{versions[0].name}/versions", items, empty)

    # -- secrets -------------------------------------------------------------------------------
    def _list_secrets(self, ctx: Ctx, empty: bool) -> tuple[int, dict[str, Any]]:
        return self._list_latest(ctx, "secret", SecretVersion, secret_item, "secrets", empty)

    def _list_secret_versions(self, ctx: Ctx, empty: bool) -> tuple[int, dict[str, Any]]:
        return self._list_history(ctx, "secret", SecretVersion, secret_item, "secrets", empty)

    def _get_secret(self, ctx: Ctx, _: bool) -> tuple[int, dict[str, Any]]:
        s = self.store.get(ctx.vault.name, "secret", ctx.params["name"], ctx.params.get("version") or None)
        assert isinstance(s, SecretVersion)
        if not s.attributes.enabled:
            raise ApiError(403, "Forbidden", "Operation get is not allowed on a disabled secret.", inner="SecretDisabled")
        bundle = secret_bundle(ctx.vault, s)
        out_type = ctx.query.get("outContentType")
        if out_type is not None:
            bundle = self._convert(ctx, s, bundle, out_type)
        return 200, bundle

    def _convert(self, ctx: Ctx, s: SecretVersion, bundle: dict[str, Any], out_type: str) -> dict[str, Any]:
        """`outContentType` (api-version ≥ 2025-07-01): only PFX → PEM for certificate secrets."""
        if ctx.api not in ("2025-07-01", "2026-04-01"):
            raise bad(f"The parameter outContentType is not supported in api-version {ctx.api}.")
        if out_type not in (pki.PKCS12, pki.PEM):
            raise bad(f"The specified outContentType ({out_type[:60]}) is not supported.")
        if out_type == s.content_type:
            return bundle
        if not s.managed or out_type != pki.PEM:
            raise bad(f"Conversion from {s.content_type} to {out_type} is not supported.")
        cert = self.store.get(ctx.vault.name, "cert", s.name, s.version)
        assert isinstance(cert, CertVersion)
        bundle["value"] = cert.material.secret_value(pki.PEM)
        bundle["contentType"] = pki.PEM
        return bundle

    def _set_secret(self, ctx: Ctx, _: bool) -> tuple[int, dict[str, Any]]:
        body = _json_object(ctx.body)
        value = body.get("value")
        if not isinstance(value, str):
            raise bad("The parameter 'value' is required and must be a string.")
        attrs = _attrs(body.get("attributes"))
        ctype = body.get("contentType")
        if ctype is not None and not isinstance(ctype, str):
            raise bad("The parameter 'contentType' must be a string.")
        s = self.store.set_secret(
            ctx.vault.name, ctx.params["name"], value, content_type=ctype,
            enabled=attrs.get("enabled", True), tags=body.get("tags"), nbf=attrs.get("nbf"), exp=attrs.get("exp"),
        )
        return 200, secret_bundle(ctx.vault, s)

    def _update_secret(self, ctx: Ctx, _: bool) -> tuple[int, dict[str, Any]]:
        body = _json_object(ctx.body)
        attrs = _attrs(body.get("attributes"))
        ctype = body.get("contentType")
        s = self.store.update(
            ctx.vault.name, "secret", ctx.params["name"], ctx.params.get("version") or None,
            enabled=attrs.get("enabled"), nbf=attrs.get("nbf"), exp=attrs.get("exp"),
            tags=body.get("tags"), content_type=ctype if isinstance(ctype, str) else None,
        )
        assert isinstance(s, SecretVersion)
        out = secret_bundle(ctx.vault, s)
        out.pop("value")
        return 200, out

    # -- keys ------------------------------------------------------------------------------------
    def _list_keys(self, ctx: Ctx, empty: bool) -> tuple[int, dict[str, Any]]:
        return self._list_latest(ctx, "key", KeyVersion, key_item, "keys", empty)

    def _list_key_versions(self, ctx: Ctx, empty: bool) -> tuple[int, dict[str, Any]]:
        return self._list_history(ctx, "key", KeyVersion, key_item, "keys", empty)

    def _get_key(self, ctx: Ctx, _: bool) -> tuple[int, dict[str, Any]]:
        k = self.store.get(ctx.vault.name, "key", ctx.params["name"], ctx.params.get("version") or None)
        assert isinstance(k, KeyVersion)
        if not k.attributes.enabled:
            raise ApiError(403, "Forbidden", "Operation get is not allowed on a disabled key.", inner="KeyDisabled")
        return 200, key_bundle(ctx.vault, k)

    def _create_key(self, ctx: Ctx, _: bool) -> tuple[int, dict[str, Any]]:
        body = _json_object(ctx.body)
        kty = body.get("kty")
        if kty not in ("RSA", "RSA-HSM", "EC", "EC-HSM"):
            raise bad(f"The key type {str(kty)[:20]!r} is not supported by this emulator (use RSA, RSA-HSM, EC or EC-HSM).")
        size = body.get("key_size") or 2048
        if kty.startswith("RSA") and size not in (2048, 3072, 4096):
            raise bad(f"The key size {size} is not supported; use 2048, 3072 or 4096.")
        crv = body.get("crv") or "P-256"
        try:
            key = pki.generate_key(kty, size=int(size), curve=str(crv))
        except ValueError as err:
            raise bad(str(err)) from None
        attrs = _attrs(body.get("attributes"))
        k = self.store.add_key(
            ctx.vault.name, ctx.params["name"], key, hsm=kty.endswith("-HSM"), key_ops=_ops(body.get("key_ops")),
            enabled=attrs.get("enabled", True), tags=body.get("tags"), nbf=attrs.get("nbf"), exp=attrs.get("exp"),
        )
        return 200, key_bundle(ctx.vault, k)

    def _import_key(self, ctx: Ctx, _: bool) -> tuple[int, dict[str, Any]]:
        body = _json_object(ctx.body)
        jwk = body.get("key")
        if not isinstance(jwk, dict):
            raise bad("The parameter 'key' is required and must be a JSON web key.")
        try:
            key = pki.private_key_from_jwk(jwk)
        except (ValueError, binascii.Error) as err:
            raise bad(f"The key is not a valid JSON web key: {err}") from None
        attrs = _attrs(body.get("attributes"))
        hsm = bool(body.get("Hsm")) or str(jwk.get("kty", "")).endswith("-HSM")
        k = self.store.add_key(
            ctx.vault.name, ctx.params["name"], key, hsm=hsm, key_ops=_ops(jwk.get("key_ops")),
            enabled=attrs.get("enabled", True), tags=body.get("tags"), nbf=attrs.get("nbf"), exp=attrs.get("exp"),
        )
        return 200, key_bundle(ctx.vault, k)

    def _update_key(self, ctx: Ctx, _: bool) -> tuple[int, dict[str, Any]]:
        body = _json_object(ctx.body)
        attrs = _attrs(body.get("attributes"))
        k = self.store.update(
            ctx.vault.name, "key", ctx.params["name"], ctx.params.get("version") or None,
            enabled=attrs.get("enabled"), nbf=attrs.get("nbf"), exp=attrs.get("exp"), tags=body.get("tags"),
            key_ops=_ops(body.get("key_ops")),
        )
        assert isinstance(k, KeyVersion)
        return 200, key_bundle(ctx.vault, k)

    # -- certificates ----------------------------------------------------------------------------
    def _list_certificates(self, ctx: Ctx, empty: bool) -> tuple[int, dict[str, Any]]:
        return self._list_latest(ctx, "cert", CertVersion, cert_item, "certificates", empty)

    def _list_certificate_versions(self, ctx: Ctx, empty: bool) -> tuple[int, dict[str, Any]]:
        return self._list_history(ctx, "cert", CertVersion, cert_item, "certificates", empty)

    def _get_certificate(self, ctx: Ctx, _: bool) -> tuple[int, dict[str, Any]]:
        c = self.store.get(ctx.vault.name, "cert", ctx.params["name"], ctx.params.get("version") or None)
        assert isinstance(c, CertVersion)
        return 200, cert_bundle(ctx.vault, c)

    def _get_certificate_policy(self, ctx: Ctx, _: bool) -> tuple[int, dict[str, Any]]:
        c = self.store.get(ctx.vault.name, "cert", ctx.params["name"])
        assert isinstance(c, CertVersion)
        return 200, cert_policy(ctx.vault, c)

    def _get_certificate_operation(self, ctx: Ctx, _: bool) -> tuple[int, dict[str, Any]]:
        self.store.get(ctx.vault.name, "cert", ctx.params["name"])
        raise ApiError(404, "PendingCertificateNotFound", f"Pending certificate not found: {ctx.params['name']}")

    def _import_certificate(self, ctx: Ctx, _: bool) -> tuple[int, dict[str, Any]]:
        body = _json_object(ctx.body)
        value = body.get("value")
        if not isinstance(value, str) or not value:
            raise bad("The parameter 'value' is required and must be a string.")
        policy: dict[str, Any] = body["policy"] if isinstance(body.get("policy"), dict) else {}
        secret_props: dict[str, Any] = (
            policy["secret_props"] if isinstance(policy.get("secret_props"), dict) else {}
        )
        ctype = secret_props.get("contentType") or (pki.PEM if value.lstrip().startswith("-----BEGIN") else pki.PKCS12)
        pwd = body.get("pwd")
        try:
            if ctype == pki.PEM:
                # REST callers send the PEM text; the Python SDK sends it base64-encoded
                text = value.encode() if "-----BEGIN" in value else base64.b64decode(value)
                material = pki.parse_pem_bundle(text)
            elif ctype == pki.PKCS12:
                material = pki.parse_pfx(base64.b64decode(value, validate=False), pwd if isinstance(pwd, str) else None)
            else:
                raise ValueError(f"content type {str(ctype)[:60]!r} is not supported; use {pki.PKCS12} or {pki.PEM}")
        except (ValueError, binascii.Error) as err:
            raise bad(f"The specified certificate content is invalid: {err}.") from None
        attrs = _attrs(body.get("attributes"))
        issuer = policy.get("issuer", {}).get("name") if isinstance(policy.get("issuer"), dict) else None
        c = self.store.add_certificate(
            ctx.vault.name, ctx.params["name"], material, content_type=ctype,
            enabled=attrs.get("enabled", True), tags=body.get("tags"), issuer=str(issuer or "Unknown"),
        )
        return 200, cert_bundle(ctx.vault, c)

    def _update_certificate(self, ctx: Ctx, _: bool) -> tuple[int, dict[str, Any]]:
        body = _json_object(ctx.body)
        attrs = _attrs(body.get("attributes"))
        c = self.store.update(
            ctx.vault.name, "cert", ctx.params["name"], ctx.params.get("version") or None,
            enabled=attrs.get("enabled"), tags=body.get("tags"),
        )
        assert isinstance(c, CertVersion)
        return 200, cert_bundle(ctx.vault, c)


class _Dropped(Exception):
    """The connection was dropped on purpose; send nothing."""


def _match(method: str, path: str) -> tuple[Route | None, dict[str, str], bool]:
    allowed = False
    for route in ROUTES:
        m = route.pattern.match(path)
        if m is None:
            continue
        if route.method != method:
            allowed = True
            continue
        return route, {k: v for k, v in m.groupdict().items() if v is not None}, True
    return None, {}, allowed


def _query(scope: Scope) -> dict[str, str]:
    from urllib.parse import parse_qsl

    raw = scope.get("query_string", b"").decode("latin-1")
    # keep '+' literal: skiptokens are base64 and some clients do not escape it
    return {k: v for k, v in parse_qsl(raw.replace("+", "%2B"), keep_blank_values=True)}


def _encode_skiptoken(offset: int) -> str:
    marker = f"{offset:06d}!kvfs-emulator"
    doc = {"NextMarker": f"2!{len(marker)}!{marker}", "TargetLocation": 0}
    return base64.b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode().rstrip("=")


def _decode_skiptoken(token: str) -> int:
    try:
        text = token.replace(" ", "+").strip()
        doc = json.loads(base64.b64decode(text + "=" * (-len(text) % 4)))
        return int(doc["NextMarker"].split("!")[2])
    except Exception:  # noqa: BLE001 - anything unparseable is the caller's mistake
        raise bad("The specified $skiptoken is invalid.") from None


def _json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise bad("The request body is empty; a JSON object is required.")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise bad("The request body is not valid JSON.") from None
    if not isinstance(doc, dict):
        raise bad("The request body must be a JSON object.")
    return doc


def _attrs(raw: object) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise bad("The parameter 'attributes' must be an object.")
    out: dict[str, Any] = {}
    if "enabled" in raw and raw["enabled"] is not None:
        if not isinstance(raw["enabled"], bool):
            raise bad("The attribute 'enabled' must be a boolean.")
        out["enabled"] = raw["enabled"]
    for k in ("nbf", "exp"):
        if raw.get(k) is not None:
            if not isinstance(raw[k], int) or isinstance(raw[k], bool):
                raise bad(f"The attribute '{k}' must be integer Unix seconds.")
            out[k] = raw[k]
    return out


def _ops(raw: object) -> list[str] | None:
    if raw is None:
        return None
    valid = {"encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey", "import", "export"}
    if not isinstance(raw, list) or not all(isinstance(o, str) and o in valid for o in raw):
        raise bad(f"The parameter 'key_ops' must be a list of: {', '.join(sorted(valid))}.")
    return list(raw)


async def read_body(receive: Receive, headers: dict[str, str], limit: int = MAX_BODY) -> bytes:
    """The whole request body, refusing more than `limit` bytes with 413.

    An oversized body is still read (and discarded) up to `DRAIN_MAX`, so a client that writes its
    whole body before reading gets the 413 instead of a broken connection.
    """
    declared = headers.get("content-length")
    too_large = ApiError(413, "RequestEntityTooLarge", f"The request body is larger than {limit} bytes.")
    if declared is not None and declared.isdigit() and int(declared) > DRAIN_MAX:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Dropped()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > DRAIN_MAX:
            raise too_large
        if size <= limit:
            chunks.append(chunk)
        if not message.get("more_body", False):
            if size > limit:
                raise too_large
            return b"".join(chunks)


KV_HEADERS = {
    "Cache-Control": "no-cache",
    "Pragma": "no-cache",
    "Expires": "-1",
    "Strict-Transport-Security": "max-age=31536000;includeSubDomains",
    "X-Content-Type-Options": "nosniff",
    "x-ms-keyvault-region": "emulator",
    "x-ms-keyvault-service-version": "1.9.0.0-kvfs-emulator",
    "x-ms-keyvault-network-info": "conn_type=Ipv4;addr=127.0.0.1;act_addr_fam=InterNetwork;",
}


async def send_json(send: Send, status: int, payload: dict[str, Any], extra: dict[str, str]) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = {**KV_HEADERS, "x-ms-request-id": str(uuid.uuid4()), **extra}
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    raw += [(b"content-type", b"application/json; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})

