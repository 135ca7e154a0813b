"""The emulator's folder: its files, written private from the first instant, and what a restart reuses.

Every file in DIR is created 0600 under a temporary name (`mkstemp`) and renamed into place, never
chmod-ed after it was written: `emulator.json` and the state files hold the client secret, the
admin token and private keys. DIR itself is created 0700.

A restart with the same DIR reuses `tenant.json` (tenant id, ports, signing keys, app and managed
identities), the CA and server certificate, `admin-token` and `vaults.jsonl` (every vault's objects,
all versions, and its grants: a snapshot at start, then one appended line per change). `--fresh`
removes these files first.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from . import pki
from .vaults import Attributes, CertVersion, History, KeyVersion, Kind, SecretVersion, Vault, VaultStore, Version

log = logging.getLogger(__name__)

FORMAT = 1
FRESH_HINT = "start over with --fresh to discard the saved state"


class StateError(ValueError):
    """A saved file that cannot be used; the message names the file and the way out."""


def private_dir(path: Path) -> None:
    """Create DIR (and missing parents) 0700; an existing folder keeps its mode."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` atomically with a file that is 0600 from its creation on."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # O_EXCL, 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class StateDir:
    """The files of one emulator folder, by name."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.info = dir / "emulator.json"
        self.tenant = dir / "tenant.json"
        self.vaults = dir / "vaults.jsonl"
        self.admin_token = dir / "admin-token"
        self.ca = dir / "ca.pem"
        self.ca_key = dir / "ca-key.pem"
        self.server_cert = dir / "server.pem"
        self.server_key = dir / "server-key.pem"
        self.cloud_env = dir / "cloud-env.json"
        self.sa_token = dir / "sa-token"

    def files(self) -> list[Path]:
        return [p for p in vars(self).values() if isinstance(p, Path) and p != self.dir]

    def prepare(self, *, fresh: bool) -> None:
        """Create DIR; drop a stale emulator.json (it must not look ready) and, with `fresh`, all state."""
        private_dir(self.dir)
        for path in self.files() if fresh else [self.info]:
            path.unlink(missing_ok=True)

    def read_json(self, path: Path) -> dict[str, Any] | None:
        """A saved JSON object, None when the file does not exist."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            raise StateError(f"cannot read {path} ({getattr(err, 'strerror', None) or type(err).__name__}); "
                             f"fix its permissions or {FRESH_HINT}") from None
        try:
            doc = json.loads(text)
        except ValueError:
            raise StateError(f"{path} is not valid JSON (damaged?); {FRESH_HINT}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise StateError(f"{path} is not a kvfs emulator state file of format {FORMAT}; {FRESH_HINT}")
        return doc

    def read_bytes(self, path: Path) -> bytes:
        """A file a restart needs; its absence is a damaged folder."""
        try:
            return path.read_bytes()
        except OSError as err:
            raise StateError(f"cannot read {path} ({err.strerror}), which the saved tenant needs; {FRESH_HINT}") from None

    def load_admin_token(self) -> str:
        """The saved admin token, or a new one written 0600."""
        if self.admin_token.exists():
            token = self.read_bytes(self.admin_token).decode("ascii", "replace").strip()
            if token:
                return token
        token = secrets.token_urlsafe(32)
        write_private(self.admin_token, token.encode("ascii"))
        return token

    def load_tls(self, hosts: list[str], *, restart: bool) -> pki.TlsMaterial:
        """On a restart the saved CA, and the saved server cert while it names every host; else new ones."""
        if not restart:
            tls = pki.make_tls_material(hosts)
        else:
            ca_pem, ca_key_pem = self.read_bytes(self.ca), self.read_bytes(self.ca_key)
            cert_pem, key_pem = self.read_bytes(self.server_cert), self.read_bytes(self.server_key)
            try:
                if pki.serves(cert_pem, hosts):
                    return pki.TlsMaterial(ca_pem=ca_pem, ca_key_pem=ca_key_pem, cert_pem=cert_pem, key_pem=key_pem)
                tls = pki.make_tls_material(hosts, ca_pem, ca_key_pem)
            except ValueError:
                raise StateError(f"{self.ca}, {self.ca_key} or {self.server_cert} is damaged; {FRESH_HINT}") from None
        write_private(self.ca_key, tls.ca_key_pem)
        write_private(self.ca, tls.ca_pem)
        write_private(self.server_key, tls.key_pem)
        write_private(self.server_cert, tls.cert_pem)
        return tls

    def save_tenant(self, doc: dict[str, Any]) -> None:
        write_private(self.tenant, _dump({"format": FORMAT, **doc}))

    def journal(self, store: VaultStore) -> None:
        """Write the store's whole content as a new vaults.jsonl, then append every change to it.

        One line per change (`VaultStore.on_change`, called under the store's lock, so lines are in
        change order): each change costs one short append however much the vaults hold.
        """
        with store.lock:
            lines = [_header()]
            for v in store.vaults():
                lines.append(_line(_vault_record(v)))
                for table in (v.secrets, v.keys, v.certs):
                    lines += [_line(_version_record(v, o)) for h in table.values() for o in h.versions.values()]
            write_private(self.vaults, b"".join(lines))
            store.on_change = self._append

    def _append(self, vault: Vault, version: Version | None) -> None:
        record = _vault_record(vault) if version is None else _version_record(vault, version)
        fd = os.open(self.vaults, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)  # exists: `journal` made it 0600
        try:
            os.write(fd, _line(record))  # one write: a crash leaves at most a torn last line
        finally:
            os.close(fd)

    def restore_vaults(self, store: VaultStore, base_url: Callable[[str], str]) -> None:
        """Replay vaults.jsonl (if any) into an empty store; a malformed line is a StateError naming it."""
        try:
            data = self.vaults.read_bytes()
        except FileNotFoundError:
            return
        except OSError as err:
            raise StateError(f"cannot read {self.vaults} ({err.strerror}); fix its permissions or {FRESH_HINT}") from None
        lines = data.split(b"\n")
        if lines[-1]:
            log.warning("%s: the last change was cut short (the emulator was killed while writing it); dropped",
                        self.vaults)
        lines = lines[:-1]
        if not lines or lines[0] + b"\n" != _header():
            raise StateError(f"{self.vaults} is not a kvfs emulator journal of format {FORMAT}; {FRESH_HINT}")
        for n, raw in enumerate(lines[1:], start=2):
            try:
                _replay(store, json.loads(raw), base_url)
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                raise StateError(f"{self.vaults}: line {n} is malformed ({why(err)}); {FRESH_HINT}") from None


def why(err: Exception) -> str:
    """What is wrong, without quoting the file: its values may be secrets."""
    if isinstance(err, KeyError):
        return f"field {err.args[0]!r} is missing"
    return f"a field has the wrong type or value: {type(err).__name__}"


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


# -- vault content <-> journal records -----------------------------------------------------------
_KINDS: dict[type, Kind] = {SecretVersion: "secret", KeyVersion: "key", CertVersion: "cert"}


def _header() -> bytes:
    return _line({"format": FORMAT, "kind": "kvfs-emulator-vaults"})


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _vault_record(v: Vault) -> dict[str, Any]:
    return {"vault": v.name, "grants": sorted(v.grants)}


def _attrs_doc(a: Attributes) -> dict[str, Any]:
    return {"enabled": a.enabled, "created": a.created, "updated": a.updated, "nbf": a.nbf, "exp": a.exp}


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _version_record(v: Vault, obj: Version) -> dict[str, Any]:
    """One version, all of it: a later record of the same version replaces the earlier one."""
    doc: dict[str, Any] = {"version": obj.version, "attributes": _attrs_doc(obj.attributes), "tags": obj.tags}
    if isinstance(obj, SecretVersion):
        doc.update(value=obj.value, content_type=obj.content_type, managed=obj.managed)
    elif isinstance(obj, KeyVersion):
        doc.update(key=pki.private_pem(obj.key).decode("ascii"), kty=obj.kty, key_ops=list(obj.key_ops),
                   managed=obj.managed)
    else:
        m = obj.material
        doc.update(key=pki.private_pem(m.key).decode("ascii"), cert=_cert_pem(m.leaf),
                   chain=[_cert_pem(c) for c in m.chain], content_type=obj.content_type, issuer=obj.issuer)
    return {"vault": v.name, "kind": _KINDS[type(obj)], "name": obj.name, "v": doc}


def _replay(store: VaultStore, record: dict[str, Any], base_url: Callable[[str], str]) -> None:
    name = record["vault"]
    if "grants" in record:
        vault = store.add_vault(name, base_url(name))
        vault.grants = {str(c).lower() for c in record["grants"]}
        return
    found = store.find(name)
    if found is None:
        raise ValueError("a version of a vault no earlier line names")
    kind = record["kind"]
    table = found.table(kind)
    hist = table.get(record["name"].lower())
    if hist is None:
        hist = table[record["name"].lower()] = History(record["name"])
    doc = record["v"]
    hist.versions[str(doc["version"])] = _LOADERS[kind](found, hist.name, doc)


def _attributes(d: dict[str, Any]) -> Attributes:
    return Attributes(enabled=bool(d["enabled"]), created=int(d["created"]), updated=int(d["updated"]),
                      nbf=None if d["nbf"] is None else int(d["nbf"]), exp=None if d["exp"] is None else int(d["exp"]))


def _tags(d: dict[str, Any]) -> dict[str, str] | None:
    tags = d["tags"]
    return None if tags is None else {str(k): str(v) for k, v in tags.items()}


def _load_secret(vault: Vault, name: str, d: dict[str, Any]) -> SecretVersion:
    managed = bool(d["managed"])
    value = d["value"]
    if not isinstance(value, str):
        raise TypeError("value")
    return SecretVersion(
        name=name, version=str(d["version"]), value=value, attributes=_attributes(d["attributes"]),
        content_type=d["content_type"], tags=_tags(d), managed=managed,
        kid=vault.object_id("key", name, str(d["version"])) if managed else None,  # the port may differ now
    )


def _load_key(vault: Vault, name: str, d: dict[str, Any]) -> KeyVersion:
    return KeyVersion(
        name=name, version=str(d["version"]), key=pki.load_private_key(d["key"].encode("ascii")), kty=str(d["kty"]),
        key_ops=tuple(str(o) for o in d["key_ops"]), attributes=_attributes(d["attributes"]), tags=_tags(d),
        managed=bool(d["managed"]),
    )


def _load_cert(vault: Vault, name: str, d: dict[str, Any]) -> CertVersion:
    material = pki.CertMaterial(
        key=pki.load_private_key(d["key"].encode("ascii")),
        leaf=x509.load_pem_x509_certificate(d["cert"].encode("ascii")),
        chain=[x509.load_pem_x509_certificate(c.encode("ascii")) for c in d["chain"]],
    )
    return CertVersion(
        name=name, version=str(d["version"]), material=material, content_type=str(d["content_type"]),
        attributes=_attributes(d["attributes"]), tags=_tags(d), issuer=str(d["issuer"]),
    )


_LOADERS: dict[str, Callable[[Vault, str, dict[str, Any]], Version]] = {
    "secret": _load_secret, "key": _load_key, "cert": _load_cert,
}
