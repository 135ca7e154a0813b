"""Turn Entra ID / IMDS / NMI error responses into one actionable `AuthError`.

Users debug identity problems from a single log line or kubelet event, so each message names
what kvfs presented (tenant, client id, assertion issuer/subject/audience, ...) and what to fix.
Entra errors branch on `error_codes` (descriptions change); IMDS and NMI have no codes, so they
branch on status and well-known description texts. Nothing here ever sees a token or secret:
callers pass only claims and ids, and every service-provided text goes through `safe_text`.
"""

from __future__ import annotations

import errno as _errno
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kvfs.config.parameters import WORKLOAD_IDENTITY_AUDIENCE as DEFAULT_AUDIENCE
from kvfs.errors import AuthError
from kvfs.logsafe import JWT_PATTERN

_ECHO_RE = re.compile(r"Assertion (Issuer|Subject|Audience): '([^']*)'")
_MAX_TEXT = 300
_TRANSIENT_4XX = frozenset({408, 429})


def _errno_for(status: int) -> int:
    """Refusals (4xx) are EACCES; throttling, timeouts and server faults are EIO."""
    return _errno.EACCES if 400 <= status < 500 and status not in _TRANSIENT_4XX else _errno.EIO


def safe_text(text: object, secrets: Iterable[str] = ()) -> str:
    """First line of a service-provided text, bounded, with JWTs and known secrets removed."""
    s = str(text or "").strip()
    s = s.splitlines()[0].strip() if s else ""
    for secret in secrets:
        if secret:
            s = s.replace(secret, "<redacted>")
    s = JWT_PATTERN.sub("<redacted-jwt>", s)
    if len(s) > _MAX_TEXT:
        s = s[:_MAX_TEXT] + "..."
    return s


@dataclass(frozen=True)
class EntraContext:
    """What kvfs presented to Entra ID; used to name values in error messages (no secrets)."""

    flow: str  # "workload identity" / "service principal"
    authority_host: str
    tenant_id: str
    client_id: str
    scope: str
    # Unverified claims of the presented assertion (iss, sub, aud, exp, iat); empty for secrets.
    assertion_claims: Mapping[str, object] = field(default_factory=dict)


def _entra_codes(body: Mapping[str, object]) -> list[int]:
    codes = body.get("error_codes")
    out: list[int] = []
    if isinstance(codes, list):
        for c in codes:
            try:
                out.append(int(c))
            except (TypeError, ValueError):
                continue
    if not out:  # fall back to the AADSTS number at the start of the description
        m = re.search(r"AADSTS(\d+)", str(body.get("error_description", "")))
        if m:
            out.append(int(m.group(1)))
    return out


def _claim(ctx: EntraContext, name: str) -> str:
    value = ctx.assertion_claims.get(name, "")
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value) if value is not None else ""


def _presented(ctx: EntraContext, description: str) -> dict[str, str]:
    """Issuer/subject/audience: what Entra echoed, else what the assertion carried."""
    echoed = {k.lower(): v for k, v in _ECHO_RE.findall(description)}
    return {
        "issuer": echoed.get("issuer", _claim(ctx, "iss")),
        "subject": echoed.get("subject", _claim(ctx, "sub")),
        "audience": echoed.get("audience", _claim(ctx, "aud")),
    }


def _fic_fix(ctx: EntraContext, p: dict[str, str]) -> str:
    issuer = p["issuer"] or "<cluster OIDC issuer URL>"
    subject = p["subject"] or "system:serviceaccount:<namespace>:<serviceaccount>"
    audience = p["audience"] or DEFAULT_AUDIENCE
    return (
        "create a federated credential that matches exactly (case-sensitive, trailing '/' included): "
        f"for a user-assigned managed identity `az identity federated-credential create --name kvfs "
        f"--identity-name <identity name> --resource-group <resource group> --issuer '{issuer}' "
        f"--subject '{subject}' --audiences '{audience}'`; for an app registration "
        f"`az ad app federated-credential create --id {ctx.client_id} --parameters "
        f"'{{\"name\":\"kvfs\",\"issuer\":\"{issuer}\",\"subject\":\"{subject}\","
        f"\"audiences\":[\"{audience}\"]}}'`; compare with `az identity federated-credential list` / "
        f"`az ad app federated-credential list --id {ctx.client_id}`"
    )


def _audience_or_fic_fix(ctx: EntraContext, p: dict[str, str]) -> str:
    """A token minted for an unusual audience is more often the mistake than the credential."""
    if p.get("audience") and p["audience"] != DEFAULT_AUDIENCE:
        return (
            f"the service account token was issued for audience '{p['audience']}'; request it for"
            f" '{DEFAULT_AUDIENCE}' (CSIDriver tokenRequests / projected volume audience), or add"
            f" '{p['audience']}' to the credential's audiences: {_fic_fix(ctx, p)}"
        )
    return _fic_fix(ctx, p)


def entra_error(status: int, body: object, ctx: EntraContext, secrets: Iterable[str] = ()) -> AuthError:
    """Map one Entra ID token-endpoint error response to an AuthError."""
    secrets = tuple(secrets)
    who = f"{ctx.flow} client id '{ctx.client_id}' in tenant '{ctx.tenant_id}'"
    if not isinstance(body, Mapping):
        errno = _errno_for(status)
        return AuthError(
            f"Entra ID token request for {who} failed with HTTP {status} from {ctx.authority_host}"
            f" and no OAuth error body: {safe_text(body, secrets) or '(empty)'}"
            " (check the authority host: cloudName / cloudEnvFileName activeDirectoryEndpoint)",
            code=f"entra_http_{status}",
            errno=errno,
        )
    description = str(body.get("error_description", ""))
    first = safe_text(description, secrets)
    codes = _entra_codes(body)
    code_num = codes[0] if codes else 0
    code = f"AADSTS{code_num}" if code_num else str(body.get("error") or f"entra_http_{status}")
    errno = _errno_for(status)
    p = _presented(ctx, description)

    if code_num == 70021:
        msg = (
            f"Entra ID found no federated identity credential on {who} matching the service account"
            f" token: Assertion Issuer '{p['issuer']}', Subject '{p['subject']}', Audience"
            f" '{p['audience']}'. Fix: {_audience_or_fic_fix(ctx, p)}. A credential created in the"
            " last minutes may not have propagated yet; later reads retry."
        )
    elif code_num == 700211:
        msg = (
            f"Entra ID has no federated identity credential on {who} for the assertion issuer"
            f" '{p['issuer']}' (exact match; a missing or extra trailing '/' is the usual cause)."
            " Fix: set the credential's issuer to the cluster's OIDC issuer URL exactly, e.g. from"
            " `az aks show -n <cluster> -g <resource group> --query oidcIssuerProfile.issuerUrl -o tsv`"
            f"; {_fic_fix(ctx, p)}"
        )
    elif code_num == 700212:
        msg = (
            f"Entra ID has no federated identity credential on {who} for the assertion audience"
            f" '{p['audience']}'. Fix: {_audience_or_fic_fix(ctx, p)}"
        )
    elif code_num == 700213:
        msg = (
            f"Entra ID has no federated identity credential on {who} for the assertion subject"
            f" '{p['subject']}' (case-sensitive). Fix: the subject must be"
            " 'system:serviceaccount:<namespace>:<serviceaccount>' of the pod's service account;"
            f" {_fic_fix(ctx, p)}"
        )
    elif code_num == 700016:
        msg = (
            f"Entra ID: application '{ctx.client_id}' was not found in tenant '{ctx.tenant_id}'."
            " Fix: set clientID to the identity's client (application) id, not its object or"
            " principal id (`az identity show -n <identity> -g <resource group> --query clientId`"
            f" or `az ad app show --id {ctx.client_id}`), and tenantID to the tenant that owns it;"
            " also check cloudName."
        )
    elif code_num == 7000215:
        msg = (
            f"Entra ID rejected the client secret of service principal '{ctx.client_id}' in tenant"
            f" '{ctx.tenant_id}'. Fix: 'clientsecret' in the nodePublishSecretRef secret (or"
            " --secrets file) must be the secret's Value, not its Secret ID, and not expired"
            f" (`az ad app credential list --id {ctx.client_id}`; create one with"
            f" `az ad app credential reset --id {ctx.client_id} --append`)."
        )
    elif code_num == 700024:
        times = ""
        if "exp" in ctx.assertion_claims or "iat" in ctx.assertion_claims:
            times = f" (presented token iat={_claim(ctx, 'iat')} exp={_claim(ctx, 'exp')}, Unix seconds)"
        msg = (
            f"Entra ID: the service account token presented for {who} is not within its valid time"
            f" range{times}. Fix: check the node's clock (NTP / clock skew) and that kubelet"
            " refreshes the projected token (a token copied once and kept expires)."
        )
    elif code_num == 90002:
        msg = (
            f"Entra ID at {ctx.authority_host}: tenant '{ctx.tenant_id}' not found. Fix: set"
            " tenantID to the directory (tenant) id that owns the identity"
            " (`az account show --query tenantId -o tsv`) and check cloudName: a tenant of"
            " another cloud is not found here."
        )
    elif code_num == 70011:
        msg = (
            f"Entra ID rejected the scope '{ctx.scope}' for {who}. Fix: check cloudName, or"
            " keyVaultEndpoint in the cloudEnvFileName file (the Key Vault resource, without"
            " trailing '/'; the scope is that resource + '/.default')."
        )
    elif code_num in (50166, 90061):
        issuer = p["issuer"] or "<issuer>"
        msg = (
            f"Entra ID could not fetch the OIDC discovery document or keys of the service account"
            f" token issuer '{issuer}' for {who}. Fix: '{issuer}/.well-known/openid-configuration'"
            " and its jwks_uri must be publicly reachable over HTTPS (AKS:"
            " `az aks update -n <cluster> -g <resource group> --enable-oidc-issuer`)."
        )
    else:
        msg = (
            f"Entra ID refused the token request for {who} (HTTP {status}"
            f"{', ' + code if code else ''}): {first or safe_text(body.get('error'), secrets)}"
        )
    return AuthError(msg, code=code, errno=errno)


def imds_error(
    status: int, body: object, *, base_url: str, client_id: str | None, secrets: Iterable[str] = ()
) -> AuthError:
    """Map an IMDS error response (status >= 400) to an AuthError."""
    which = f"user-assigned identity '{client_id}'" if client_id else "the system-assigned identity"
    error = description = ""
    if isinstance(body, Mapping):
        error = safe_text(body.get("error"), secrets)
        description = safe_text(body.get("error_description"), secrets)
    else:
        description = safe_text(body, secrets)
    lowered = description.lower()
    if "identity not found" in lowered:
        return AuthError(
            f"IMDS at {base_url}: {which} is not assigned to this VM/VMSS (Identity not found)."
            " Fix: set userAssignedIdentityID to the client id of an identity assigned to the node"
            " pool (`az vmss identity show -g <node resource group> -n <vmss>`), or assign it with"
            " `az vmss identity assign -g <node resource group> -n <vmss> --identities <identity"
            " resource id>`.",
            code="imds_identity_not_found",
            errno=_errno.EACCES,
        )
    if "multiple user assigned identities" in lowered:
        return AuthError(
            f"IMDS at {base_url}: this VM/VMSS has several user-assigned identities and none was"
            " chosen. Fix: set userAssignedIdentityID to the client id of the one to use.",
            code="imds_multiple_identities",
            errno=_errno.EACCES,
        )
    detail = ": ".join(x for x in (error, description) if x) or "(no details)"
    if status in (404, 410, 429) or status >= 500:
        return AuthError(
            f"IMDS at {base_url} is unavailable for {which} (HTTP {status}: {detail}) after retries;"
            " it is usually updating or throttling, kvfs retries later.",
            code=f"imds_{status}",
            errno=_errno.EIO,
        )
    return AuthError(
        f"IMDS at {base_url} refused a token for {which} (HTTP {status}: {detail}). Fix: check"
        " userAssignedIdentityID and that the identity has access to the vault.",
        code=f"imds_{error or status}",
        errno=_errno.EACCES,
    )


def imds_unreachable(base_url: str, reason: str) -> AuthError:
    """IMDS did not answer at all: most likely not an Azure VM or no host network."""
    return AuthError(
        f"cannot reach IMDS at {base_url} ({reason}): is this a VM/VMSS with a managed identity?"
        " Pods need hostNetwork or a route to 169.254.169.254; AZURE_POD_IDENTITY_AUTHORITY_HOST"
        " overrides the URL.",
        code="imds_unreachable",
        errno=_errno.EIO,
    )


def nmi_error(
    status: int, body: object, *, base_url: str, pod: str, secrets: Iterable[str] = ()
) -> AuthError:
    """Map an NMI (aad-pod-identity) failure; keeps upstream's wording first for grep-ability."""
    text = safe_text(body, secrets) or "(empty)"
    errno = _errno_for(status)
    return AuthError(
        f"nmi response failed with status code: {status}, response body: {text} (NMI at"
        f" {base_url}, pod {pod}). Fix: check that an AzureIdentityBinding selects this pod and"
        " that NMI runs on the node; pod identity is deprecated, prefer workload identity"
        " (clientID).",
        code=f"nmi_{status}",
        errno=errno,
    )


def nmi_bad_response(base_url: str) -> AuthError:
    return AuthError(
        "nmi did not return expected values in response: token and clientid"
        f" (NMI at {base_url}; is that aad-pod-identity's NMI?)",
        code="nmi_bad_response",
        errno=_errno.EIO,
    )


def nmi_unreachable(base_url: str, reason: str) -> AuthError:
    return AuthError(
        f"cannot reach NMI at {base_url} ({reason}): is aad-pod-identity installed and its NMI"
        " pod running on this node? (KVFS_NMI_URL overrides the URL)",
        code="nmi_unreachable",
        errno=_errno.EIO,
    )
