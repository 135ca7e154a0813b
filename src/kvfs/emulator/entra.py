"""Entra ID's token endpoint (client credentials) and discovery documents, as an emulator.

Errors use Entra's JSON shape and AADSTS codes so clients are exercised on the same branches
as against the real service (they must branch on `error_codes`, not on descriptions).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hmac
import logging
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote_plus, urlsplit

import jwt
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

if TYPE_CHECKING:
    from kvfs.emulator.identity import App, IdentityProvider

log = logging.getLogger(__name__)

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_OIDC_SCOPES = {"openid", "profile", "offline_access", "email"}
_FIC_DOCS = "https://learn.microsoft.com/entra/workload-id/workload-identity-federation"
_NO_STORE = {"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"}


class EntraError(Exception):
    """One AADSTS error answer: HTTP status, OAuth `error`, AADSTS number and description."""

    def __init__(self, status: int, error: str, code: int, description: str) -> None:
        super().__init__(f"AADSTS{code}")
        self.status = status
        self.error = error
        self.code = code
        self.description = description


def error_response(
    provider: IdentityProvider, err: EntraError, request: Request, headers: dict[str, str] | None = None
) -> JSONResponse:
    """Render `err` exactly as Entra does, with fresh trace and correlation ids."""
    now = dt.datetime.now(dt.UTC)
    trace_id = str(uuid.uuid4())
    correlation_id = request.headers.get("client-request-id") or str(uuid.uuid4())
    timestamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
    description = (
        f"AADSTS{err.code}: {err.description}\r\nTrace ID: {trace_id}\r\n"
        f"Correlation ID: {correlation_id}\r\nTimestamp: {timestamp}"
    )
    body = {
        "error": err.error,
        "error_description": description,
        "error_codes": [err.code],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": f"{provider.authority_host}/error?code={err.code}",
    }
    hdrs = {**_NO_STORE, "x-ms-request-id": trace_id, "client-request-id": correlation_id}
    hdrs.update(headers or {})
    return JSONResponse(body, status_code=err.status, headers=hdrs)


def _missing(name: str) -> EntraError:
    return EntraError(
        400, "invalid_request", 900144, f"The request body must contain the following parameter: '{name}'."
    )


def _tenant_not_found(tenant: str, error: str = "invalid_request") -> EntraError:
    return EntraError(
        400,
        error,
        90002,
        f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are "
        "signing into the correct cloud. Check with your subscription administrator, this may "
        "happen if there are no active subscriptions for the tenant.",
    )


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.0000000Z")


async def _form(request: Request) -> dict[str, str]:
    """The urlencoded body; anything else reads as empty, like Entra (→ missing parameters)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        return {}
    body = (await request.body()).decode("utf-8", errors="replace")
    form: dict[str, str] = {}
    for key, value in parse_qsl(body, keep_blank_values=True):
        form.setdefault(key, value)
    return form


def _basic_auth(request: Request) -> tuple[str, str] | None:
    """RFC 6749 §2.3.1: base64 of urlencoded `client_id:client_secret`."""
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return unquote_plus(user), unquote_plus(password)


def _resource_from_scope(scope: str) -> str:
    """`<resource>/.default` → resource; one resource per request, OIDC scopes tolerated."""
    parts = [p for p in scope.split() if p not in _OIDC_SCOPES]
    if len(parts) == 1 and parts[0].endswith("/.default") and len(parts[0]) > len("/.default"):
        resource = parts[0][: -len("/.default")]
        if "://" in resource or _is_guid(resource):
            return resource
    raise EntraError(
        400,
        "invalid_scope",
        70011,
        "The provided request must include a 'scope' input parameter. The provided value for the "
        f"input parameter 'scope' is not valid. The scope {scope} is not valid. Client credential "
        "flows must have a scope value with /.default suffixed to the resource identifier "
        "(application ID URI).",
    )


def _is_guid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _check_assertion(provider: IdentityProvider, app: App, raw: str) -> None:
    """Validate a federated assertion like Entra: FIC match, issuer discovery, keys, time."""
    assertion = raw.strip()  # azure-identity sends the token file verbatim (trailing newline)
    try:
        claims = jwt.decode(assertion, options={"verify_signature": False})
        header = jwt.get_unverified_header(assertion)
    except jwt.PyJWTError:
        raise EntraError(400, "invalid_request", 50027, "JWT token is invalid or malformed.") from None
    iss, sub, aud = claims.get("iss"), claims.get("sub"), claims.get("aud")
    auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if not isinstance(iss, str) or not isinstance(sub, str) or not auds:
        raise EntraError(400, "invalid_request", 50027, "JWT token is invalid or malformed.")
    _match_fic(provider, app, iss, sub, auds)

    keys = provider.oidc.resolve_keys(iss)
    if keys is None:
        raise EntraError(
            400,
            "invalid_request",
            90061,
            f"Request to External OIDC endpoint failed. Issuer: '{iss}'.",
        )
    key = keys.get(str(header.get("kid", "")))
    if key is None or header.get("alg") != "RS256":
        raise EntraError(
            401,
            "invalid_client",
            700027,
            "Client assertion contains an invalid signature. [Reason - The key was not found., "
            f"Thumbprint of key used by client: '{header.get('kid', '')}', Found keys: "
            f"'{', '.join(keys)}'.]",
        )
    try:
        jwt.decode(
            assertion,
            key.key,
            algorithms=["RS256"],
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False},
        )
    except jwt.PyJWTError:
        raise EntraError(
            401,
            "invalid_client",
            700027,
            "Client assertion contains an invalid signature. [Reason - The provided signature "
            "value did not match the expected signature value.]",
        ) from None
    now = provider.clock()
    exp = claims.get("exp")
    nbf = claims.get("nbf", claims.get("iat", 0))
    if not isinstance(exp, (int, float)) or not isinstance(nbf, (int, float)):
        raise EntraError(400, "invalid_request", 50027, "JWT token is invalid or malformed.")
    if not nbf <= now < exp:
        raise EntraError(
            401,
            "invalid_client",
            700024,
            f"Client assertion is not within its valid time range. Current time: {_iso(now)}, "
            f"assertion valid from {_iso(nbf)}, expiry time of assertion {_iso(exp)}. Review the "
            "documentation at https://learn.microsoft.com/entra/identity-platform/certificate-credentials .",
        )


def _match_fic(provider: IdentityProvider, app: App, iss: str, sub: str, auds: list[Any]) -> None:
    fics = provider.federated_credentials(app)
    if any(f.issuer == iss and f.subject == sub and f.audience in auds for f in fics):
        return
    shown_aud = auds[0] if len(auds) == 1 else ",".join(map(str, auds))
    hint = (
        "Check your federated identity credential Subject, Audience and Issuer against the "
        f"presented assertion. {_FIC_DOCS}"
    )
    if provider.refined_fic_errors and fics:
        if not any(f.issuer == iss for f in fics):
            field, value, code = "issuer", iss, 700211
        elif not any(f.issuer == iss and f.subject == sub for f in fics):
            field, value, code = "subject", sub, 700213
        else:
            field, value, code = "audience", shown_aud, 700212
        raise EntraError(
            400,
            "invalid_request",
            code,
            f"No matching federated identity record found for presented assertion {field} '{value}'. {hint}",
        )
    raise EntraError(
        400,
        "invalid_request",
        70021,
        "No matching federated identity record found for presented assertion. "
        f"Assertion Issuer: '{iss}'. Assertion Subject: '{sub}'. Assertion Audience: '{shown_aud}'. "
        f"{_FIC_DOCS}",
    )


async def _token(provider: IdentityProvider, request: Request, v1: bool) -> Response:
    form = await _form(request) if request.method == "POST" else {}
    basic = _basic_auth(request)
    client_id = form.get("client_id") or (basic[0] if basic else "")
    provider.notify("token", client_id)
    try:
        if provider.outage:
            headers = {}
            if provider.outage_retry_after is not None:
                headers["Retry-After"] = str(provider.outage_retry_after)
            return error_response(
                provider,
                EntraError(
                    503, "temporarily_unavailable", 90033, "A transient error has occurred. Please try again."
                ),
                request,
                headers,
            )
        tenant = request.path_params["tenant"]
        if tenant.lower() != provider.tenant_id.lower():
            raise _tenant_not_found(tenant)
        if request.method != "POST":
            raise EntraError(
                400,
                "invalid_request",
                900561,
                f"The endpoint only accepts POST requests. Received a {request.method} request.",
            )
        grant_type = form.get("grant_type")
        if not grant_type:
            raise _missing("grant_type")
        if grant_type != "client_credentials":
            raise EntraError(
                400,
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{grant_type}'.",
            )
        if not client_id:
            raise _missing("client_id")
        if v1:
            resource = form.get("resource")
            if not resource:
                raise _missing("resource")
        else:
            scope = form.get("scope")
            if not scope:
                raise _missing("scope")
            resource = _resource_from_scope(scope)
        app = provider.find_app(client_id)
        if app is None:
            raise EntraError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{provider.tenant_id}'. This can happen if the application has not been installed "
                "by the administrator of the tenant or consented to by any user in the tenant. You "
                "may have sent your authentication request to the wrong tenant.",
            )
        secret = form.get("client_secret") or (basic[1] if basic else None)
        assertion = form.get("client_assertion")
        if assertion is not None:
            assertion_type = form.get("client_assertion_type")
            if not assertion_type:
                raise _missing("client_assertion_type")
            if assertion_type != JWT_BEARER:
                raise EntraError(
                    400,
                    "invalid_request",
                    900144,
                    f"The request body must contain the following parameter: 'client_assertion_type' "
                    f"with the value '{JWT_BEARER}'.",
                )
            _check_assertion(provider, app, assertion)
            appidacr = "2"
        elif secret:
            expected = app.client_secret
            if expected is None or not hmac.compare_digest(secret.encode(), expected.encode()):
                raise EntraError(
                    401,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request is "
                    "the client secret value, not the client secret ID, for a secret added to app "
                    f"'{app.client_id}'.",
                )
            appidacr = "1"
        else:
            raise EntraError(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or "
                "'client_secret'.",
            )
    except EntraError as err:
        log.info("token request for client %r refused: AADSTS%d", client_id, err.code)
        return error_response(provider, err, request)

    token, iat, exp = provider.issue_access_token(app, resource, appidacr=appidacr)
    lifetime = exp - iat if provider.answered_lifetime is None else provider.answered_lifetime
    log.debug("issued token for client %s, resource %s", app.client_id, resource)
    body: dict[str, Any]
    if v1:  # the v1 endpoint answers with strings, like IMDS
        body = {
            "token_type": "Bearer",
            "expires_in": str(lifetime),
            "ext_expires_in": str(lifetime),
            "expires_on": str(exp),
            "not_before": str(iat),
            "resource": resource,
            "access_token": token,
        }
    else:
        body = {
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": token,
        }
    headers = {**_NO_STORE, "x-ms-request-id": str(uuid.uuid4())}
    if "client-request-id" in request.headers:
        headers["client-request-id"] = request.headers["client-request-id"]
    return JSONResponse(body, headers=headers)


def _openid_configuration(provider: IdentityProvider, tenant: str, v2: bool) -> dict[str, Any]:
    base = f"{provider.authority_host}/{tenant}"
    host = urlsplit(provider.authority_host).netloc
    v = "/v2.0" if v2 else ""
    return {
        "token_endpoint": f"{base}/oauth2{v}/token",
        "token_endpoint_auth_methods_supported": [
            "client_secret_post",
            "private_key_jwt",
            "client_secret_basic",
        ],
        "jwks_uri": f"{base}/discovery{v}/keys",
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "issuer": f"{base}/v2.0" if v2 else provider.sts_issuer,
        "request_uri_parameter_supported": False,
        "authorization_endpoint": f"{base}/oauth2{v}/authorize",
        "device_authorization_endpoint": f"{base}/oauth2{v}/devicecode",
        "http_logout_supported": True,
        "frontchannel_logout_supported": True,
        "end_session_endpoint": f"{base}/oauth2{v}/logout",
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nbf", "tid", "oid", "ver"],
        "tenant_region_scope": "NA",
        "cloud_instance_name": host,
        "cloud_graph_host_name": host,
        "msgraph_host": host,
        "rbac_url": provider.authority_host,
    }


def routes(provider: IdentityProvider) -> list[BaseRoute]:
    """Token endpoints (v2 + v1), OpenID discovery, JWKS and MSAL instance discovery."""

    async def token_v2(request: Request) -> Response:
        return await _token(provider, request, v1=False)

    async def token_v1(request: Request) -> Response:
        return await _token(provider, request, v1=True)

    async def _config(request: Request, v2: bool) -> Response:
        tenant = request.path_params["tenant"]
        if tenant.lower() != provider.tenant_id.lower():
            return error_response(provider, _tenant_not_found(tenant, error="invalid_tenant"), request)
        return JSONResponse(_openid_configuration(provider, provider.tenant_id, v2=v2))

    async def config_v2(request: Request) -> Response:
        return await _config(request, v2=True)

    async def config_v1(request: Request) -> Response:
        return await _config(request, v2=False)

    async def keys(request: Request) -> Response:
        return JSONResponse({"keys": [provider.entra_key.jwk()]})

    async def instance(request: Request) -> Response:
        host = urlsplit(provider.authority_host).netloc
        authority = request.query_params.get("authorization_endpoint", "")
        tenant = urlsplit(authority).path.strip("/").split("/")[0] or "common"
        return JSONResponse(
            {
                "tenant_discovery_endpoint": (
                    f"{provider.authority_host}/{tenant}/v2.0/.well-known/openid-configuration"
                ),
                "api-version": "1.1",
                "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
            }
        )

    return [
        Route("/common/discovery/instance", instance, methods=["GET"]),
        Route("/{tenant}/oauth2/v2.0/token", token_v2, methods=["GET", "POST"]),
        Route("/{tenant}/oauth2/token", token_v1, methods=["GET", "POST"]),
        Route("/{tenant}/v2.0/.well-known/openid-configuration", config_v2, methods=["GET"]),
        Route("/{tenant}/.well-known/openid-configuration", config_v1, methods=["GET"]),
        Route("/{tenant}/discovery/v2.0/keys", keys, methods=["GET"]),
        Route("/{tenant}/discovery/keys", keys, methods=["GET"]),
    ]
