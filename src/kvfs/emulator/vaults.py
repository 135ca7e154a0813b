"""The emulated vaults' content: secrets, keys and certificates with versions, and who may read them.

In-memory state behind one `threading.RLock`: the trio server reads it and tests running the
emulator in a background thread mutate it. No method awaits, so holding the lock is always brief.
After every change the store calls `on_change(vault, version)` under that lock, for the vault
itself (version None: it is new or its grants changed) or each version added or updated, so the
emulator journals the changes in order (`state.py`).
JSON shapes are Key Vault's (bundles and list items as its REST API defines them: unset optional
fields absent, not null; attributes in integer Unix seconds); `docs/EMULATOR.md` lists them.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509

from . import pki

log = logging.getLogger(__name__)

Kind = Literal["secret", "key", "cert"]
RECOVERY_LEVEL = "Recoverable+Purgeable"
RECOVERABLE_DAYS = 90
MAX_SECRET_BYTES = 25 * 1024
RSA_OPS = ("encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey")
EC_OPS = ("sign", "verify")


class StoreError(Exception):
    """A store lookup or change the vault must refuse; the API layer maps it to Key Vault's envelope."""

    def __init__(self, status: int, code: str, message: str, inner: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.inner = inner


@dataclass
class Attributes:
    """Key Vault object attributes: integer Unix seconds, unset fields absent on the wire."""

    enabled: bool = True
    created: int = field(default_factory=lambda: int(time.time()))
    updated: int = 0
    nbf: int | None = None
    exp: int | None = None

    def __post_init__(self) -> None:
        if not self.updated:
            self.updated = self.created

    def to_json(self, **extra: object) -> dict[str, object]:
        out: dict[str, object] = {"enabled": self.enabled}
        if self.nbf is not None:
            out["nbf"] = self.nbf
        if self.exp is not None:
            out["exp"] = self.exp
        out["created"] = self.created
        out["updated"] = self.updated
        out["recoveryLevel"] = RECOVERY_LEVEL
        out["recoverableDays"] = RECOVERABLE_DAYS
        out.update(extra)
        return out


@dataclass
class SecretVersion:
    name: str
    version: str
    value: str = field(repr=False)
    attributes: Attributes
    content_type: str | None = None
    tags: dict[str, str] | None = None
    kid: str | None = None  # set when the secret backs a certificate
    managed: bool = False


@dataclass
class KeyVersion:
    name: str
    version: str
    key: pki.PrivateKey = field(repr=False)
    kty: str
    key_ops: tuple[str, ...]
    attributes: Attributes
    tags: dict[str, str] | None = None
    managed: bool = False


@dataclass
class CertVersion:
    name: str
    version: str
    material: pki.CertMaterial = field(repr=False)
    content_type: str
    attributes: Attributes
    tags: dict[str, str] | None = None
    issuer: str = "Self"


Version = SecretVersion | KeyVersion | CertVersion


@dataclass
class History:
    """All versions of one object name, oldest first; `name` keeps the casing it was created with."""

    name: str
    versions: dict[str, Version] = field(default_factory=dict)

    def latest(self) -> Version | None:
        return next(reversed(self.versions.values()), None)


def new_version() -> str:
    return uuid.uuid4().hex


class Vault:
    """One vault's objects (case-insensitive names) and the client ids granted on it."""

    def __init__(self, name: str, base_url: str) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.secrets: dict[str, History] = {}
        self.keys: dict[str, History] = {}
        self.certs: dict[str, History] = {}
        self.grants: set[str] = set()

    def table(self, kind: Kind) -> dict[str, History]:
        return {"secret": self.secrets, "key": self.keys, "cert": self.certs}[kind]

    def object_id(self, kind: Kind, name: str, version: str | None = None) -> str:
        coll = {"secret": "secrets", "key": "keys", "cert": "certificates"}[kind]
        tail = f"/{version}" if version else ""
        return f"{self.base_url}/{coll}/{name}{tail}"


def _not_found(kind: Kind, ident: str) -> StoreError:
    if kind == "cert":
        return StoreError(404, "CertificateNotFound", f"Certificate not found: {ident}")
    label = "secret" if kind == "secret" else "key"
    code = "SecretNotFound" if kind == "secret" else "KeyNotFound"
    return StoreError(
        404,
        code,
        f"A {label} with (name/id) {ident} was not found in this key vault. If you recently deleted "
        f"this {label} you may be able to recover it using the correct recovery command. For help "
        "resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182",
    )


def _tags(tags: object) -> dict[str, str] | None:
    if tags is None:
        return None
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise StoreError(400, "BadParameter", "Tags must be a map of strings.")
    return {str(k): v for k, v in tags.items()}


class VaultStore:
    """All vaults of one emulator. Every public method is thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._vaults: dict[str, Vault] = {}
        self.on_change: Callable[[Vault, Version | None], None] | None = None

    def _changed(self, vault: Vault, version: Version | None = None) -> None:
        if self.on_change is not None:
            self.on_change(vault, version)

    def vaults(self) -> list[Vault]:
        """Every vault; read their content only while holding the store (`with store.lock`)."""
        with self._lock:
            return list(self._vaults.values())

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    # -- vaults and grants ------------------------------------------------------------------
    def add_vault(self, name: str, base_url: str) -> Vault:
        with self._lock:
            key = name.lower()
            if key not in self._vaults:
                self._vaults[key] = Vault(name, base_url)
                self._changed(self._vaults[key])
            return self._vaults[key]

    def vault(self, name: str) -> Vault:
        with self._lock:
            try:
                return self._vaults[name.lower()]
            except KeyError:
                raise KeyError(f"no vault named {name!r} (have: {', '.join(self.names())})") from None

    def find(self, name: str) -> Vault | None:
        with self._lock:
            return self._vaults.get(name.lower())

    def names(self) -> list[str]:
        with self._lock:
            return [v.name for v in self._vaults.values()]

    def grant(self, vault: str, client_id: str) -> None:
        with self._lock:
            v = self.vault(vault)
            v.grants.add(client_id.lower())
            self._changed(v)

    def revoke(self, vault: str, client_id: str) -> None:
        with self._lock:
            v = self.vault(vault)
            v.grants.discard(client_id.lower())
            self._changed(v)

    def is_granted(self, vault: str, client_id: str) -> bool:
        with self._lock:
            return client_id.lower() in self.vault(vault).grants

    # -- lookups ----------------------------------------------------------------------------
    def get(self, vault: str, kind: Kind, name: str, version: str | None = None) -> Version:
        """The named version (latest when `version` is empty); raises StoreError 404."""
        with self._lock:
            hist = self.vault(vault).table(kind).get(name.lower())
            ident = f"{name}/{version}" if version else name
            if hist is None:
                raise _not_found(kind, ident)
            obj = hist.versions.get(version.lower()) if version else hist.latest()
            if obj is None:
                raise _not_found(kind, ident)
            return obj

    def histories(self, vault: str, kind: Kind) -> list[History]:
        with self._lock:
            return list(self.vault(vault).table(kind).values())

    def versions(self, vault: str, kind: Kind, name: str) -> list[Version]:
        with self._lock:
            hist = self.vault(vault).table(kind).get(name.lower())
            if hist is None:
                raise _not_found(kind, name)
            return list(hist.versions.values())

    def _history(self, vault: str, kind: Kind, name: str) -> History:
        table = self.vault(vault).table(kind)
        hist = table.get(name.lower())
        if hist is None:
            hist = table[name.lower()] = History(name)
        return hist

    # -- writes -----------------------------------------------------------------------------
    def set_secret(
        self,
        vault: str,
        name: str,
        value: str,
        *,
        content_type: str | None = None,
        enabled: bool = True,
        tags: dict[str, str] | None = None,
        nbf: int | None = None,
        exp: int | None = None,
    ) -> SecretVersion:
        if len(value.encode()) > MAX_SECRET_BYTES:
            raise StoreError(400, "BadParameter", f"Secret value exceeds the maximum of {MAX_SECRET_BYTES} bytes.")
        with self._lock:
            hist = self._history(vault, "secret", name)
            if any(isinstance(v, SecretVersion) and v.managed for v in hist.versions.values()):
                raise StoreError(
                    409, "Conflict",
                    f"Secret {name} is managed by a certificate; update the certificate instead.",
                )
            sv = SecretVersion(
                name=hist.name, version=new_version(), value=value,
                attributes=Attributes(enabled=enabled, nbf=nbf, exp=exp),
                content_type=content_type, tags=_tags(tags),
            )
            hist.versions[sv.version] = sv
            self._changed(self.vault(vault), sv)
            return sv

    def add_key(
        self,
        vault: str,
        name: str,
        key: pki.PrivateKey,
        *,
        hsm: bool = False,
        key_ops: Sequence[str] | None = None,
        enabled: bool = True,
        tags: dict[str, str] | None = None,
        nbf: int | None = None,
        exp: int | None = None,
    ) -> KeyVersion:
        kty = pki.key_kty(key, hsm=hsm)
        ops = tuple(key_ops) if key_ops else (RSA_OPS if kty.startswith("RSA") else EC_OPS)
        with self._lock:
            hist = self._history(vault, "key", name)
            kv = KeyVersion(
                name=hist.name, version=new_version(), key=key, kty=kty, key_ops=ops,
                attributes=Attributes(enabled=enabled, nbf=nbf, exp=exp), tags=_tags(tags),
            )
            hist.versions[kv.version] = kv
            self._changed(self.vault(vault), kv)
            return kv

    def add_certificate(
        self,
        vault: str,
        name: str,
        material: pki.CertMaterial,
        *,
        content_type: str = pki.PKCS12,
        enabled: bool = True,
        tags: dict[str, str] | None = None,
        issuer: str = "Self",
        secret_value: str | None = None,
    ) -> CertVersion:
        """Store the cert and its backing key and secret, all with the same name and version.

        `secret_value` (tests) replaces the backing secret's re-serialised PFX / PEM verbatim.
        """
        if content_type not in (pki.PKCS12, pki.PEM):
            raise StoreError(
                400, "BadParameter",
                f"Content type {content_type!r} is not supported; use {pki.PKCS12} or {pki.PEM}.",
            )
        leaf = material.leaf
        nbf = int(leaf.not_valid_before_utc.timestamp())
        exp = int(leaf.not_valid_after_utc.timestamp())
        with self._lock:
            v = self.vault(vault)
            chist = self._history(vault, "cert", name)
            version = new_version()
            created = int(time.time())
            attrs = lambda: Attributes(enabled=enabled, created=created, nbf=nbf, exp=exp)  # noqa: E731
            cv = CertVersion(
                name=chist.name, version=version, material=material, content_type=content_type,
                attributes=attrs(), tags=_tags(tags), issuer=issuer,
            )
            chist.versions[version] = cv
            khist = self._history(vault, "key", chist.name)
            kty = pki.key_kty(material.key)
            khist.versions[version] = KeyVersion(
                name=khist.name, version=version, key=material.key, kty=kty,
                key_ops=RSA_OPS if kty == "RSA" else EC_OPS, attributes=attrs(), tags=cv.tags, managed=True,
            )
            shist = self._history(vault, "secret", chist.name)
            sv = shist.versions[version] = SecretVersion(
                name=shist.name, version=version,
                value=material.secret_value(content_type) if secret_value is None else secret_value,
                attributes=attrs(), content_type=content_type, tags=cv.tags,
                kid=v.object_id("key", khist.name, version), managed=True,
            )
            for changed in (cv, khist.versions[version], sv):
                self._changed(v, changed)
            return cv

    def update(
        self,
        vault: str,
        kind: Kind,
        name: str,
        version: str | None,
        *,
        enabled: bool | None = None,
        nbf: int | None = None,
        exp: int | None = None,
        tags: dict[str, str] | None = None,
        content_type: str | None = None,
        key_ops: Sequence[str] | None = None,
    ) -> Version:
        """PATCH semantics: change only what is given. Certificate changes mirror to key and secret."""
        with self._lock:
            obj = self.get(vault, kind, name, version)
            targets: list[Version] = [obj]
            if isinstance(obj, CertVersion):
                backing: tuple[Kind, ...] = ("key", "secret")
                for k in backing:
                    try:
                        targets.append(self.get(vault, k, obj.name, obj.version))
                    except StoreError:
                        pass
            now = int(time.time())
            for t in targets:
                attrs = t.attributes
                if enabled is not None:
                    attrs.enabled = enabled
                if nbf is not None:
                    attrs.nbf = nbf
                if exp is not None:
                    attrs.exp = exp
                attrs.updated = now
                if tags is not None:
                    t.tags = _tags(tags)
            if content_type is not None and isinstance(obj, SecretVersion):
                obj.content_type = content_type
            if key_ops and isinstance(obj, KeyVersion):
                obj.key_ops = tuple(key_ops)
            for t in targets:
                self._changed(self.vault(vault), t)
            return obj


# -- JSON shapes -------------------------------------------------------------------------------
def secret_bundle(v: Vault, s: SecretVersion) -> dict[str, object]:
    out: dict[str, object] = {"value": s.value, "id": v.object_id("secret", s.name, s.version)}
    if s.content_type is not None:
        out["contentType"] = s.content_type
    out["attributes"] = s.attributes.to_json()
    if s.tags is not None:
        out["tags"] = s.tags
    if s.kid is not None:
        out["kid"] = s.kid
    if s.managed:
        out["managed"] = True
    return out


def secret_item(v: Vault, s: SecretVersion, *, versioned: bool) -> dict[str, object]:
    out: dict[str, object] = {"id": v.object_id("secret", s.name, s.version if versioned else None)}
    if s.content_type is not None:
        out["contentType"] = s.content_type
    out["attributes"] = s.attributes.to_json()
    if s.tags is not None:
        out["tags"] = s.tags
    if s.managed:
        out["managed"] = True
    return out


def key_bundle(v: Vault, k: KeyVersion) -> dict[str, object]:
    kid = v.object_id("key", k.name, k.version)
    out: dict[str, object] = {
        "key": pki.public_jwk(k.key, kid=kid, kty=k.kty, key_ops=k.key_ops),
        "attributes": k.attributes.to_json(exportable=False),
    }
    if k.tags is not None:
        out["tags"] = k.tags
    if k.managed:
        out["managed"] = True
    return out


def key_item(v: Vault, k: KeyVersion, *, versioned: bool) -> dict[str, object]:
    out: dict[str, object] = {
        "kid": v.object_id("key", k.name, k.version if versioned else None),
        "attributes": k.attributes.to_json(exportable=False),
    }
    if k.tags is not None:
        out["tags"] = k.tags
    if k.managed:
        out["managed"] = True
    return out


def cert_policy(v: Vault, c: CertVersion) -> dict[str, object]:
    key = c.material.key
    key_props: dict[str, object] = {"exportable": True, "kty": pki.key_kty(key), "reuse_key": False}
    if pki.curve_name(key):
        key_props["crv"] = pki.curve_name(key)
    else:
        key_props["key_size"] = key.key_size
    leaf = c.material.leaf
    x509_props: dict[str, object] = {
        "subject": leaf.subject.rfc4514_string(),
        "key_usage": ["digitalSignature", "keyEncipherment"],
        "validity_months": max(1, round(((c.attributes.exp or 0) - (c.attributes.nbf or 0)) / (30 * 86400))),
        "basic_constraints": {"ca": False},
    }
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
        if dns:
            x509_props["sans"] = {"dns_names": dns}
    except x509.ExtensionNotFound:
        pass
    return {
        "id": f"{v.object_id('cert', c.name)}/policy",
        "key_props": key_props,
        "secret_props": {"contentType": c.content_type},
        "x509_props": x509_props,
        "lifetime_actions": [{"trigger": {"lifetime_percentage": 80}, "action": {"action_type": "EmailContacts"}}],
        "issuer": {"name": c.issuer},
        "attributes": {"enabled": True, "created": c.attributes.created, "updated": c.attributes.created},
    }


def cert_bundle(v: Vault, c: CertVersion) -> dict[str, object]:
    out: dict[str, object] = {
        "id": v.object_id("cert", c.name, c.version),
        "kid": v.object_id("key", c.name, c.version),
        "sid": v.object_id("secret", c.name, c.version),
        "x5t": c.material.x5t,
        "cer": base64.b64encode(c.material.der).decode("ascii"),
        "attributes": c.attributes.to_json(),
    }
    if c.tags is not None:
        out["tags"] = c.tags
    out["policy"] = cert_policy(v, c)
    out["pending"] = {"id": f"{v.object_id('cert', c.name)}/pending"}
    return out


def cert_item(v: Vault, c: CertVersion, *, versioned: bool) -> dict[str, object]:
    out: dict[str, object] = {
        "id": v.object_id("cert", c.name, c.version if versioned else None),
        "attributes": c.attributes.to_json(),
    }
    if c.tags is not None:
        out["tags"] = c.tags
    out["x5t"] = c.material.x5t
    return out
