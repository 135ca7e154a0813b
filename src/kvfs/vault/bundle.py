"""The shape of Key Vault's answers: checked once at the boundary, then read without doubt.

A SecretBundle, KeyBundle, CertificateBundle or version-list page whose fields have the wrong
JSON type (`"value": 123`, `"attributes": "x"`, a key without `kty`) fails that one read with a
`VaultError` (code `BadResponse`, EIO) naming the field and the types, never the value (it may
be a secret). Missing optional fields stay allowed: the renderer reports those with upstream's
own messages ("secret value is nil").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import httpx

from kvfs.config.model import ObjectType
from kvfs.errors import VaultError

_ATTRIBUTES: dict[str, type] = {"enabled": bool, "created": int, "updated": int, "exp": int, "nbf": int}
_BUNDLE: dict[str, dict[str, type]] = {
    "secret": {"id": str, "value": str, "contentType": str, "kid": str, "attributes": dict, "tags": dict},
    "key": {"key": dict, "attributes": dict, "tags": dict},
    "cert": {"id": str, "cer": str, "kid": str, "contentType": str, "attributes": dict, "tags": dict},
}
_JWK: dict[str, type] = {"kid": str, "kty": str, "crv": str, "n": str, "e": str, "x": str, "y": str}
_LIST_ITEM: dict[str, type] = {"id": str, "kid": str, "attributes": dict}
_JSON_NAMES: dict[type, str] = {str: "a string", int: "an integer", bool: "true/false", dict: "an object",
                                list: "an array", float: "a number", type(None): "null"}


class Attributes(NamedTuple):
    enabled: bool | None
    created: int
    updated: int
    expires: int | None


def _json_name(value: object) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _has_type(value: object, expected: type) -> bool:
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _check_fields(obj: Mapping[str, Any], rules: Mapping[str, type], where: str, what: str) -> None:
    for name, expected in rules.items():
        value = obj.get(name)
        if value is not None and not _has_type(value, expected):
            raise bad_response(what, f"{where}{name} is {_json_name(value)}, expected {_JSON_NAMES[expected]}")
    attributes = obj.get("attributes")
    if isinstance(attributes, Mapping):
        _check_fields(attributes, _ATTRIBUTES, f"{where}attributes.", what)


def bad_response(what: str, problem: str) -> VaultError:
    return VaultError(f"{what}: Key Vault's answer has the wrong shape: {problem}", status=200, code="BadResponse")


def check_bundle(kind: ObjectType, body: object, what: str) -> dict[str, Any]:
    """`body` as a bundle of `kind`, or VaultError BadResponse."""
    if not isinstance(body, dict):
        raise bad_response(what, f"the answer is {_json_name(body)}, expected an object")
    _check_fields(body, _BUNDLE[kind], "", what)
    key = body.get("key")
    if isinstance(key, dict):
        _check_fields(key, _JWK, "key.", what)
        if not key.get("kty"):
            raise bad_response(what, "key.kty is missing")
    return body


def check_page(body: object, what: str) -> tuple[list[dict[str, Any]], object]:
    """A version-list page → (items, nextLink), or VaultError BadResponse."""
    if not isinstance(body, dict):
        raise bad_response(what, f"the answer is {_json_name(body)}, expected an object")
    items = body.get("value")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise bad_response(what, f"value is {_json_name(items)}, expected an array")
    for item in items:
        if not isinstance(item, dict):
            raise bad_response(what, f"a value item is {_json_name(item)}, expected an object")
        _check_fields(item, _LIST_ITEM, "value[].", what)
    link = body.get("nextLink")
    if link is not None and not isinstance(link, str):
        raise bad_response(what, f"nextLink is {_json_name(link)}, expected a string")
    return items, link


def item_id(item: Mapping[str, Any]) -> str:
    """Id of a checked bundle or list item (keys carry it as `kid` / `key.kid`)."""
    for candidate in (item.get("id"), item.get("kid")):
        if candidate:
            return str(candidate)
    key = item.get("key")
    return str(key.get("kid") or "") if isinstance(key, Mapping) else ""


def version_of(kv_id: str) -> str:
    """`https://v/secrets/name/<version>` → `<version>` ("" when the id has no version)."""
    try:
        parts = [p for p in httpx.URL(kv_id).path.split("/") if p]
    except (httpx.InvalidURL, ValueError):
        return ""
    return parts[2] if len(parts) >= 3 else ""


def attributes_of(item: Mapping[str, Any]) -> Attributes:
    """The attributes of a checked bundle or list item (absent ones as 0 / None)."""
    attrs = item.get("attributes") or {}
    return Attributes(
        enabled=attrs.get("enabled"),
        created=attrs.get("created") or 0,
        updated=attrs.get("updated") or 0,
        expires=attrs.get("exp"),
    )
