"""Workstation credential: azure-identity's DefaultAzureCredential (az login, env, VS Code, ...).

azure-identity's async credentials are asyncio-only (kvfs runs on trio), so the *sync* credential runs
in a worker thread. Only used by `kvfs mount` on a workstation; pods use the httpx flows.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import trio

from kvfs.auth.base import AccessToken
from kvfs.auth.messages import safe_text
from kvfs.config.model import CloudConfig
from kvfs.errors import AuthError
from kvfs.logsafe import JWT_PATTERN
from kvfs.net.http import make_ssl_context

log = logging.getLogger(__name__)

# Hosts MSAL knows without asking login.microsoftonline.com (instance discovery).
_PUBLIC_AUTHORITY_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.windows.net",
        "login.chinacloudapi.cn",
        "login.partner.microsoftonline.cn",
        "login.microsoftonline.us",
        "login-us.microsoftonline.com",
        "login.microsoftonline.de",
    }
)


_ATTEMPTED = "Attempted credentials:"
_MITIGATE = "\nTo mitigate this issue"
_ENTRY = re.compile(r"(\w+)(?:: ?(.*))?", re.S)
_UNAVAILABLE = re.compile(r"^\w+ (authentication )?unavailable[.,:]?\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z'\"])")
_URL = re.compile(r"https?://\S+")
_ADVICE = re.compile(r"troubleshoot|\bvisit\b|\bsee the\b|for more information|you must also", re.I)
_CLAUSE_MAX = 90
_FALLBACK_MAX = 300


def _clause(name: str, why: str) -> str:
    """One credential's failure as one short clause: its first sentence that is neither a link
    nor advice, without the credential's name repeated."""
    why = " ".join(why.split()).removeprefix("ERROR: ")
    why = _UNAVAILABLE.sub("", why).removeprefix(name + " ").strip()
    sentences = [s for s in _SENTENCE_END.split(why) if not _URL.search(s) and not _ADVICE.search(s)]
    clause = (sentences[0] if sentences else _URL.sub("", why)).strip().rstrip(".")
    if len(clause) > _CLAUSE_MAX:
        clause = clause[: _CLAUSE_MAX - 3].rstrip() + "..."
    return clause or "unavailable"


def summarize_chain_error(text: str) -> str:
    """azure-identity's chain message (about 2 KB: every credential's reasons, links, advice) cut
    to `tried A: why; B: why`; any other text one line, truncated.

    The chain keeps its per-credential errors only in that text: "Attempted credentials:", then
    "\\n\\t<credential>: <error>" per credential (an error may span lines), then a closing
    "To mitigate this issue" paragraph.
    """
    _, found, attempts = text.partition(_ATTEMPTED)
    entries = [_ENTRY.fullmatch(item.strip()) for item in attempts.split(_MITIGATE)[0].split("\n\t")[1:]]
    if found and entries and all(entries):
        return "tried " + "; ".join(f"{m.group(1)}: {_clause(m.group(1), m.group(2) or '')}" for m in entries if m)
    one_line = " | ".join(line.strip() for line in text.splitlines() if line.strip()).rstrip(".")
    return one_line if len(one_line) <= _FALLBACK_MAX else one_line[:_FALLBACK_MAX] + "..."


def _host(authority: str) -> str:
    parsed = urlparse(authority if "://" in authority else "https://" + authority)
    return (parsed.hostname or "").lower()


class _TrustingChain:
    """DefaultAzureCredential whose HTTP trusts what kvfs trusts: system CAs plus `SSL_CERT_FILE`.

    azure-identity talks through `requests`, which trusts only certifi (or REQUESTS_CA_BUNDLE)
    and ignores SSL_CERT_FILE, so a private authority (Azure Stack, the emulator) failed TLS.
    """

    def __init__(self, **kwargs: Any) -> None:
        import requests
        from azure.core.pipeline.transport import RequestsTransport
        from azure.identity import DefaultAzureCredential
        from urllib3.util.retry import Retry

        ssl_context = make_ssl_context()

        class TrustingAdapter(requests.adapters.HTTPAdapter):
            def init_poolmanager(self, *args: Any, **kw: Any) -> None:
                kw["ssl_context"] = ssl_context
                super().init_poolmanager(*args, **kw)

            def proxy_manager_for(self, proxy: str, **kw: Any) -> Any:
                kw["ssl_context"] = ssl_context
                return super().proxy_manager_for(proxy, **kw)

        self._session = requests.Session()
        # azure-core's retry policy retries; urllib3 must not (as in azure-core's own adapter)
        adapter = TrustingAdapter(max_retries=Retry(total=False, redirect=False, raise_on_status=False))
        for prefix in ("https://", "http://"):
            self._session.mount(prefix, adapter)
        # Not the owner: every credential of the chain shares the session; close() closes it.
        transport = RequestsTransport(session=self._session, session_owner=False)
        self._credential = DefaultAzureCredential(transport=transport, **kwargs)

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        return self._credential.get_token(*scopes, **kwargs)

    def close(self) -> None:
        self._credential.close()
        self._session.close()


def _default_factory(**kwargs: Any) -> Any:
    if os.environ.get("SSL_CERT_FILE", "").strip():
        return _TrustingChain(**kwargs)
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(**kwargs)


class DefaultChainCredential:
    """DefaultAzureCredential in a worker thread, pointed at the configured cloud.

    AZURE_AUTHORITY_HOST, when set, wins over the cloud's authority (azure-identity reads it
    itself). For authorities outside the public Azure clouds, instance discovery is disabled so
    nothing calls login.microsoftonline.com (air-gapped Azure Stack, the emulator).
    """

    def __init__(
        self,
        cloud: CloudConfig,
        tenant_id: str,
        *,
        credential_factory: Callable[..., Any] | None = None,
    ) -> None:
        self.cloud = cloud
        self.tenant_id = tenant_id
        env_authority = os.environ.get("AZURE_AUTHORITY_HOST", "").strip()
        self.authority = env_authority or cloud.authority_host
        kwargs: dict[str, Any] = {
            "exclude_interactive_browser_credential": True,
            # the vault's tenant may differ from the signed-in home tenant
            "additionally_allowed_tenants": ["*"],
        }
        if not env_authority:
            kwargs["authority"] = cloud.authority_host
        if not cloud.is_public_azure or _host(self.authority) not in _PUBLIC_AUTHORITY_HOSTS:
            kwargs["disable_instance_discovery"] = True
        self.kwargs = kwargs
        self._factory = credential_factory or _default_factory
        self._credential: Any = None

    def __repr__(self) -> str:
        return f"DefaultChainCredential(authority={self.authority!r}, tenant_id={self.tenant_id!r})"

    def _get_sync(self, scope: str) -> tuple[str, float]:
        if self._credential is None:
            self._credential = self._factory(**self.kwargs)
        options: dict[str, Any] = {"tenant_id": self.tenant_id} if self.tenant_id else {}
        result = self._credential.get_token(scope, **options)
        return result.token, float(result.expires_on)

    async def get_token(self, scope: str) -> AccessToken:
        from azure.core.exceptions import AzureError, ClientAuthenticationError
        from azure.identity import CredentialUnavailableError

        try:
            token, expires_on = await trio.to_thread.run_sync(
                self._get_sync, scope, abandon_on_cancel=True
            )
        except CredentialUnavailableError as exc:
            raise AuthError(self._message("no workstation credential is available", exc),
                            code="default_chain_unavailable") from None
        except ClientAuthenticationError as exc:
            m = re.search(r"AADSTS(\d+)", str(exc))
            if m:
                code = f"AADSTS{m.group(1)}"
            elif "failed to retrieve a token from the included credentials" in str(exc):
                code = "default_chain_unavailable"  # every credential in the chain was unavailable
            else:
                code = "default_chain_failed"
            raise AuthError(self._message("workstation sign-in failed", exc), code=code) from None
        except (AzureError, ValueError, OSError) as exc:
            raise AuthError(self._message("workstation credential error", exc),
                            code="default_chain_error", errno=_errno.EIO) from None
        return AccessToken(
            token=token,
            expires_at=trio.current_time() + (expires_on - time.time()),
            issuer=f"azure-identity's default chain via {self.authority}",
        )

    def _message(self, what: str, exc: BaseException) -> str:
        text = JWT_PATTERN.sub("<redacted-jwt>", str(exc)).strip()
        log.debug("azure-identity's message: %s", text)
        return (
            f"{what} (DefaultAzureCredential, authority {self.authority}, tenant"
            f" {self.tenant_id or '-'}): {summarize_chain_error(text) or safe_text(type(exc).__name__)}. Fix: sign in"
            f" with `az login --tenant {self.tenant_id or '<tenantID>'}`, or set AZURE_CLIENT_ID/AZURE_TENANT_ID/"
            "AZURE_CLIENT_SECRET, or pass --secrets with clientid/clientsecret."
        )

    async def aclose(self) -> None:
        cred, self._credential = self._credential, None
        if cred is not None:
            await trio.to_thread.run_sync(cred.close)
