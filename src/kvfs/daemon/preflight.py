"""Identity preflight: the one token exchange a volume needs, made before it is mounted.

Laziness moved identity mistakes from mount time to read time: a wrong clientID, tenant, vault
name or CA still mounted, and the app got EACCES or EIO later while the cause sat in a daemon
log. So before a volume is served (CSI: before the daemon reports ready; `kvfs mount`: before
mounting) it gets its Key Vault token, and sends one unauthenticated `GET /` to the vault host,
which proves the name resolves, the route works and the certificate is trusted without fetching
any object. The token stays in the volume's credential, so the first read pays nothing extra.

- A definitive answer fails the mount with the actionable message: Entra ID, IMDS or NMI refused
  the identity (unknown app or tenant, no matching federated credential, wrong client secret,
  identity not assigned), a host name does not exist (DNS NXDOMAIN), a TLS certificate is not
  trusted, the vault host serves no vault of that name (404 VaultNotFound: `kvfs emulator`, where
  in Azure the name would not resolve). In CSI the ready line carries it (`ready_line`) and the
  plugin fails the publish with `Refusal.grpc_code`, which kubelet shows as a pod event
  (`MountVolume.SetUp failed ...`).
- A transient one (a timeout, a 5xx, a refused connection, a host circuit already open, no answer
  within `PREFLIGHT_DEADLINE`) does not: the volume mounts, stays lazy, and its first read tries
  again (the failure is not remembered for the error cooldown).
"""

from __future__ import annotations

import errno as _errno
import logging
import re
import socket
from dataclasses import dataclass

import httpx
import trio

from kvfs.auth.cache import CachingCredential
from kvfs.errors import AuthError, KvfsError, error_code, is_tls_verification_error
from kvfs.net.body import BodyError, send
from kvfs.vault.client import VAULT_NOT_FOUND, error_envelope

log = logging.getLogger(__name__)

PREFLIGHT_DEADLINE = 5.0  # seconds a mount waits for the check before mounting anyway (publish timeouts are longer)
PROBE_BODY_CAP = 64 * 1024  # the vault root's answer is read (and dropped) up to this size

# The gRPC codes a refusal maps to (kubelet treats both as final: the publish failed, nothing mounted).
IDENTITY = "PERMISSION_DENIED"  # the identity provider refused the identity
ENDPOINT = "FAILED_PRECONDITION"  # a host name that does not exist, a certificate not trusted, bad settings
_CODES = (IDENTITY, ENDPOINT)
_REFUSAL_LINE = re.compile(r"\[([A-Z_]+)\] (.+)", re.DOTALL)
_NO_SUCH_NAME = {getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, name)}


@dataclass(frozen=True)
class Refusal:
    """Why a volume must not be mounted: the gRPC code, the service's error code, the message."""

    grpc_code: str  # IDENTITY or ENDPOINT
    code: str  # e.g. AADSTS70021, imds_identity_not_found, DNSNotFound, TLSVerifyFailed
    message: str  # names what was presented and the fix; safe by contract (no secret, no token)

    def __str__(self) -> str:
        return self.message


class PreflightError(KvfsError):
    """`kvfs mount`: the preflight refused the volume (exit status 1, the message on stderr)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal
        self.code = refusal.code
        self.errno = _errno.EACCES if refusal.grpc_code == IDENTITY else _errno.EIO


def ready_line(refusal: Refusal) -> str:
    """The daemon's ready line for a refusal: `error [CODE] message` (kvfs.daemon.volume)."""
    return f"error [{refusal.grpc_code}] {' '.join(refusal.message.split())}"


def parse_refusal(error: str) -> tuple[str, str] | None:
    """(gRPC code, message) if a daemon's start-up error is a preflight refusal, else None."""
    found = _REFUSAL_LINE.fullmatch(error.strip())
    if found is None or found.group(1) not in _CODES:
        return None
    return found.group(1), found.group(2)


def name_not_found(exc: BaseException) -> bool:
    """True when `exc` was caused by a host name that does not exist (not a DNS server that failed)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, socket.gaierror) and cur.errno in _NO_SUCH_NAME:
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _token_refusal(error: KvfsError) -> Refusal | None:
    """A definitive token failure as a Refusal; None for a transient one."""
    code = error_code(error)
    if code == "TLSVerifyFailed" or is_tls_verification_error(error):
        return Refusal(ENDPOINT, code, f"identity check failed before mounting ({code}): {error}")
    if name_not_found(error):
        return Refusal(
            ENDPOINT,
            "DNSNotFound",
            f"identity check failed before mounting (DNSNotFound): {error} (the host name does not"
            " exist: check cloudName, or activeDirectoryEndpoint in the cloudEnvFileName file)",
        )
    if isinstance(error, AuthError) and error.errno == _errno.EACCES:
        return Refusal(IDENTITY, code, f"identity check failed before mounting ({code}): {error}")
    if error.errno == _errno.EINVAL:  # a setting the credential could not use
        return Refusal(ENDPOINT, code, f"identity check failed before mounting ({code}): {error}")
    return None


def _vault_refusal(host: str, exc: Exception) -> Refusal | None:
    """A definitive failure to reach the vault host as a Refusal; None for a transient one."""
    if is_tls_verification_error(exc):
        return Refusal(
            ENDPOINT,
            "TLSVerifyFailed",
            f"vault check failed before mounting (TLSVerifyFailed): the TLS certificate of {host} is"
            " not trusted (add its CA to the file named by SSL_CERT_FILE)",
        )
    if name_not_found(exc):
        return Refusal(
            ENDPOINT,
            "DNSNotFound",
            f"vault check failed before mounting (DNSNotFound): the vault host {host} does not exist"
            " (check keyvaultName, and cloudName or keyVaultDNSSuffix in the cloudEnvFileName file)",
        )
    return None


class _Outcome:
    """What each half of the check found: a refusal, a transient failure's text, or nothing yet."""

    def __init__(self) -> None:
        self.refusal: Refusal | None = None
        self.transient: list[str] = []


async def _check_token(credential: CachingCredential, scope: str, outcome: _Outcome) -> None:
    try:
        await credential.get_token(scope, cooldown=False)
    except KvfsError as error:
        refusal = _token_refusal(error)
        if refusal is None:
            outcome.transient.append(f"token: {error_code(error)}: {error}")
        elif outcome.refusal is None or outcome.refusal.grpc_code != IDENTITY:
            outcome.refusal = refusal  # an identity refusal says more than an endpoint one


async def _check_vault(http: httpx.AsyncClient, vault_url: str, outcome: _Outcome) -> None:
    url = httpx.URL(vault_url).copy_with(path="/", query=None, fragment=None)
    request = http.build_request("GET", url, headers={"Accept": "application/json"})
    try:
        response = await send(http, request, cap=PROBE_BODY_CAP, what=f"vault {url.host}")
    except BodyError:
        return  # it answered: the host is there
    except httpx.HTTPError as exc:
        refusal = _vault_refusal(str(url.host), exc)
        if refusal is None:
            outcome.transient.append(f"vault {url.host}: {type(exc).__name__}")
        elif outcome.refusal is None:
            outcome.refusal = refusal
        return
    if response.status_code == 404 and error_envelope(response)[0] == VAULT_NOT_FOUND and outcome.refusal is None:
        outcome.refusal = Refusal(
            ENDPOINT,
            VAULT_NOT_FOUND,
            f"vault check failed before mounting ({VAULT_NOT_FOUND}): {url.host} serves no vault of that name"
            " (check keyvaultName)",
        )


async def check_volume(
    credential: CachingCredential,
    scope: str,
    vault_url: str,
    http: httpx.AsyncClient,
    *,
    deadline: float = PREFLIGHT_DEADLINE,
) -> Refusal | None:
    """Get the volume's token and reach its vault host, at once; a Refusal if either says no for good.

    Transient failures and the deadline return None (and are logged once): the mount goes ahead.
    """
    outcome = _Outcome()
    with trio.move_on_after(deadline) as scope_:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_check_token, credential, scope, outcome)
            nursery.start_soon(_check_vault, http, vault_url, outcome)
    if outcome.refusal is not None:
        log.info("preflight refused the volume: %s", outcome.refusal.code, extra={"code": outcome.refusal.code})
        return outcome.refusal
    if scope_.cancelled_caught:
        outcome.transient.append(f"no answer within {deadline:g} s")
    if outcome.transient:
        log.warning(
            "preflight could not finish (%s); mounting anyway: the first read tries again",
            "; ".join(outcome.transient),
        )
    else:
        log.debug("preflight: token and vault host OK")
    return None
