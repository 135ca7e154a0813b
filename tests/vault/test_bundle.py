"""Key Vault answers of the wrong shape fail that read in one line (BadResponse, EIO), and cool down."""

from __future__ import annotations

import errno
import logging
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from kvfs.auth.base import AccessToken
from kvfs.cache.resolver import Resolver
from kvfs.config.model import AuthConfig, CloudConfig, MountConfig, ObjectSpec, ObjectType
from kvfs.errors import VaultError
from kvfs.net.http import make_http_client
from kvfs.vault.client import VaultClient

CLOUD = CloudConfig("AzurePublicCloud", "vault.azure.net", "https://vault.azure.net", "https://login.microsoftonline.com")
SECRET_ID = "https://demo.vault.azure.net/secrets/db/0123456789abcdef0123456789abcdef"
KEY_ID = "https://demo.vault.azure.net/keys/k/0123456789abcdef0123456789abcdef"
HIDDEN = "s3cret-value-never-shown"


class Token:
    async def get_token(self, scope: str) -> AccessToken:
        return AccessToken("tok", expires_at=1e12)

    async def aclose(self) -> None:
        return None


def vault(answer: object, calls: list[httpx.Request] | None = None) -> VaultClient:
    def handler(request: httpx.Request) -> httpx.Response:
        if calls is not None:
            calls.append(request)
        return httpx.Response(200, json=answer)

    http = make_http_client(transport=httpx.MockTransport(handler))
    return VaultClient("https://demo.vault.azure.net/", Token(), "https://vault.azure.net/.default", http)


BAD_BUNDLES: list[tuple[ObjectType, Any, str]] = [
    ("secret", {"id": SECRET_ID, "value": 123}, "value is an integer, expected a string"),
    ("secret", {"id": SECRET_ID, "value": HIDDEN, "attributes": "x"}, "attributes is a string, expected an object"),
    ("secret", {"id": SECRET_ID, "value": HIDDEN, "attributes": {"updated": "yesterday"}},
     "attributes.updated is a string, expected an integer"),
    ("secret", {"id": SECRET_ID, "value": HIDDEN, "attributes": {"enabled": "yes"}},
     "attributes.enabled is a string, expected true/false"),
    ("secret", {"id": 7, "value": HIDDEN}, "id is an integer, expected a string"),
    ("secret", {"id": SECRET_ID, "value": HIDDEN, "contentType": ["x"]}, "contentType is an array, expected a string"),
    ("cert", {"id": SECRET_ID, "cer": 5}, "cer is an integer, expected a string"),
    ("key", {"key": {"kid": KEY_ID, "n": "AQAB", "e": "AQAB"}}, "key.kty is missing"),
    ("key", {"key": "RSA"}, "key is a string, expected an object"),
    ("key", {"key": {"kid": KEY_ID, "kty": "RSA", "n": 5, "e": "AQAB"}}, "key.n is an integer, expected a string"),
    ("secret", [{"id": SECRET_ID, "value": HIDDEN}], "the answer is an array, expected an object"),
    ("secret", HIDDEN, "the answer is a string, expected an object"),
]


@pytest.mark.parametrize(("kind", "answer", "problem"), BAD_BUNDLES)
async def test_wrong_shape_is_bad_response(kind: ObjectType, answer: Any, problem: str) -> None:
    name = "k" if kind == "key" else "db"
    with pytest.raises(VaultError) as caught:
        await vault(answer).get(kind, name)
    err = caught.value
    assert err.code == "BadResponse" and err.errno == errno.EIO
    assert str(err) == f"{kind} '{name}': Key Vault's answer has the wrong shape: {problem}"
    assert HIDDEN not in str(err)


@pytest.mark.parametrize(
    ("page", "problem"),
    [
        ({"value": {"id": SECRET_ID}}, "value is an object, expected an array"),
        ({"value": ["x"]}, "a value item is a string, expected an object"),
        ({"value": [{"id": SECRET_ID, "attributes": {"created": True}}]},
         "value[].attributes.created is true/false, expected an integer"),
        ({"value": [], "nextLink": 5}, "nextLink is an integer, expected a string"),
        ([], "the answer is an array, expected an object"),
    ],
)
async def test_wrong_shape_version_page_is_bad_response(page: Any, problem: str) -> None:
    with pytest.raises(VaultError) as caught:
        await vault(page).list_versions("secret", "db")
    assert caught.value.code == "BadResponse" and caught.value.errno == errno.EIO
    assert str(caught.value) == f"secret 'db' versions: Key Vault's answer has the wrong shape: {problem}"


async def test_right_shapes_pass_with_absent_and_null_fields() -> None:
    secret = {"id": SECRET_ID, "value": "v", "contentType": None, "attributes": {"enabled": True, "exp": None}}
    assert await vault(secret).get("secret", "db") == secret
    page = {"value": [{"id": SECRET_ID}], "nextLink": None}
    assert await vault(page).list_versions("secret", "db") == [{"id": SECRET_ID}]


async def test_a_wrong_shape_fails_one_read_logs_one_line_and_cools_down(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    calls: list[httpx.Request] = []
    spec = ObjectSpec(name="db", type="secret")
    config = MountConfig(vault_name="demo", cloud=CLOUD, auth=AuthConfig(mode="default_chain"), objects=(spec,))
    cache = Resolver(vault({"id": SECRET_ID, "value": 123}, calls), config)
    for _ in range(3):
        with pytest.raises(VaultError) as caught:
            await cache.current(spec)
        assert caught.value.code == "BadResponse"
    assert len(calls) == 1  # the second and third reads were answered from the error cooldown
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(problems) == 1
    assert problems[0].exc_info is None and "\n" not in problems[0].getMessage()
    assert "object=secret/db code=BadResponse" in problems[0].getMessage()
