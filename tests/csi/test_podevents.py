"""Daemons' read failures → Warning events on the pod: the reason table, the message, the rate limit.

Fed with events shaped as a real daemon's ring holds them (kvfs.daemon.status), through the real
recorder into the fake API server, with the recorder's clock in the test's hands. The same path
with real daemons and the real plugin: tests/csi/test_operability.py.
"""

from __future__ import annotations

import pytest
from csi_harness import Clock
from fakekube import FakeKube

from kvfs.csi.events import INTERVAL, EventRecorder, Reason
from kvfs.csi.podevents import ReadFailureEvents, reason_for
from kvfs.csi.state import VolumeState, new_state

TARGET = "/var/lib/kubelet/pods/u-1/volumes/kubernetes.io~csi/secrets/mount"


def read_failed(file: str = "db", code: str = "SecretNotFound", errno: str = "ENOENT", seq: int = 1) -> dict:
    """A `read_failed` event as a daemon's ring holds it."""
    return {
        "seq": seq, "at": "2026-05-01T10:00:00.000Z", "kind": "read_failed", "object": f"secret/{file}", "file": file,
        "code": code, "errno": errno,
        "message": f"secret '{file}': not found in vault demo.vault.azure.net ({code}; check objectName, objectType"
                   " and objectVersion)",
    }  # fmt: skip


def volume(fake_kube: FakeKube, name: str = "web-0") -> VolumeState:
    uid = fake_kube.add_pod("shop", name)["metadata"]["uid"]
    return new_state("csi-1", TARGET, 1900000000, 1900000000, pod_namespace="shop", pod_name=name, pod_uid=uid)


def posted(fake_kube: FakeKube, recorder: EventRecorder, pod: str = "web-0") -> list[dict]:
    assert recorder.flush(30)
    return fake_kube.events_for("shop", pod)


@pytest.mark.parametrize(
    ("code", "errno", "reason"),
    [
        ("SecretNotFound", "ENOENT", Reason.OBJECT_NOT_FOUND),
        ("CertificateNotFound", "ENOENT", Reason.OBJECT_NOT_FOUND),
        ("VersionNotFound", "ENOENT", Reason.OBJECT_NOT_FOUND),
        ("ForbiddenByRbac", "EACCES", Reason.FORBIDDEN),
        ("AccessDenied", "EACCES", Reason.FORBIDDEN),
        ("SecretDisabled", "EACCES", Reason.FORBIDDEN),
        ("Throttled", "EIO", Reason.THROTTLED),
        ("HTTP429", "EIO", Reason.THROTTLED),
        ("Timeout", "EIO", Reason.UNREACHABLE),
        ("HostUnreachable", "EIO", Reason.UNREACHABLE),
        ("ServiceUnavailable", "EIO", Reason.UNREACHABLE),
        ("TLSVerifyFailed", "EIO", Reason.UNREACHABLE),
        ("AADSTS70021", "EACCES", Reason.TOKEN_EXCHANGE_FAILED),
        ("AADSTS90033", "EIO", Reason.TOKEN_EXCHANGE_FAILED),
        ("entra_unreachable", "EIO", Reason.TOKEN_EXCHANGE_FAILED),
        ("imds_identity_not_found", "EACCES", Reason.TOKEN_EXCHANGE_FAILED),
        ("nmi_404", "EACCES", Reason.TOKEN_EXCHANGE_FAILED),
        ("sa_token_expired", "EACCES", Reason.TOKEN_EXCHANGE_FAILED),
        ("RenderError", "EIO", None),
    ],
)
def test_each_daemon_code_has_one_reason(code: str, errno: str, reason: Reason | None) -> None:
    assert reason_for(code, errno) == reason


def test_a_missing_object_posts_one_event_naming_the_file_the_object_and_the_fix(
    fake_kube: FakeKube, recorder: EventRecorder
) -> None:
    ReadFailureEvents(recorder).on_events(volume(fake_kube), [read_failed()])
    [event] = posted(fake_kube, recorder)
    assert (event["type"], event["reason"]) == ("Warning", "KeyVaultObjectNotFound")
    assert event["involvedObject"]["name"] == "web-0" and event["involvedObject"]["kind"] == "Pod"
    message = event["message"]
    assert "reading db (Key Vault secret/db) failed with ENOENT (SecretNotFound)" in message
    assert "Fix: create the object in the vault, or fix objectName" in message
    assert f"kvfs status {TARGET}" in message


def test_a_daemon_reporting_again_does_not_get_past_the_rate_limit(
    fake_kube: FakeKube, recorder: EventRecorder, clock: Clock
) -> None:
    """The daemon reports again after a success in between, when the code changes (here to another
    code of the same reason), and everything again after a plugin restart: one event per ten minutes."""
    events, web = ReadFailureEvents(recorder), volume(fake_kube)
    for seq in range(1, 101):  # a hundred reports over 500 s
        code = "SecretNotFound" if seq % 2 else "VersionNotFound"
        events.on_events(web, [read_failed(code=code, seq=seq)])
        clock.now += 5
    assert [e["reason"] for e in posted(fake_kube, recorder)] == ["KeyVaultObjectNotFound"]
    # another reason, another object, another pod: each its own event
    events.on_events(web, [read_failed(code="Forbidden", errno="EACCES", seq=101), read_failed("api", seq=102)])
    events.on_events(volume(fake_kube, "web-1"), [read_failed(seq=1)])
    assert sorted(e["reason"] for e in posted(fake_kube, recorder)) == [
        "KeyVaultForbidden", "KeyVaultObjectNotFound", "KeyVaultObjectNotFound",
    ]  # fmt: skip
    assert len(posted(fake_kube, recorder, "web-1")) == 1
    clock.now += INTERVAL  # ten minutes after the first: the next report posts again
    events.on_events(web, [read_failed(seq=103)])
    assert [e["reason"] for e in posted(fake_kube, recorder)].count("KeyVaultObjectNotFound") == 3


def test_other_events_and_volumes_without_a_pod_post_nothing(fake_kube: FakeKube, recorder: EventRecorder) -> None:
    events = ReadFailureEvents(recorder)
    web = volume(fake_kube)
    served = {"seq": 1, "kind": "served", "object": "secret/db", "file": "db", "version": "0" * 32}
    events.on_events(web, [served, {**served, "kind": "rotated"}, read_failed(code="RenderError", errno="EIO")])
    no_pod = new_state("csi-2", TARGET + "2", 1900000001, 1900000001)
    events.on_events(no_pod, [read_failed()])
    assert posted(fake_kube, recorder) == [] and fake_kube.items("events") == []
