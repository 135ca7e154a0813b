"""The official azure-keyvault-secrets SDK + azure-identity against the emulator over HTTPS."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError, ServiceResponseError
from azure.identity import ClientSecretCredential
from azure.keyvault.secrets import SecretClient

from kvfs.emulator.server import Emulator, EmulatorThread


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    with EmulatorThread(tmp_path_factory.mktemp("emu"), vaults=("demo", "other")) as emu:
        yield emu


@pytest.fixture(autouse=True)
def _trust_emulator(emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(emu.ca_file))
    emu.faults.reset()
    yield
    emu.faults.reset()


def credential(emu: Emulator) -> ClientSecretCredential:
    app = emu.info["app"]
    return ClientSecretCredential(
        emu.tenant_id, app["client_id"], app["client_secret"],
        authority=emu.authority_host, disable_instance_discovery=True,
    )


def client(emu: Emulator, vault: str = "demo", **kwargs: object) -> SecretClient:
    return SecretClient(emu.vault_url(vault), credential(emu), **kwargs)


def test_set_then_get_latest_and_by_version(emu: Emulator) -> None:
    c = client(emu)
    first = c.set_secret("sdk-get", "one", content_type="text/plain", tags={"t": "1"})
    second = c.set_secret("sdk-get", "two")
    assert c.get_secret("sdk-get").value == "two"
    old = c.get_secret("sdk-get", first.properties.version)
    assert (old.value, old.properties.content_type, old.properties.tags) == ("one", "text/plain", {"t": "1"})
    assert second.properties.version != first.properties.version
    assert len(first.properties.version or "") == 32
    assert c.get_secret("SDK-GET").value == "two"  # names are case-insensitive


def test_emulator_set_secret_is_visible_to_sdk(emu: Emulator) -> None:
    version = emu.set_secret("demo", "from-test", "v-from-test", content_type="application/json")
    got = client(emu).get_secret("from-test")
    assert (got.value, got.properties.version, got.properties.content_type) == (
        "v-from-test", version, "application/json",
    )
    assert got.properties.enabled is True
    assert got.properties.created_on is not None


def test_list_pages_and_never_returns_values(emu: Emulator) -> None:
    for i in range(7):
        emu.set_secret("other", f"page-{i}", f"value-{i}")
        emu.set_secret("other", "versioned", f"v{i}")
    c = client(emu, "other")
    pages = list(c.list_properties_of_secrets(max_page_size=3).by_page())
    names = [p.name for page in pages for p in page]
    assert sorted(names) == sorted([f"page-{i}" for i in range(7)] + ["versioned"])
    assert len(pages) == 3
    versions = list(c.list_properties_of_secret_versions("versioned", max_page_size=2))
    assert len(versions) == 7 and len({v.version for v in versions}) == 7
    for v in versions:
        assert not hasattr(v, "value")


def test_not_found(emu: Emulator) -> None:
    with pytest.raises(ResourceNotFoundError) as info:
        client(emu).get_secret("does-not-exist")
    assert info.value.status_code == 404
    assert info.value.error.code == "SecretNotFound"
    assert "A secret with (name/id) does-not-exist was not found in this key vault" in info.value.message


def test_disabled_is_forbidden_with_inner_code(emu: Emulator) -> None:
    emu.set_secret("demo", "off", "hidden")
    emu.set_enabled("demo", "secret", "off", None, False)
    with pytest.raises(HttpResponseError) as info:
        client(emu).get_secret("off")
    assert info.value.status_code == 403
    assert info.value.error.code == "Forbidden"
    assert info.value.error.innererror["code"] == "SecretDisabled"
    assert "hidden" not in str(info.value)


def test_disable_through_sdk_update(emu: Emulator) -> None:
    c = client(emu)
    c.set_secret("sdk-off", "x")
    props = c.update_secret_properties("sdk-off", enabled=False)
    assert props.enabled is False
    with pytest.raises(HttpResponseError) as info:
        c.get_secret("sdk-off")
    assert info.value.status_code == 403


def test_forbidden_without_grant(emu: Emulator) -> None:
    app = emu.identity.add_app()
    cred = ClientSecretCredential(
        emu.tenant_id, app.client_id, app.client_secret or "", authority=emu.authority_host,
        disable_instance_discovery=True,
    )
    emu.set_secret("demo", "guarded", "g")
    with pytest.raises(HttpResponseError) as info:
        SecretClient(emu.vault_url("demo"), cred).get_secret("guarded")
    assert info.value.status_code == 403
    assert info.value.error.innererror["code"] == "ForbiddenByRbac"
    assert f"appid={app.client_id}" in info.value.message
    emu.grant("demo", app.client_id)
    assert SecretClient(emu.vault_url("demo"), cred).get_secret("guarded").value == "g"


def test_throttling_is_retried_by_the_sdk(emu: Emulator) -> None:
    emu.set_secret("demo", "busy", "b")
    c = client(emu, retry_backoff_factor=0.01)
    c.get_secret("busy")  # warm the token and challenge
    emu.reset_counts()
    emu.faults.throttle(2, retry_after=0)
    assert c.get_secret("busy").value == "b"
    assert emu.count(vault="demo", route="get_secret") == 3
    emu.faults.throttle(1)  # no Retry-After: exponential backoff
    assert c.get_secret("busy").value == "b"
    assert emu.count(vault="demo", route="get_secret") == 5


def test_throttling_beyond_retries_surfaces_429(emu: Emulator) -> None:
    emu.set_secret("demo", "hot", "h")
    c = client(emu, retry_total=1, retry_backoff_factor=0.01)
    c.get_secret("hot")
    emu.faults.throttle(5, retry_after=0)
    with pytest.raises(HttpResponseError) as info:
        c.get_secret("hot")
    assert info.value.status_code == 429
    assert info.value.error.code == "Throttled"


def test_5xx_and_dropped_connections_are_retried(emu: Emulator) -> None:
    emu.set_secret("demo", "flaky", "f")
    c = client(emu, retry_backoff_factor=0.01)
    c.get_secret("flaky")
    emu.faults.fail(503, 2)
    assert c.get_secret("flaky").value == "f"
    emu.faults.drop(1)
    assert c.get_secret("flaky").value == "f"
    emu.faults.drop(3)
    with pytest.raises(ServiceResponseError):
        client(emu, retry_total=0).get_secret("flaky")


def test_emulator_thread_fixture(emulator_thread: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared fixture: a fresh emulator on its own thread, writable from this (blocking) test."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(emulator_thread.ca_file))
    version = emulator_thread.set_secret("demo", "fixture", "works")
    got = client(emulator_thread).get_secret("fixture")
    assert (got.value, got.properties.version) == ("works", version)
    assert emulator_thread.count(vault="demo", route="get_secret") == 2  # challenge probe + authorised GET
