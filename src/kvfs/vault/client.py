"""VaultClient: the only code that speaks Key Vault REST.

Why it exists as one small class: every request must carry the bearer token for the configured
vault only, honour the retry policy and the read deadline, read at most `VAULT_BODY_CAP` bytes,
accept only answers of the right shape (kvfs.vault.bundle), and turn Key Vault's error envelope
into a `VaultError` with the right errno and a message that says what to fix.

Object names are validated once, by the configuration (kvfs.config.objects); here, at the URL
boundary, every path segment is percent-encoded so no name can change what the URL addresses.
"""

from __future__ import annotations

import collections
import inspect
import logging
import time
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote

import httpx
import trio

from kvfs.auth.base import Credential
from kvfs.config.model import ObjectType
from kvfs.errors import ConfigError, VaultError, error_code, is_tls_verification_error
from kvfs.net import body
from kvfs.net.circuit import HostUnreachable, no_cooldown_if_down, origin
from kvfs.net.deadlines import VAULT_OP_DEADLINE
from kvfs.net.retry import KEY_VAULT_RETRY, DeadlineExceeded, RetryPolicy
from kvfs.vault.bundle import check_bundle, check_page

log = logging.getLogger(__name__)

# A vault host that answers for no vault of that name (`kvfs emulator`, whose `*.vault.localhost`
# names all reach it; in Azure such a name does not resolve at all).
VAULT_NOT_FOUND = "VaultNotFound"

_COLLECTION: dict[str, str] = {"secret": "secrets", "key": "keys", "cert": "certificates"}
_ROUTE_NOUN: dict[str, str] = {"secret": "secret", "key": "key", "cert": "certificate"}
_RBAC_ROLE: dict[str, str] = {
    "secret": "Key Vault Secrets User",
    "key": "Key Vault Crypto User",
    "cert": "Key Vault Certificate User",
}
# A version list longer than this many pages (25 versions each) is a fault or an attack, not a list.
MAX_PAGES = 1000


@runtime_checkable
class InvalidatingCredential(Protocol):
    """Optional: a credential that can drop its cached token so the next get_token() is fresh."""

    def invalidate(self, scope: str) -> Any: ...


def _segment(text: str) -> str:
    """One URL path segment holding exactly `text`: `/`, `?`, `#`, `%` and dots escaped.

    Dots too, so that `.` and `..` stay names instead of being resolved as relative paths.
    """
    if not text:
        raise ValueError("an empty Key Vault object name or version would address another resource")
    return quote(text, safe="").replace(".", "%2E")


def parse_challenge(header: str) -> dict[str, str]:
    """Parse `Bearer authorization="…", resource="…"` into lower-cased keys (quotes stripped)."""
    _, _, params = header.strip().partition(" ")
    out: dict[str, str] = {}
    for item in params.split(","):
        key, sep, value = item.partition("=")
        if sep:
            out[key.strip().lower()] = value.strip().strip('"').strip()
    return out


_AUTHORITY_SUFFIXES = frozenset({"oauth2", "authorize", "token", "v2.0"})


def challenge_tenant(header: str) -> str:
    """Tenant named by a 401 challenge: last path segment of its authorization URL, or "".

    The last segment, not the first: private clouds put the authority under a path
    (`https://login.example/aad/<tenant>`), and Azure Stack AD FS ends in `/adfs`.
    """
    params = parse_challenge(header)
    uri = params.get("authorization") or params.get("authorization_uri") or ""
    if not uri:
        return ""
    try:
        path = httpx.URL(uri).path
    except (httpx.InvalidURL, ValueError):
        return ""
    segments = [s for s in path.split("/") if s]
    while segments and segments[-1].lower() in _AUTHORITY_SUFFIXES:
        segments.pop()
    return segments[-1] if segments else ""


def error_envelope(response: httpx.Response) -> tuple[str, str, str]:
    """(code, inner_code, message) from Key Vault's error body; empty strings when absent."""
    try:
        body = response.json()
    except ValueError:
        return "", "", ""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return "", "", ""
    inner = err.get("innererror")
    inner_code = ""
    # innererror nests; the innermost code is the most specific one.
    while isinstance(inner, dict):
        inner_code = str(inner.get("code") or inner_code)
        inner = inner.get("innererror")
    return str(err.get("code") or ""), inner_code, str(err.get("message") or "")


def _log_request(url: httpx.URL, outcome: int | str, started: float) -> None:
    """At DEBUG, one line per Key Vault request: never a header, a body or the query."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    ms = round((time.perf_counter() - started) * 1000, 1)
    fields: dict[str, object] = {"method": "GET", "path": url.path, "duration_ms": ms}
    fields["status" if isinstance(outcome, int) else "code"] = outcome
    log.debug("GET %s -> %s (%.0f ms)", url.path, outcome, ms, extra=fields)


class VaultClient:
    """Reads secrets, keys and certificates (and their version lists) from one vault."""

    def __init__(
        self,
        vault_url: str,
        credential: Credential,
        scope: str,
        http: httpx.AsyncClient,
        *,
        api_version: str = "7.4",
        deadline: float = VAULT_OP_DEADLINE,
        tenant_id: str = "",
        retry: RetryPolicy = KEY_VAULT_RETRY,
    ) -> None:
        url = httpx.URL(vault_url)
        if url.scheme != "https" or not url.host:
            raise ConfigError(
                "vault URL",
                vault_url,
                "must be an https:// URL",
                "check keyvaultName and the cloud's keyVaultDNSSuffix",
            )
        self._base = str(url.copy_with(path="/", query=None, fragment=None)).rstrip("/")
        self._origin = origin(url)
        self.vault = url.host
        self._credential = credential
        self._scope = scope
        self._http = http
        self._api_version = api_version
        self._deadline = deadline
        self._tenant_id = tenant_id
        self._retry = retry
        self.request_counts: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        return f"VaultClient({self._base!r}, api_version={self._api_version!r})"

    # -- public API -------------------------------------------------------------------------

    async def get(self, kind: ObjectType, name: str, version: str = "") -> dict[str, Any]:
        """The bundle of one object: its latest version, or `version`."""
        path = f"/{_COLLECTION[kind]}/{_segment(name)}" + (f"/{_segment(version)}" if version else "")
        url = httpx.URL(self._base + path, params={"api-version": self._api_version})
        what = f"{kind} '{name}'" + (f" version {version}" if version else "")
        deadline = trio.current_time() + self._deadline
        answer = await self._request(kind, f"get_{_ROUTE_NOUN[kind]}", url, what, deadline)
        return check_bundle(kind, answer, what)

    async def list_versions(self, kind: ObjectType, name: str) -> list[dict[str, Any]]:
        """All version items of one object, following nextLink through empty pages."""
        route = f"list_{_ROUTE_NOUN[kind]}_versions"
        what = f"{kind} '{name}' versions"
        deadline = trio.current_time() + self._deadline
        url: httpx.URL | None = httpx.URL(
            f"{self._base}/{_COLLECTION[kind]}/{_segment(name)}/versions",
            params={"api-version": self._api_version, "maxresults": "25"},
        )
        items: list[dict[str, Any]] = []
        seen: set[str] = set()
        while url is not None:
            if len(seen) >= MAX_PAGES or str(url) in seen:
                why = "nextLink repeats" if str(url) in seen else f"over {MAX_PAGES} pages"
                raise VaultError(f"{what}: Key Vault paging did not end ({why})", status=0, code="PagingLoop")
            seen.add(str(url))
            page, link = check_page(await self._request(kind, route, url, what, deadline), what)
            items.extend(page)
            url = self._next_link(link, what)
        return items

    # -- internals --------------------------------------------------------------------------

    def _next_link(self, link: object, what: str) -> httpx.URL | None:
        if link is None or link == "":
            return None
        try:
            url = httpx.URL(str(link))
        except (httpx.InvalidURL, ValueError):
            raise VaultError(f"{what}: Key Vault sent an invalid nextLink", code="BadNextLink") from None
        if origin(url) != self._origin:
            # Never send the vault token to another host (private link / custom DNS rewrites).
            raise VaultError(
                f"{what}: Key Vault's nextLink points to {url.scheme}://{url.host}, not to the vault"
                f" {self.vault}; refusing to send the token there (check private endpoint / DNS setup)",
                code="ForeignNextLink",
            )
        # Like the Azure SDK: Key Vault's links carry a stale api-version; ask in ours.
        return url.copy_set_param("api-version", self._api_version)

    async def _token(self, *, fresh: bool = False) -> str:
        if fresh and isinstance(self._credential, InvalidatingCredential):
            result = self._credential.invalidate(self._scope)
            if inspect.isawaitable(result):
                await result
        return (await self._credential.get_token(self._scope)).token

    async def _request(self, kind: str, route: str, url: httpx.URL, what: str, deadline: float) -> object:
        response = await self._send(route, url, what, deadline, fresh=False)
        if response.status_code == 401:
            tenant = challenge_tenant(response.headers.get("www-authenticate", ""))
            if tenant and self._tenant_id and tenant.lower() != self._tenant_id.lower():
                code, inner, _ = error_envelope(response)
                log.debug("vault=%s object=%s status=401 code=%s tenant=%s", self.vault, what, code, tenant)
                raise VaultError(
                    f"{what}: vault {self.vault} belongs to tenant {tenant}, but the token is from tenant"
                    f" {self._tenant_id} (set the SecretProviderClass parameter tenantID to {tenant})",
                    status=401,
                    code=code or "Unauthorized",
                    inner_code=inner,
                )
            log.debug("vault=%s object=%s status=401: refreshing the token once", self.vault, what)
            response = await self._send(route, url, what, deadline, fresh=True)
        if response.status_code == 200:
            try:
                return response.json()
            except ValueError:
                raise VaultError(
                    f"{what}: Key Vault answered with invalid JSON", status=200, code="BadResponse"
                ) from None
        raise self._error(response, kind, what)

    async def _send(
        self, route: str, url: httpx.URL, what: str, deadline: float, *, fresh: bool
    ) -> httpx.Response:
        first = True

        async def attempt() -> httpx.Response:
            nonlocal first
            token = await self._token(fresh=fresh and first)
            first = False
            self.request_counts[route] += 1
            request = self._http.build_request(
                "GET", url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"}
            )
            started = time.perf_counter()
            outcome: int | str = "cancelled"
            try:
                response = await body.send(self._http, request, cap=body.VAULT_BODY_CAP, what=f"vault {self.vault}")
                outcome = response.status_code
                return response
            except Exception as exc:
                outcome = error_code(exc)
                raise
            finally:
                _log_request(url, outcome, started)

        try:
            return await self._retry.run(attempt, deadline=deadline, what=f"{self.vault} {route} {what}")
        except body.BodyError as exc:
            log.debug("vault=%s object=%s code=%s", self.vault, what, exc.code)
            raise VaultError(f"{what}: {exc}", status=0, code=exc.code) from None
        except DeadlineExceeded:
            log.debug("vault=%s object=%s code=Timeout", self.vault, what)
            raise VaultError(
                f"{what}: no answer from vault {self.vault} (or from Entra ID for its token) within"
                f" {self._deadline:g} s",
                code="Timeout",
            ) from None
        except httpx.HTTPError as exc:
            code = "TLSVerifyFailed" if is_tls_verification_error(exc) else type(exc).__name__
            log.debug("vault=%s object=%s code=%s", self.vault, what, code)
            if code == "TLSVerifyFailed":
                msg = (
                    f"{what}: the TLS certificate of {self.vault} is not trusted"
                    " (add its CA to the file named by SSL_CERT_FILE)"
                )
            elif isinstance(exc, HostUnreachable):
                msg = f"{what}: vault {exc}"
            else:
                msg = f"{what}: cannot reach vault {self.vault} ({code}: {exc})"
            raise no_cooldown_if_down(VaultError(msg, code=code), exc) from None

    def _error(self, response: httpx.Response, kind: str, what: str) -> VaultError:
        status = response.status_code
        code, inner, message = error_envelope(response)
        retry_after = self._retry.retry_after(response)
        log.debug("vault=%s object=%s status=%d code=%s inner=%s", self.vault, what, status, code, inner)
        detail = f"{code or 'HTTP ' + str(status)}" + (f"/{inner}" if inner else "")
        if status == 404 and code == VAULT_NOT_FOUND:
            text = f"{what}: vault {self.vault} does not exist ({detail}; check keyvaultName)"
        elif status == 404:
            fix = "check objectName, objectType and objectVersion"
            text = f"{what}: not found in vault {self.vault} ({detail}; {fix})"
        elif status == 403:
            fix = self._fix_403(kind, inner, message)
            text = f"{what}: access denied by vault {self.vault} ({detail}): {message}; {fix}"
        elif status == 401:
            text = (
                f"{what}: vault {self.vault} rejected the token ({detail}): {message};"
                " check tenantID and that the identity's token is for the vault's cloud"
            )
        elif status == 429:
            text = f"{what}: vault {self.vault} is throttling requests ({detail}); retried until the deadline"
        elif status >= 500 or status == 408:
            text = f"{what}: vault {self.vault} is failing ({detail}); retried until the deadline"
        else:
            text = f"{what}: vault {self.vault} refused the request ({detail}): {message}"
        return VaultError(text, status=status, code=code, inner_code=inner, retry_after=retry_after)

    def _fix_403(self, kind: str, inner: str, message: str) -> str:
        """Branch on the inner-code family, not exact codes (AccessDenied/ForbiddenByPolicy vary)."""
        lowered = inner.lower()
        role = _RBAC_ROLE.get(kind, "Key Vault Secrets User")
        if "disabled" in lowered or "disabled" in message.lower():
            return "enable the object (or its version) in Key Vault, or pin an enabled objectVersion"
        if "rbac" in lowered:
            return f'grant the identity the role "{role}" on the vault'
        if "firewall" in lowered or "connection" in lowered:
            return "allow this node's network in the vault's firewall, or use its private endpoint"
        noun = _COLLECTION.get(kind, "secrets")
        return (
            f"grant the identity get (and list, for objectVersionHistory) permission on {noun}"
            f' in the vault\'s access policy, or the role "{role}"'
        )
