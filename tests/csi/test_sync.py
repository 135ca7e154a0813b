"""Status objects and Secret sync when things go wrong: the plugin over its gRPC socket, stand-in
daemons (their files come from `standin.file.*` parameters) and the fake Kubernetes API refusing,
failing or holding what it should not. Nothing of it may fail a publish. The happy paths with the
real daemon and rotations: tests/csi/test_migration.py."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from csi_harness import Kubelet, inline_params
from fakekube import FakeKube
from kvfs.csi.kube import KubeClient
from kvfs.csi.podstatus import CHECK_INTERVAL, served_versions
from kvfs.csi.sync import _shows

pytestmark = pytest.mark.mount

NS = "shop"
STATUSES = "secretproviderclasspodstatuses"


def class_parameters(**files: str) -> dict[str, str]:
    params = {k: v for k, v in inline_params().items() if not k.startswith("csi.storage.k8s.io/")}
    params.update({f"standin.file.{name}": value for name, value in files.items()})
    return params


@dataclass
class Node:
    kubelet: Kubelet
    kube: FakeKube
    base: Path
    volumes: Any

    def add_class(self, name: str, secret_objects: Any = None, **files: str) -> None:
        spec: dict[str, Any] = {"provider": "azure", "parameters": class_parameters(**files)}
        if secret_objects is not None:
            spec["secretObjects"] = secret_objects
        self.kube.add("secretproviderclasses", {
            "apiVersion": "secrets-store.csi.x-k8s.io/v1", "kind": "SecretProviderClass",
            "metadata": {"name": name, "namespace": NS}, "spec": spec,
        })  # fmt: skip

    def publish(self, pod: str, spc: str) -> str:
        target = self.kubelet.target(self.base, pod)
        attrs = {k: v for k, v in inline_params().items() if k.startswith("csi.storage.k8s.io/")}
        attrs.update({
            "csi.storage.k8s.io/pod.name": pod, "csi.storage.k8s.io/pod.namespace": NS,
            "csi.storage.k8s.io/pod.uid": f"0d0d0d0d-0000-4000-8000-{sum(map(ord, pod)):012d}", "secretProviderClass": spc,
        })  # fmt: skip
        self.kubelet.publish(f"vol-{pod}", target, attrs, timeout=20)
        return target

    def events(self, pod: str) -> list[tuple[str, str]]:
        assert self.volumes.recorder.flush()
        return [(e["reason"], e["message"]) for e in self.kube.events_for(NS, pod)]

    def secret(self, name: str) -> dict[str, Any] | None:
        return self.kube.get("secrets", NS, name)


@pytest.fixture
def node(csi_plugin: Kubelet, fake_kube: FakeKube, tmp_path: Path) -> Iterator[Node]:
    kubeconfig = fake_kube.kubeconfig(tmp_path / "kubeconfig")
    kubelet = csi_plugin.make(  # type: ignore[attr-defined]
        kube_factory=lambda: KubeClient.from_kubeconfig(str(kubeconfig)), sync_secrets=True
    )
    yield Node(kubelet, fake_kube, tmp_path, kubelet.volumes)
    kubelet.cleanup()  # before the fake API goes


def opaque(name: str, *files: str) -> dict[str, Any]:
    return {"secretName": name, "type": "Opaque", "data": [{"objectName": f, "key": f} for f in files]}


def test_refused_status_objects_never_fail_a_publish_are_logged_once_and_made_at_republish(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    node.add_class("plain", a="A")
    node.kube.denied.add(("create", STATUSES))
    with caplog.at_level(logging.WARNING, logger="kvfs.csi.podstatus"):
        first = node.publish("p1", "plain")
        node.publish("p2", "plain")
    assert Path(first, "a").read_text() == "A"
    assert node.kube.items(STATUSES, NS) == []
    warnings = [r.getMessage() for r in caplog.records if r.name == "kvfs.csi.podstatus"]
    assert len(warnings) == 1 and "cannot create SecretProviderClassPodStatus shop/p1-shop-plain" in warnings[0]
    assert "secretproviderclasspodstatuses rights" in warnings[0]
    node.kube.denied.clear()
    with caplog.at_level(logging.INFO, logger="kvfs.csi.podstatus"):
        node.publish("p1", "plain")  # kubelet's republish
    late = [r.getMessage() for r in caplog.records if r.name == "kvfs.csi.podstatus"]
    assert any("made (its create at publish had failed)" in m for m in late) and not any("was deleted" in m for m in late)
    [status] = node.kube.items(STATUSES, NS)
    assert status["metadata"]["name"] == "p1-shop-plain" and status["status"]["objects"] == []
    calls = len(node.kube.requests)
    node.publish("p1", "plain")  # a republish with nothing missing makes no API call
    assert len(node.kube.requests) == calls


def test_a_failing_status_check_is_not_repeated_at_every_republish(
    node: Node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An API that refuses (or a missing right, or an outage) is asked once per CHECK_INTERVAL, not at
    each of kubelet's republishes of each volume."""
    node.add_class("plain", a="A")
    now = [0.0]
    monkeypatch.setattr(node.volumes.statuses, "clock", lambda: now[0])
    node.publish("p1", "plain")
    node.kube.denied.add(("get", STATUSES))
    now[0] += CHECK_INTERVAL
    asked = len(node.kube.requests)
    with caplog.at_level(logging.WARNING, logger="kvfs.csi.podstatus"):
        for _ in range(3):
            node.publish("p1", "plain")  # kubelet's republishes
    assert [r.method for r in node.kube.requests[asked:] if STATUSES in r.path] == ["GET"]
    assert any("cannot read SecretProviderClassPodStatus shop/p1-shop-plain" in r.getMessage() for r in caplog.records)
    node.kube.denied.clear()
    now[0] += CHECK_INTERVAL
    node.publish("p1", "plain")
    assert [r.method for r in node.kube.requests[asked:] if STATUSES in r.path] == ["GET", "GET"]


def test_status_objects_list_upstreams_ids_and_only_grow(node: Node) -> None:
    node.add_class("hist", a="A")
    target = node.publish("h1", "hist")
    state = node.kubelet.state(target)
    events = [
        {"kind": "served", "object": "secret/db", "file": "db", "version": "v1"},
        {"kind": "read_failed", "object": "secret/gone", "file": "gone", "code": "SecretNotFound"},
        {"kind": "served", "object": "cert/web", "file": "web", "version": "w2", "versions": ["w2", "w1"]},
        {"kind": "rotated", "object": "secret/db", "file": "db", "old_version": "v1", "new_version": "v2"},
    ]
    assert served_versions({}, events) == {"secret/db": "v2", "cert/web/0": "w2", "cert/web/1": "w1"}
    node.volumes.statuses.on_events(state, events)
    node.volumes.statuses.on_events(state, events[:1])  # an old event read again after a restart
    status = node.kube.get(STATUSES, NS, "h1-shop-hist")
    assert status is not None and status["status"]["objects"] == [
        {"id": "cert/web/0", "version": "w2"}, {"id": "cert/web/1", "version": "w1"}, {"id": "secret/db", "version": "v2"}
    ]  # fmt: skip
    node.kubelet.unpublish("vol-h1", target)
    assert node.kube.items(STATUSES, NS) == []
    node.volumes.statuses.on_events(state, events)  # events that arrive late recreate nothing
    assert node.kube.items(STATUSES, NS) == []


def test_each_bad_entry_is_a_pod_event_and_the_good_ones_are_synced(node: Node) -> None:
    node.add_class(
        "mixed",
        [
            opaque("good", "a"),
            {"secretName": "untyped", "data": [{"objectName": "a", "key": "a"}]},
            opaque("missing-file", "a", "nope"),
            {"secretName": "bad-tls", "type": "kubernetes.io/tls", "data": [{"objectName": "a", "key": "tls.crt"}]},
        ],
        a="plain text",
    )
    target = node.publish("m1", "mixed")
    assert Path(target, "a").read_text() == "plain text"  # the volume is fine
    good = node.secret("good")
    assert good is not None and base64.b64decode(good["data"]["a"]) == b"plain text"
    assert [node.secret(n) for n in ("untyped", "missing-file", "bad-tls")] == [None, None, None]
    events = node.events("m1")
    assert {reason for reason, _ in events} == {"SecretSyncFailed"}
    messages = " | ".join(message for _, message in events)
    assert "spec.secretObjects[1].type: type is empty" in messages
    assert "Secret missing-file: not synced: cannot read nope (no such file in this volume)" in messages
    assert "Secret bad-tls: key tls.crt from file a: the file is neither PEM nor a password-less PFX" in messages
    assert "plain text" not in messages


def test_without_rbac_for_secrets_the_pod_is_told_and_republish_syncs_once_granted(node: Node) -> None:
    node.add_class("denied", [opaque("creds", "a")], a="A")
    node.kube.denied.add(("*", "secrets"))
    node.publish("d1", "denied")
    [(reason, message)] = node.events("d1")
    assert reason == "SecretSyncFailed" and "Secret creds: not synced" in message
    assert "the plugin needs RBAC for Secrets: the sync-secrets component" in message
    node.kube.denied.clear()
    node.publish("d1", "denied")  # kubelet's republish tries a failed sync again
    creds = node.secret("creds")
    assert creds is not None and creds["metadata"]["labels"] == {"secrets-store.csi.k8s.io/managed": "true"}


def test_a_managed_secret_of_another_type_is_not_changed(node: Node) -> None:
    node.add_class("typed", [opaque("cert", "a")], a="A")
    node.kube.add("secrets", {
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "cert", "namespace": NS, "labels": {"secrets-store.csi.k8s.io/managed": "true"}},
        "data": {"tls.crt": "", "tls.key": ""},
    })  # fmt: skip
    before = node.secret("cert")
    node.publish("t1", "typed")
    assert node.secret("cert") == before
    [(reason, message)] = node.events("t1")
    assert reason == "SecretSyncFailed" and "has type kubernetes.io/tls, the class says Opaque" in message


def test_a_class_without_secret_objects_costs_no_secret_call(node: Node) -> None:
    node.add_class("none", a="A")
    target = node.publish("n1", "none")
    node.kubelet.unpublish("vol-n1", target)
    assert not [r for r in node.kube.requests if r.path.startswith(f"/api/v1/namespaces/{NS}/secrets")]


@pytest.mark.parametrize(
    ("file", "rotated", "changes"),
    [
        ("db", "db", True),
        ("web.crt", "web", True),
        ("web.key", "web", True),
        ("hist/1", "hist", True),
        ("web2", "web", False),
        ("conf/db", "db", False),
        ("db", "conf/db", False),
    ],
)
def test_which_files_a_rotation_changes(file: str, rotated: str, changes: bool) -> None:
    assert _shows(file, rotated) is changes


def test_a_secret_upstream_synced_is_adopted_and_keeps_its_other_owners(node: Node) -> None:
    """Upstream's driver labels the Secrets it syncs as kvfs does; newer versions make the pod's
    ReplicaSet their owner. kvfs takes such a Secret over and removes only its own reference."""
    replica_set = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d9f", "uid": "5d9f0000-0000-4000-8000-000000000001"}
    node.kube.add("secrets", {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "creds", "namespace": NS, "ownerReferences": [replica_set],
                     "labels": {"secrets-store.csi.k8s.io/managed": "true", "kept": "yes"}},
        "data": {"a": base64.b64encode(b"written by upstream").decode()},
    })  # fmt: skip
    node.add_class("adopt", [opaque("creds", "a")], a="from kvfs")
    target = node.publish("w1", "adopt")
    creds = node.secret("creds")
    assert creds is not None and base64.b64decode(creds["data"]["a"]) == b"from kvfs"
    assert creds["metadata"]["labels"] == {"secrets-store.csi.k8s.io/managed": "true", "kept": "yes"}
    assert [r["kind"] for r in creds["metadata"]["ownerReferences"]] == ["ReplicaSet", "SecretProviderClassPodStatus"]
    node.kubelet.unpublish("vol-w1", target)
    creds = node.secret("creds")
    assert creds is not None and creds["metadata"]["ownerReferences"] == [replica_set]
