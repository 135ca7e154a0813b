"""Emulated identity services: one Entra ID tenant, a Kubernetes-like OIDC issuer, IMDS and NMI.

`IdentityProvider` is the tenant's directory (app registrations, managed identities, federated
credentials, pod bindings) plus the keys that sign its tokens. The HTTP surface lives in
`entra` (token endpoint + Entra discovery), `oidc` (the cluster issuer) and `imds` (IMDS + NMI);
the vault half of the emulator calls `verify_access_token` for every request.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
from starlette.routing import BaseRoute

from kvfs.emulator.oidc import OidcIssuer, SigningKey

log = logging.getLogger(__name__)

WORKLOAD_AUDIENCE = "api://AzureADTokenExchange"
MAX_FICS_PER_APP = 20  # Entra's limit per app registration / user-assigned identity
_SUBSCRIPTION = "00000000-0000-0000-0000-00000000c0de"
_RESOURCE_GROUP = "kvfs-emulator"


@dataclass
class FederatedCredential:
    """A token from `issuer` with this `subject` and `audience` may sign in as the app."""

    issuer: str
    subject: str
    audience: str = WORKLOAD_AUDIENCE


@dataclass
class App:
    """An app registration or a managed identity (a service principal of the tenant)."""

    client_id: str
    client_secret: str | None = field(repr=False)
    object_id: str
    display_name: str
    federated: list[FederatedCredential] = field(default_factory=list)
    managed: bool = False
    system_assigned: bool = False
    resource_id: str = ""  # ARM id of a managed identity (IMDS `msi_res_id` selector)


@dataclass(frozen=True)
class Principal:
    """Who an access token speaks for, as the vault sees it."""

    client_id: str
    object_id: str
    tenant_id: str


class TokenRejected(Exception):
    """An access token the vault must refuse with 401; `message` is Key Vault's wording."""

    def __init__(self, message: str, akv_code: str) -> None:
        super().__init__(message)
        self.message = message
        self.akv_code = akv_code


class IdentityProvider:
    """One emulated tenant: directory, signing keys, token minting and the identity routes.

    Mutating methods take a lock, so tests may reconfigure the tenant from another thread
    while the server runs. `clock` (default `time.time`) stamps and checks every JWT; tests
    may replace it to shift time.
    """

    tenant_id: str
    default_app: App
    outage: bool
    on_request: Callable[[str, str], None] | None

    def __init__(
        self,
        *,
        authority_host: str,
        tenant_id: str,
        kv_resource: str,
        oidc_issuer: str,
        token_lifetime: int = 3600,
        saved: dict[str, Any] | None = None,
    ) -> None:
        """`saved` (from `to_state`) brings back the signing keys, default app and managed identities."""
        self._lock = threading.RLock()
        self.authority_host = authority_host.rstrip("/")
        self.tenant_id = tenant_id
        self.kv_resource = kv_resource
        self.oidc_issuer = oidc_issuer
        self.token_lifetime = token_lifetime
        self.outage = False
        self.outage_retry_after: int | None = None  # seconds for Retry-After while `outage`
        self.refined_fic_errors = False  # True: AADSTS700211/700212/700213 instead of 70021
        self.answered_lifetime: int | None = None  # the expires_in Entra ID answers, whatever the token's own (an odd IdP)
        self.on_request = None
        self.clock: Callable[[], float] = time.time
        self.entra_key = SigningKey("kvfs-emulator-sts", saved=saved["entra_key"] if saved else None)
        self.oidc = OidcIssuer(oidc_issuer, saved["sa_key"] if saved else None)
        self._apps: dict[str, App] = {}
        self._pods: dict[tuple[str, str], str | None] = {}
        if saved is None:
            self.default_app = self.add_app()
            self._default_user_assigned = self.add_managed_identity()
        else:
            app = saved["default_app"]
            self.default_app = self.add_app(app["client_id"], secret=app["client_secret"], object_id=app["object_id"])
            for mi in saved["managed_identities"]:
                self.add_managed_identity(mi["client_id"], system=bool(mi["system"]), object_id=mi["object_id"])
            self._default_user_assigned = next(a for a in self.managed_identities() if not a.system_assigned)
        self.default_app.display_name = "kvfs-emulator-app"
        self.add_federated_credential(
            self.default_app.client_id,
            issuer=oidc_issuer,
            subject="system:serviceaccount:default:workload",
        )

    def __repr__(self) -> str:
        return f"IdentityProvider(tenant_id={self.tenant_id!r}, authority_host={self.authority_host!r})"

    # ---- directory -------------------------------------------------------------------------

    def add_app(
        self, client_id: str | None = None, *, secret: str | None = None, object_id: str | None = None
    ) -> App:
        """Register an app. `secret=None` generates a client secret; `secret=""` gives none."""
        if secret is None:
            secret = secrets.token_urlsafe(30)
        app = App(
            client_id=client_id or str(uuid.uuid4()),
            client_secret=secret or None,
            object_id=object_id or str(uuid.uuid4()),
            display_name="",
        )
        app.display_name = f"app-{app.client_id[:8]}"
        self._register(app)
        return app

    def add_managed_identity(
        self, client_id: str | None = None, *, system: bool = False, object_id: str | None = None
    ) -> App:
        """Add a user-assigned (default) or the VM's system-assigned identity to IMDS."""
        cid = client_id or str(uuid.uuid4())
        arm = f"/subscriptions/{_SUBSCRIPTION}/resourceGroups/{_RESOURCE_GROUP}/providers"
        if system:
            name = "kvfs-emulator-vm"
            resource_id = f"{arm}/Microsoft.Compute/virtualMachines/{name}"
        else:
            name = f"kvfs-emulator-identity-{cid[:8]}"
            resource_id = f"{arm}/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
        app = App(
            client_id=cid,
            client_secret=None,
            object_id=object_id or str(uuid.uuid4()),
            display_name=name,
            managed=True,
            system_assigned=system,
            resource_id=resource_id,
        )
        with self._lock:
            if system and any(a.system_assigned for a in self._apps.values()):
                raise ValueError("the emulated VM already has a system-assigned identity")
            self._register(app)
        return app

    def _register(self, app: App) -> None:
        with self._lock:
            key = app.client_id.lower()
            if key in self._apps:
                raise ValueError(f"client id {app.client_id!r} is already registered")
            self._apps[key] = app

    def add_federated_credential(
        self, client_id: str, *, issuer: str, subject: str, audience: str = WORKLOAD_AUDIENCE
    ) -> None:
        """Trust tokens from `issuer` for `subject`/`audience` (matched exactly, case-sensitive)."""
        with self._lock:
            app = self._require(client_id)
            if app.managed and app.system_assigned:
                raise ValueError("system-assigned identities cannot carry federated credentials")
            if len(app.federated) >= MAX_FICS_PER_APP:
                raise ValueError(f"{client_id}: at most {MAX_FICS_PER_APP} federated credentials")
            if any(f.issuer == issuer and f.subject == subject for f in app.federated):
                raise ValueError(f"{client_id}: a federated credential for {issuer} {subject} exists")
            app.federated.append(FederatedCredential(issuer, subject, audience))

    def bind_pod(self, namespace: str, pod: str, client_id: str | None) -> None:
        """NMI: serve `namespace/pod` with `client_id`'s identity; None unbinds it (404)."""
        with self._lock:
            if client_id is not None:
                self._require(client_id)
            self._pods[(namespace, pod)] = client_id

    def federated_credentials(self, app: App) -> list[FederatedCredential]:
        """A snapshot of `app`'s FICs, safe to iterate while another thread adds some."""
        with self._lock:
            return list(app.federated)

    def find_app(self, client_id: str) -> App | None:
        with self._lock:
            return self._apps.get(client_id.lower())

    def _require(self, client_id: str) -> App:
        app = self._apps.get(client_id.lower())
        if app is None:
            raise ValueError(f"unknown client id {client_id!r}")
        return app

    @property
    def default_managed_identity(self) -> App:
        """What IMDS serves without a selector and NMI serves unbound pods: the VM's
        system-assigned identity once added, else the user-assigned one made at start."""
        with self._lock:
            system = [a for a in self._apps.values() if a.system_assigned]
            return system[0] if system else self._default_user_assigned

    def to_state(self) -> dict[str, Any]:
        """What an emulator restart keeps of the tenant: signing keys, default app, managed identities.

        Apps, federated credentials and pod bindings added later through the Python API are not kept.
        """
        with self._lock:
            app = self.default_app
            return {
                "entra_key": self.entra_key.to_state(),
                "sa_key": self.oidc.key.to_state(),
                "default_app": {
                    "client_id": app.client_id, "client_secret": app.client_secret, "object_id": app.object_id,
                },
                "managed_identities": [
                    {"client_id": a.client_id, "object_id": a.object_id, "system": a.system_assigned}
                    for a in self.managed_identities()
                ],
            }

    def managed_identities(self) -> list[App]:
        with self._lock:
            return [a for a in self._apps.values() if a.managed]

    def pod_identity(self, namespace: str, pod: str) -> App | None:
        """The identity NMI serves for a pod: its binding, else the default managed identity."""
        with self._lock:
            if (namespace, pod) in self._pods:
                cid = self._pods[(namespace, pod)]
                return None if cid is None else self._apps.get(cid.lower())
            return self.default_managed_identity

    # ---- tokens ----------------------------------------------------------------------------

    def mint_sa_token(
        self,
        namespace: str,
        service_account: str,
        *,
        audience: str = WORKLOAD_AUDIENCE,
        lifetime: int = 3600,
        issuer: str | None = None,
        pod: str | None = None,
    ) -> str:
        """A projected service account token from the cluster issuer (RS256, kubelet shape)."""
        return self.oidc.mint(
            namespace,
            service_account,
            audience=audience,
            lifetime=lifetime,
            issuer=issuer,
            now=self.clock(),
            pod=pod,
        )

    @property
    def sts_issuer(self) -> str:
        return f"https://sts.windows.net/{self.tenant_id}/"

    def mint_access_token(
        self,
        client_id: str,
        resource: str | None = None,
        *,
        lifetime: int | None = None,
        tenant_id: str | None = None,
        appidacr: str = "1",
    ) -> str:
        """An Entra v1 access token for `client_id` (for tests that skip the HTTP exchange)."""
        app = self.find_app(client_id)
        if app is None:
            raise ValueError(f"unknown client id {client_id!r}")
        token, _, _ = self.issue_access_token(
            app, resource or self.kv_resource, appidacr=appidacr, lifetime=lifetime, tenant_id=tenant_id
        )
        return token

    def issue_access_token(
        self,
        app: App,
        resource: str,
        *,
        appidacr: str,
        lifetime: int | None = None,
        tenant_id: str | None = None,
    ) -> tuple[str, int, int]:
        """Sign a v1 access token (KVDOCS shape); returns (token, issued_at, expires_on)."""
        tid = tenant_id or self.tenant_id
        iss = f"https://sts.windows.net/{tid}/"
        now = int(self.clock())
        exp = now + (self.token_lifetime if lifetime is None else lifetime)
        claims: dict[str, Any] = {
            "aud": resource,
            "iss": iss,
            "iat": now,
            "nbf": now,
            "exp": exp,
            "aio": secrets.token_urlsafe(16),
            "appid": app.client_id,
            "appidacr": appidacr,
            "idp": iss,
            "idtyp": "app",
            "oid": app.object_id,
            "rh": secrets.token_urlsafe(12),
            "sub": app.object_id,
            "tid": tid,
            "uti": secrets.token_urlsafe(16),
            "ver": "1.0",
        }
        if app.managed:
            claims["xms_mirid"] = app.resource_id
        return self.entra_key.sign(claims), now, exp

    def verify_access_token(self, token: str, *, audience: str) -> Principal:
        """Check a bearer token the way Key Vault does; raises `TokenRejected` (no token text)."""
        if not token:
            raise TokenRejected("AKV10000: Request is missing a Bearer or PoP token.", "AKV10000")
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise TokenRejected("AKV10001: The bearer token is malformed.", "AKV10001") from None
        if header.get("kid") != self.entra_key.kid or header.get("alg") != "RS256":
            raise TokenRejected(
                "AKV10046: Unable to resolve the key used for signature validation.", "AKV10046"
            )
        try:
            claims = jwt.decode(
                token,
                self.entra_key.public_key,
                algorithms=["RS256"],
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False},
            )
        except jwt.PyJWTError:
            raise TokenRejected("AKV10047: Signature validation failed.", "AKV10047") from None
        expected_issuers = [
            self.sts_issuer,
            f"{self.authority_host}/{self.tenant_id}/",
            f"{self.authority_host}/{self.tenant_id}/v2.0",
        ]
        iss = claims.get("iss")
        if iss not in expected_issuers or str(claims.get("tid", "")).lower() != self.tenant_id.lower():
            raise TokenRejected(
                f"AKV10032: Invalid issuer. Expected one of {', '.join(expected_issuers)}, found {iss}.",
                "AKV10032",
            )
        aud = claims.get("aud")
        if not isinstance(aud, str) or aud.rstrip("/") != audience.rstrip("/"):
            raise TokenRejected(f"AKV10022: Invalid audience. Expected {audience}, found: {aud}.", "AKV10022")
        now = self.clock()
        try:
            exp, nbf = float(claims["exp"]), float(claims.get("nbf", 0))
        except (KeyError, TypeError, ValueError):
            raise TokenRejected("AKV10001: The bearer token is malformed.", "AKV10001") from None
        if now >= exp:
            raise TokenRejected("[TokenExpired] Error validating token: 'S2S12086'.", "TokenExpired")
        if now < nbf:
            raise TokenRejected("[TokenNotYetValid] Token not yet valid.", "TokenNotYetValid")
        return Principal(
            client_id=str(claims.get("appid", "")),
            object_id=str(claims.get("oid", "")),
            tenant_id=str(claims["tid"]),
        )

    # ---- HTTP ------------------------------------------------------------------------------

    def notify(self, route: str, client_id: str) -> None:
        """Report one request to `on_request`; a failing hook never fails the request."""
        hook = self.on_request
        if hook is None:
            return
        try:
            hook(route, client_id)
        except Exception:  # a test hook must not break the emulator
            log.exception("on_request hook failed")

    def https_routes(self) -> list[BaseRoute]:
        """Entra ID and the cluster OIDC issuer, paths relative to the authority root."""
        from kvfs.emulator import entra

        # The issuer's fixed paths go first: `/{tenant}/...` patterns would swallow them.
        return self.oidc.routes() + entra.routes(self)

    def http_routes(self) -> list[BaseRoute]:
        """IMDS (`/metadata/identity/oauth2/token`) and NMI (`/host/token/`)."""
        from kvfs.emulator import imds

        return imds.routes(self)
