"""An in-memory Key Vault for cache and file-tree tests: VaultClient's two coroutines over dicts."""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import trio

from kvfs.config.model import ObjectSpec
from kvfs.errors import VaultError

COLLECTION = {"secret": "secrets", "key": "keys", "cert": "certificates"}


@dataclass
class Stored:
    version: str
    value: str
    created: int
    enabled: bool = True
    attributes: bool = True


class FakeVault:
    """VaultClient's get / list_versions over dicts; counts calls; can fail or be slow."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], list[Stored]] = collections.defaultdict(list)
        self.calls: collections.Counter[str] = collections.Counter()
        self.fail: Exception | None = None
        self.latency = 0.0
        # Per object name: a failure or a latency for that object only.
        self.fail_only: dict[str, Exception] = {}
        self.latency_only: dict[str, float] = {}
        self.get_times: dict[str, list[float]] = collections.defaultdict(list)
        self.list_in_creation_order = False  # the service's order is unspecified
        self._serial = 0

    def add(
        self,
        kind: str,
        name: str,
        value: str,
        *,
        created: int | None = None,
        enabled: bool = True,
        attributes: bool = True,
    ) -> str:
        self._serial += 1
        version = f"{self._serial:032x}"
        self.objects[(kind, name)].append(
            Stored(version, value, self._serial * 10 if created is None else created, enabled, attributes)
        )
        return version

    def _id(self, kind: str, name: str, version: str) -> str:
        return f"https://demo.vault.azure.net/{COLLECTION[kind]}/{name}/{version}"

    async def get(self, kind: str, name: str, version: str = "") -> dict:
        self.calls[f"get:{name}:{version or 'latest'}"] += 1
        self.calls["get"] += 1
        self.get_times[name].append(trio.current_time())
        if self.latency or name in self.latency_only:
            await trio.sleep(self.latency_only.get(name, self.latency))
        if self.fail is not None or name in self.fail_only:
            raise self.fail_only.get(name) or self.fail  # type: ignore[misc]
        versions = self.objects.get((kind, name))
        if not versions:
            raise VaultError(f"{kind} '{name}': not found", status=404, code="SecretNotFound")
        if version:
            found = [s for s in versions if s.version == version.lower()]
            if not found:
                raise VaultError(
                    f"{kind} '{name}' version {version}: not found", status=404, code="SecretNotFound"
                )
            stored = found[0]
        else:
            stored = max((s for s in versions if s.enabled), key=lambda s: s.created)
        return {
            "value": stored.value,
            "id": self._id(kind, name, stored.version),
            "contentType": "text/plain",
            "attributes": {
                "enabled": stored.enabled,
                "created": stored.created,
                "updated": stored.created,
                "exp": 99,
            },
        }

    async def list_versions(self, kind: str, name: str) -> list[dict]:
        self.calls["list"] += 1
        if self.latency:
            await trio.sleep(self.latency)
        if self.fail is not None:
            raise self.fail
        out: list[dict] = []
        stored = self.objects[(kind, name)]
        for s in stored if self.list_in_creation_order else reversed(stored):
            entry: dict[str, Any] = {"id": self._id(kind, name, s.version)}
            if s.attributes:
                entry["attributes"] = {"enabled": s.enabled, "created": s.created}
            out.append(entry)
        return out


def fake_render(
    spec: ObjectSpec,
    bundle: Mapping[str, Any],
    *,
    split_cert_key: bool = False,
    construct_pem_chain: bool = True,
) -> dict[str, bytes]:
    """Stand-in for kvfs.vault.render.render_object: resolver tests need no real rendering."""
    files = {"": bundle["value"].encode()}
    if split_cert_key:
        files = {".crt": b"crt:" + files[""], ".key": b"key:" + files[""], **files}
    return files
