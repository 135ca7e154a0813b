"""The four token flows kvfs speaks itself, on httpx + trio (azure-identity's async side is asyncio-only).

- `AssertionCredential`: workload identity (SA token as client assertion) at Entra ID.
- `ClientSecretCredential`: service principal at Entra ID.
- `ImdsCredential`: VM/VMSS managed identity via IMDS.
- `NmiCredential`: aad-pod-identity's NMI (deprecated upstream, kept for compatibility).

Expiry is converted to trio time once, when the token arrives. Neither the access token nor
the assertion / client secret ever reaches a log line or an exception message.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import httpx
import trio

from kvfs.auth.base import AccessToken, TokenSource
from kvfs.auth.tokensource import unverified_claims
from kvfs.auth.messages import (
    EntraContext,
    entra_error,
    imds_error,
    imds_unreachable,
    nmi_bad_response,
    nmi_error,
    nmi_unreachable,
    safe_text,
)
from kvfs.errors import AuthError, ConfigError, is_tls_verification_error
from kvfs.net.body import TOKEN_BODY_CAP, BodyError, send
from kvfs.net.circuit import HostUnreachable, no_cooldown_if_down
from kvfs.net.http import make_local_http_client
from kvfs.net.retry import ENTRA_RETRY, IMDS_RETRY, DeadlineExceeded, RetryPolicy

log = logging.getLogger(__name__)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
IMDS_DEFAULT_URL = "http://169.254.169.254"
IMDS_API_VERSION = "2018-02-01"
NMI_DEFAULT_URL = "http://localhost:2579"
# NMI answers from its own cache or fails for good: one attempt, within the token deadline.
_NMI_RETRY = dataclasses.replace(IMDS_RETRY, statuses=frozenset(), max_attempts=1)


def scope_to_resource(scope: str) -> str:
    """IMDS and NMI take a v1 resource: the scope without `/.default` (and no trailing '/')."""
    resource = scope[: -len("/.default")] if scope.endswith("/.default") else scope
    return resource.rstrip("/")


def _number(value: object) -> float | None:
    """Entra sends numbers, IMDS numeric strings; anything else is unusable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            n = float(value.strip())
        except ValueError:
            return None
        return n if math.isfinite(n) else None
    return None


def expires_at_from(payload: Mapping[str, object]) -> float | None:
    """Trio-clock deadline from `expires_in` (preferred: relative, immune to clock skew) or `expires_on`."""
    expires_in = _number(payload.get("expires_in"))
    if expires_in is not None:
        return trio.current_time() + expires_in
    expires_on = _number(payload.get("expires_on"))
    if expires_on is not None:
        return trio.current_time() + (expires_on - time.time())
    return None


async def _fetch(
    http: httpx.AsyncClient, retry: RetryPolicy, what: str, method: str, url: str, **kwargs: Any
) -> httpx.Response:
    """One token request under `retry`, its answer read up to `TOKEN_BODY_CAP` bytes.

    Raises AuthError for an oversized or undecodable body, `DeadlineExceeded` and httpx errors
    for the caller to phrase.
    """

    async def attempt() -> httpx.Response:
        request = http.build_request(method, url, **kwargs)
        return await send(http, request, cap=TOKEN_BODY_CAP, what=what)

    try:
        return await retry.run(attempt, what=what)
    except BodyError as exc:
        raise AuthError(str(exc), code=exc.code, errno=_errno.EIO) from None


def _reason(exc: Exception, retry: RetryPolicy) -> str:
    """Why a local token service did not answer, for the message."""
    if isinstance(exc, DeadlineExceeded):
        return f"no answer within {retry.deadline:g} s"
    return str(exc) if isinstance(exc, HostUnreachable) else type(exc).__name__


def _json(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return response.text


def _token_from(body: object, issuer: str) -> AccessToken | None:
    """The token in `issuer`'s 200 answer carrying `access_token` and `expires_in`/`expires_on`, else None."""
    if not isinstance(body, dict):
        return None
    token = body.get("access_token")
    expires_at = expires_at_from(body)
    if not isinstance(token, str) or not token or expires_at is None:
        return None
    return AccessToken(token=token, expires_at=expires_at, issuer=issuer)


def _require_https(authority_host: str) -> str:
    authority = authority_host.rstrip("/")
    if not authority.lower().startswith("https://"):
        raise ConfigError(
            "authority host",
            authority_host,
            "must be an https URL (tokens and secrets are never sent in clear text)",
            "check cloudName or activeDirectoryEndpoint in the cloudEnvFileName file",
        )
    return authority


class _EntraCredential:
    """Shared POST-to-token-endpoint logic of the two Entra ID flows."""

    flow = ""

    def __init__(
        self,
        authority_host: str,
        tenant_id: str,
        client_id: str,
        http: httpx.AsyncClient,
        *,
        retry: RetryPolicy = ENTRA_RETRY,
    ) -> None:
        if not tenant_id:
            raise ConfigError("tenantID", tenant_id, "is required for " + self.flow, "set tenantID")
        if not client_id:
            raise ConfigError("clientID", client_id, "is required for " + self.flow, "set the client id")
        self.authority_host = _require_https(authority_host)
        self.tenant_id = tenant_id
        self.client_id = client_id
        self._http = http
        self._retry = retry
        self.token_url = f"{self.authority_host}/{quote(tenant_id, safe='')}/oauth2/v2.0/token"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(authority_host={self.authority_host!r},"
            f" tenant_id={self.tenant_id!r}, client_id={self.client_id!r})"
        )

    async def _request(
        self, scope: str, form: dict[str, str], ctx: EntraContext, secrets: tuple[str, ...]
    ) -> AccessToken:
        log.debug("requesting a token from %s for client %s scope %s", self.token_url, self.client_id, scope)
        issuer = f"Entra ID at {self.authority_host}"
        try:
            response = await _fetch(
                self._http, self._retry, issuer, "POST", self.token_url,
                data=form, headers={"Accept": "application/json"},
            )
        except (httpx.TimeoutException, DeadlineExceeded):
            raise AuthError(
                f"timed out waiting for Entra ID at {self.authority_host} ({self.flow}, client id"
                f" '{self.client_id}'); kvfs retries",
                code="entra_timeout",
                errno=_errno.EIO,
            ) from None
        except httpx.TransportError as exc:
            if is_tls_verification_error(exc):
                error = AuthError(
                    f"the TLS certificate of Entra ID at {self.authority_host} is not trusted"
                    " (add its CA to the file named by SSL_CERT_FILE)",
                    code="TLSVerifyFailed",
                    errno=_errno.EIO,
                )
            else:
                error = AuthError(
                    f"cannot reach Entra ID at {self.authority_host} ({type(exc).__name__}:"
                    f" {safe_text(exc, secrets)}): check network egress and cloudName /"
                    " activeDirectoryEndpoint",
                    code="entra_unreachable",
                    errno=_errno.EIO,
                )
            raise no_cooldown_if_down(error, exc) from None
        body = _json(response)
        if response.status_code != 200:
            err = entra_error(response.status_code, body, ctx, secrets)
            log.debug("Entra ID token request failed: %s %s", response.status_code, err.code)
            raise err
        token = _token_from(body, issuer)
        if token is None:
            raise AuthError(
                f"Entra ID at {self.authority_host} answered 200 without access_token/expires_in"
                " (is the authority host really Entra ID?)",
                code="entra_bad_response",
                errno=_errno.EIO,
            )
        log.debug("got a token for client %s, valid %.0fs", self.client_id, token.expires_at - trio.current_time())
        return token

    def _ctx(self, scope: str, claims: Mapping[str, object] | None = None) -> EntraContext:
        return EntraContext(
            flow=self.flow,
            authority_host=self.authority_host,
            tenant_id=self.tenant_id,
            client_id=self.client_id,
            scope=scope,
            assertion_claims=dict(claims or {}),
        )

    async def aclose(self) -> None:
        """The shared HTTP client belongs to the caller."""


def _assertion_claims(assertion: str) -> dict[str, object]:
    """Non-secret claims of the SA token, for error messages only (never verified, never logged whole)."""
    claims = unverified_claims(assertion)
    return {k: claims[k] for k in ("iss", "sub", "aud", "exp", "iat") if k in claims}


class AssertionCredential(_EntraCredential):
    """Workload identity: the service account token as a client assertion at Entra ID.

    Works the same for an app registration and a user-assigned managed identity's client id.
    """

    flow = "workload identity"

    def __init__(
        self,
        authority_host: str,
        tenant_id: str,
        client_id: str,
        token_source: TokenSource,
        http: httpx.AsyncClient,
        *,
        retry: RetryPolicy = ENTRA_RETRY,
    ) -> None:
        super().__init__(authority_host, tenant_id, client_id, http, retry=retry)
        self.token_source = token_source

    async def get_token(self, scope: str) -> AccessToken:
        assertion = await self.token_source.get()
        form = {
            "client_assertion": assertion,
            "client_assertion_type": ASSERTION_TYPE,
            "client_id": self.client_id,
            "grant_type": "client_credentials",
            "scope": scope,
        }
        ctx = self._ctx(scope, _assertion_claims(assertion))
        return await self._request(scope, form, ctx, (assertion,))


class ClientSecretCredential(_EntraCredential):
    """Service principal: client id + secret from nodePublishSecretRef / --secrets."""

    flow = "service principal"

    def __init__(
        self,
        authority_host: str,
        tenant_id: str,
        client_id: str,
        client_secret: str,
        http: httpx.AsyncClient,
        *,
        retry: RetryPolicy = ENTRA_RETRY,
    ) -> None:
        super().__init__(authority_host, tenant_id, client_id, http, retry=retry)
        if not client_secret:
            raise ConfigError("clientsecret", None, "is empty", "put the secret's Value in the secret")
        self._client_secret = client_secret

    async def get_token(self, scope: str) -> AccessToken:
        form = {
            "client_id": self.client_id,
            "client_secret": self._client_secret,
            "grant_type": "client_credentials",
            "scope": scope,
        }
        return await self._request(scope, form, self._ctx(scope), (self._client_secret,))


class _LocalCredential:
    """Base for IMDS / NMI: plain-HTTP services on the node, reached without any proxy."""

    def __init__(self, http: httpx.AsyncClient | None, owns_http: bool) -> None:
        if http is None:
            http = make_local_http_client()
            owns_http = True
        self._http = http
        self._owns_http = owns_http

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()


class ImdsCredential(_LocalCredential):
    """VM / VMSS managed identity via IMDS; `client_id` None = system-assigned.

    Pass an httpx client built with `trust_env=False` (IMDS must never go through a proxy);
    with `http=None` one is created and closed by `aclose()`.
    """

    def __init__(
        self,
        client_id: str | None,
        http: httpx.AsyncClient | None = None,
        *,
        base_url: str | None = None,
        owns_http: bool = False,
        retry: RetryPolicy = IMDS_RETRY,
    ) -> None:
        super().__init__(http, owns_http)
        self.client_id = client_id or None
        self.base_url = (
            base_url or os.environ.get("AZURE_POD_IDENTITY_AUTHORITY_HOST") or IMDS_DEFAULT_URL
        ).rstrip("/")
        self._retry = retry

    def __repr__(self) -> str:
        return f"ImdsCredential(client_id={self.client_id!r}, base_url={self.base_url!r})"

    async def get_token(self, scope: str) -> AccessToken:
        params = {"api-version": IMDS_API_VERSION, "resource": scope_to_resource(scope)}
        if self.client_id:
            params["client_id"] = self.client_id
        url = f"{self.base_url}/metadata/identity/oauth2/token"
        try:
            response = await _fetch(
                self._http, self._retry, f"IMDS at {self.base_url}", "GET", url,
                params=params, headers={"Metadata": "true"},
            )
        except (httpx.TransportError, DeadlineExceeded) as exc:
            raise no_cooldown_if_down(imds_unreachable(self.base_url, _reason(exc, self._retry)), exc) from None
        body = _json(response)
        if response.status_code != 200:
            raise imds_error(response.status_code, body, base_url=self.base_url, client_id=self.client_id)
        token = _token_from(body, f"IMDS at {self.base_url}")
        if token is None:
            raise AuthError(
                f"IMDS at {self.base_url} answered 200 without access_token/expires_in",
                code="imds_bad_response",
                errno=_errno.EIO,
            )
        return token


class NmiCredential(_LocalCredential):
    """aad-pod-identity: ask the node's NMI for the pod's token (GET /host/token/ with pod headers)."""

    def __init__(
        self,
        pod_name: str,
        pod_namespace: str,
        http: httpx.AsyncClient | None = None,
        *,
        base_url: str | None = None,
        owns_http: bool = False,
    ) -> None:
        super().__init__(http, owns_http)
        if not pod_name or not pod_namespace:
            raise ConfigError(
                "csi.storage.k8s.io/pod.name/namespace",
                None,
                "pod identity needs the pod name and namespace",
                "the CSIDriver object must set podInfoOnMount: true",
            )
        self.pod_name = pod_name
        self.pod_namespace = pod_namespace
        self.base_url = (base_url or os.environ.get("KVFS_NMI_URL") or NMI_DEFAULT_URL).rstrip("/")

    def __repr__(self) -> str:
        return f"NmiCredential(pod={self.pod_namespace}/{self.pod_name}, base_url={self.base_url!r})"

    async def get_token(self, scope: str) -> AccessToken:
        # Upstream concatenates the resource unescaped; NMI parses either form.
        url = f"{self.base_url}/host/token/?resource={scope_to_resource(scope)}"
        pod = f"{self.pod_namespace}/{self.pod_name}"
        try:
            response = await _fetch(
                self._http, _NMI_RETRY, f"NMI at {self.base_url}", "GET", url,
                headers={"podname": self.pod_name, "podns": self.pod_namespace},
            )
        except (httpx.TransportError, DeadlineExceeded) as exc:
            raise no_cooldown_if_down(nmi_unreachable(self.base_url, _reason(exc, _NMI_RETRY)), exc) from None
        if response.status_code != 200:
            raise nmi_error(response.status_code, response.text, base_url=self.base_url, pod=pod)
        body = _json(response)
        if not isinstance(body, dict) or not isinstance(body.get("token"), dict) or not body.get("clientid"):
            raise nmi_bad_response(self.base_url)
        nmi_token = body["token"]
        # NMI passes ADAL's token through: only `expires_on` counts, whatever else it holds.
        token = _token_from(
            {"access_token": nmi_token.get("access_token"), "expires_on": nmi_token.get("expires_on")}, f"NMI at {self.base_url}"
        )
        if token is None:
            raise nmi_bad_response(self.base_url)
        return token
