"""The seed file: initial vault content as YAML (format in docs/EMULATOR.md).

    vaults:
      demo:
        secrets:
          - {name: db-password, value: s3cret, content_type: text/plain, tags: {env: dev}}
          - name: rotated
            versions: [{value: v1}, {value: v2, enabled: false}]     # oldest first
        keys:
          - {name: signing, kty: EC, curve: P-256}
          - {name: wrap, kty: RSA-HSM, size: 2048, versions: 2}
        certificates:
          - {name: web, subject: CN=web, sans: [web.example], format: pem, chain: true}

Validation errors name the path of the bad field (e.g. `vaults.demo.secrets[1].value`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from . import pki
from .vaults import StoreError, VaultStore

log = logging.getLogger(__name__)


class SeedError(ValueError):
    """A seed file problem; the message names the field, the value and the fix."""


def load_seed(path: Path) -> dict[str, Any]:
    """Read and shape-check a seed YAML file."""
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as err:
        raise SeedError(f"--seed {path}: cannot read the file ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise SeedError(f"--seed {path}: not valid YAML ({err})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise SeedError(f"--seed {path}: the top level must be a mapping with a 'vaults' key")
    return doc


def seed_vault_names(seed: dict[str, Any]) -> list[str]:
    vaults = seed.get("vaults") or {}
    if not isinstance(vaults, dict):
        raise SeedError("seed field 'vaults' must be a mapping of vault name → content")
    return [str(n) for n in vaults]


def _list(node: Any, where: str) -> list[dict[str, Any]]:
    if node is None:
        return []
    if not isinstance(node, list) or not all(isinstance(i, dict) for i in node):
        raise SeedError(f"seed field {where} must be a list of mappings")
    return node


def _name(item: dict[str, Any], where: str) -> str:
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise SeedError(f"seed field {where}.name is missing (every object needs a name)")
    return name


def apply_seed(store: VaultStore, seed: dict[str, Any]) -> None:
    """Add the seed's content to existing vaults (create them first with `seed_vault_names`)."""
    for vault, content in (seed.get("vaults") or {}).items():
        content = content or {}
        if not isinstance(content, dict):
            raise SeedError(f"seed field vaults.{vault} must be a mapping with secrets/keys/certificates")
        unknown = set(content) - {"secrets", "keys", "certificates"}
        if unknown:
            raise SeedError(f"seed field vaults.{vault}: unknown keys {sorted(unknown)} (use secrets, keys, certificates)")
        for kind, fn in (("secrets", _seed_secret), ("keys", _seed_key), ("certificates", _seed_cert)):
            for i, item in enumerate(_list(content.get(kind), f"vaults.{vault}.{kind}")):
                where = f"vaults.{vault}.{kind}[{i}]"
                try:
                    fn(store, str(vault), item, where)
                except SeedError:
                    raise
                except StoreError as err:
                    raise SeedError(f"seed field {where}: {err.message}") from None
                except (TypeError, ValueError) as err:
                    raise SeedError(f"seed field {where}: {err}") from None


def _seed_secret(store: VaultStore, vault: str, item: dict[str, Any], where: str) -> None:
    name = _name(item, where)
    versions = item.get("versions")
    if versions is None:
        versions = [item]
    for v in _list(versions, f"{where}.versions"):
        value = v.get("value")
        if not isinstance(value, str):
            raise SeedError(f"seed field {where}.value must be a string (quote numbers and booleans)")
        tags = v.get("tags", item.get("tags"))
        store.set_secret(
            vault, name, value,
            content_type=v.get("content_type", item.get("content_type")),
            enabled=bool(v.get("enabled", True)),
            tags={str(k): str(t) for k, t in tags.items()} if isinstance(tags, dict) else None,
        )


def _seed_key(store: VaultStore, vault: str, item: dict[str, Any], where: str) -> None:
    name = _name(item, where)
    kty = str(item.get("kty", "RSA"))
    count = int(item.get("versions", 1))
    for _ in range(count):
        try:
            key = pki.generate_key(kty, size=int(item.get("size", 2048)), curve=str(item.get("curve", "P-256")))
        except ValueError as err:
            raise SeedError(f"seed field {where}: {err}") from None
        store.add_key(vault, name, key, hsm=kty.upper().endswith("-HSM"), enabled=bool(item.get("enabled", True)))


def _seed_cert(store: VaultStore, vault: str, item: dict[str, Any], where: str) -> None:
    name = _name(item, where)
    fmt = str(item.get("format", "pfx")).lower()
    ctype = {"pem": pki.PEM, "pfx": pki.PKCS12, pki.PEM: pki.PEM, pki.PKCS12: pki.PKCS12}.get(fmt)
    if ctype is None:
        raise SeedError(f"seed field {where}.format {fmt!r} is not supported (use pem or pfx)")
    sans = item.get("sans") or []
    if not isinstance(sans, list):
        raise SeedError(f"seed field {where}.sans must be a list of DNS names or IPs")
    for _ in range(int(item.get("versions", 1))):
        try:
            material = pki.generate_cert_material(
                str(item.get("subject", f"CN={name}")),
                kty=str(item.get("kty", "RSA")),
                size=int(item.get("size", 2048)),
                curve=str(item.get("curve", "P-256")),
                sans=[str(s) for s in sans],
                chained=bool(item.get("chain", False)),
                days=int(item.get("validity_days", 365)),
            )
        except ValueError as err:
            raise SeedError(f"seed field {where}: {err}") from None
        store.add_certificate(
            vault, name, material, content_type=ctype, enabled=bool(item.get("enabled", True)),
            issuer="Unknown" if item.get("chain") else "Self",
        )
