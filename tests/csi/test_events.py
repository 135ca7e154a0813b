"""The pod event recorder against the fake API server, with a fake clock for its rate limit."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from csi_harness import Clock
from fakekube import FakeKube

from kvfs.csi.events import INTERVAL, EventRecorder, Reason
from kvfs.csi.kube import KubeClient, KubeConfigError, PodRef
from kvfs.logsafe import register_secret

NODE = "node-a"  # conftest's recorder posts as this node
DEADLINE = 30.0


@pytest.fixture
def fake(fake_kube: FakeKube) -> FakeKube:
    return fake_kube


def pod(fake: FakeKube, name: str = "web") -> PodRef:
    meta = fake.add_pod("shop", name)["metadata"]
    return PodRef("shop", name, meta["uid"])


def posted(fake: FakeKube, recorder: EventRecorder, name: str = "web") -> list[tuple[str, str]]:
    assert recorder.flush(DEADLINE)
    return [(e["reason"], e["message"]) for e in fake.events_for("shop", name)]


def test_one_event_per_pod_object_and_reason_per_ten_minutes(
    fake: FakeKube, recorder: EventRecorder, clock: Clock
) -> None:
    web = pod(fake)
    for i in range(100):
        recorder.record(web, Reason.OBJECT_NOT_FOUND, f"secret db: not found ({i})", object_key="secret/db")
        clock.now += 5  # 100 reads over 500 s
    assert posted(fake, recorder) == [("KeyVaultObjectNotFound", "secret db: not found (0)")]
    clock.now += INTERVAL - 500 + 1  # ten minutes after the first
    assert recorder.record(web, Reason.OBJECT_NOT_FOUND, "still not found", object_key="secret/db")
    assert posted(fake, recorder)[-1] == ("KeyVaultObjectNotFound", "still not found")
    assert len(posted(fake, recorder)) == 2


def test_pods_objects_and_reasons_are_counted_apart(fake: FakeKube, recorder: EventRecorder) -> None:
    web, api = pod(fake), pod(fake, "api")
    keys = [
        (web, Reason.OBJECT_NOT_FOUND, "secret/a"),
        (web, Reason.OBJECT_NOT_FOUND, "secret/b"),
        (web, Reason.FORBIDDEN, "secret/a"),
        (api, Reason.OBJECT_NOT_FOUND, "secret/a"),
    ]
    for _ in range(3):
        for who, reason, key in keys:
            recorder.record(who, reason, f"{key}: {reason}", object_key=key)
    assert sorted(posted(fake, recorder)) == [
        ("KeyVaultForbidden", "secret/a: KeyVaultForbidden"),
        ("KeyVaultObjectNotFound", "secret/a: KeyVaultObjectNotFound"),
        ("KeyVaultObjectNotFound", "secret/b: KeyVaultObjectNotFound"),
    ]
    assert posted(fake, recorder, "api") == [("KeyVaultObjectNotFound", "secret/a: KeyVaultObjectNotFound")]
    assert {e["source"]["host"] for e in fake.items("events")} == {NODE}


def test_a_failing_api_never_raises_and_is_logged_once_per_reason(
    fake: FakeKube, recorder: EventRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    web = pod(fake)
    fake.denied.add(("create", "events"))
    for key in ("secret/a", "secret/b", "secret/c"):
        assert recorder.record(web, Reason.THROTTLED, "429 from Key Vault", object_key=key)
    assert posted(fake, recorder) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "KeyVaultThrottled event on pod shop/web" in warnings[0] and "create on events" in warnings[0]
    fake.denied.clear()
    recorder.record(web, Reason.THROTTLED, "429 again", object_key="secret/d")
    assert posted(fake, recorder) == [("KeyVaultThrottled", "429 again")]
    fake.denied.add(("create", "events"))  # failing again after a success: said again
    recorder.record(web, Reason.THROTTLED, "429", object_key="secret/e")
    recorder.flush(DEADLINE)
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 2


def test_no_api_configuration_only_logs(caplog: pytest.LogCaptureFixture) -> None:
    def no_kube() -> KubeClient:
        raise KubeConfigError("no Kubernetes API configuration")

    recorder = EventRecorder(no_kube, NODE)
    web = PodRef("shop", "web", "u-1")
    for key in ("a", "b"):
        recorder.record(web, Reason.VOLUME_FAILED, "daemon died", object_key=key)
    assert recorder.flush(DEADLINE)
    recorder.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["cannot post a VolumeFailed event on pod shop/web: no Kubernetes API configuration"]


def test_a_planted_token_never_reaches_the_event(fake: FakeKube, recorder: EventRecorder) -> None:
    web = pod(fake)
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJhcGk6Ly9BenVyZUFEVG9rZW5FeGNoYW5nZSJ9.c2lnbmF0dXJl"
    register_secret("client-secret-planted-in-a-message")
    recorder.record(
        web,
        Reason.TOKEN_EXCHANGE_FAILED,
        f"AADSTS700213 for assertion {jwt} with client-secret-planted-in-a-message",
        object_key="identity",
    )
    ((reason, message),) = posted(fake, recorder)
    assert reason == "IdentityTokenExchangeFailed" and message.startswith("AADSTS700213 for assertion")
    assert jwt not in message and "client-secret-planted-in-a-message" not in message


def test_a_hanging_api_never_blocks_the_caller_and_memory_stays_bounded(
    fake: FakeKube, clock: Clock, tmp_path: Path
) -> None:
    config = str(fake.kubeconfig(tmp_path / "kubeconfig"))

    def slow_kube() -> KubeClient:
        client = KubeClient.from_kubeconfig(config)
        client.timeout = 1.0
        return client

    recorder = EventRecorder(slow_kube, NODE, clock=clock, max_keys=4, max_queued=2)
    fake.inject("POST", "events", 201, {}, times=10, delay=60)
    web = PodRef("shop", "web", "u-1")
    accepted: list[bool] = []
    caller = threading.Thread(
        target=lambda: accepted.extend(
            recorder.record(web, Reason.UNREACHABLE, "m", object_key=str(i)) for i in range(10)
        )
    )
    caller.start()
    caller.join(DEADLINE)  # the API hangs for 60 s per event; the caller must be long done
    assert not caller.is_alive() and len(accepted) == 10
    assert 2 <= sum(accepted) <= 3  # the worker holds at most one, the queue two
    assert recorder.flush(DEADLINE)  # each stuck post ends with the client's timeout
    assert sum(recorder.record(web, Reason.UNREACHABLE, "m", object_key=f"more-{i}") for i in range(6)) == 4 - sum(
        accepted
    )
    clock.now += INTERVAL + 1  # the table empties itself
    fake.canned.clear()
    assert recorder.record(web, Reason.UNREACHABLE, "back", object_key="0")
    assert recorder.flush(DEADLINE)
    assert fake.events_for("shop", "web")[-1]["message"] == "back"
    recorder.close()
