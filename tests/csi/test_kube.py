"""The Kubernetes client's object calls against the fake API server, which behaves like the real one
for what callers rely on: resourceVersions, conflicts, preconditions, Status bodies, validation."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakekube import SA_IDENTITY, FakeKube

from kvfs.csi.kube import (
    EVENT_MESSAGE_LIMIT,
    EVENTS,
    NODE_LABEL,
    PODS,
    SECRETS,
    SPC_POD_STATUSES,
    KubeClient,
    KubeError,
    PodRef,
    secret_body,
    spc_pod_status_body,
    spc_pod_status_name,
)
from kvfs.logsafe import register_secret

NODE = "node-a"


@pytest.fixture
def fake(fake_kube: FakeKube) -> FakeKube:
    return fake_kube


@pytest.fixture
def client(fake: FakeKube, tmp_path: Path) -> Iterator[KubeClient]:
    kube = KubeClient.from_kubeconfig(str(fake.kubeconfig(tmp_path / "kubeconfig")))
    yield kube
    kube.close()


def pod_of(obj: dict[str, Any]) -> PodRef:
    meta = obj["metadata"]
    return PodRef(meta["namespace"], meta["name"], meta["uid"])


def refused(call: Any, *args: Any, **kwargs: Any) -> KubeError:
    with pytest.raises(KubeError) as info:
        call(*args, **kwargs)
    assert "\n" not in str(info.value)  # one line, never a traceback
    return info.value


# ---- pods --------------------------------------------------------------------------------------


def test_a_pod_is_deleted_only_with_its_own_uid(fake: FakeKube, client: KubeClient) -> None:
    old = pod_of(fake.add_pod("shop", "web"))
    assert client.get_pod("shop", "web")["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
    fake.delete_pod("shop", "web")
    new = pod_of(fake.add_pod("shop", "web"))  # its controller made a new one with the same name
    err = refused(client.delete_pod, "shop", "web", uid=old.uid)
    assert (err.status, err.reason) == (409, "Conflict")
    assert f"UID in precondition: {old.uid}" in err.message
    assert fake.get("pods", "shop", "web") is not None
    before = len(fake.requests)
    assert refused(client.delete_pod, "shop", "web", uid="").status == 400
    assert len(fake.requests) == before  # refused before any call
    assert client.delete_pod("shop", "web", uid=new.uid)["metadata"]["uid"] == new.uid
    err = refused(client.get_pod, "shop", "web")
    assert (err.status, err.reason, err.message) == (404, "NotFound", 'pods "web" not found')


def test_rbac_refusals_carry_the_servers_message(fake: FakeKube, client: KubeClient) -> None:
    fake.add_pod("shop", "web")
    fake.denied.add(("delete", "pods"))
    err = refused(client.delete_pod, "shop", "web", uid="x")
    assert (err.status, err.reason) == (403, "Forbidden")
    assert err.message == (
        f'pods "web" is forbidden: User "{SA_IDENTITY}" cannot delete resource "pods" in API group "" '
        'in the namespace "shop"'
    )
    assert client.get_pod("shop", "web")  # other verbs stay allowed
    fake.forbidden.add("shop")
    assert refused(client.get_pod, "shop", "web").status == 403


# ---- events ------------------------------------------------------------------------------------


def test_an_event_names_its_pod_and_its_source(fake: FakeKube, client: KubeClient) -> None:
    pod = pod_of(fake.add_pod("shop", "web"))
    first = client.create_event(pod, "KeyVaultObjectNotFound", "secret db-password: not found", node_id=NODE)
    second = client.create_event(pod, "KeyVaultObjectNotFound", "again", node_id=NODE)
    events = fake.events_for("shop", "web")
    assert [e["metadata"]["name"] for e in events] == [first["metadata"]["name"], second["metadata"]["name"]]
    assert first["metadata"]["name"] != second["metadata"]["name"]
    assert first["metadata"]["name"].startswith("web.")  # generateName, as kubelet's recorder names them
    event = events[0]
    assert event["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": "web",
        "namespace": "shop",
        "uid": pod.uid,
    }
    assert (event["type"], event["reason"], event["count"]) == ("Warning", "KeyVaultObjectNotFound", 1)
    assert event["source"] == {"component": "kvfs-csi", "host": NODE}
    assert (event["reportingComponent"], event["reportingInstance"]) == ("kvfs-csi", NODE)
    assert event["firstTimestamp"] == event["lastTimestamp"] and event["firstTimestamp"].endswith("Z")
    assert event["metadata"]["resourceVersion"] and event["metadata"]["uid"]


def test_an_event_message_carries_no_token_and_fits_the_api_limit(fake: FakeKube, client: KubeClient) -> None:
    pod = pod_of(fake.add_pod("shop", "web"))
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2lnbmF0dXJlLXZhbHVl"
    register_secret("planted-client-secret-value")
    message = f"token {jwt} and Bearer abcdefghijklmnop and planted-client-secret-value; " + "é" * 2000
    client.create_event(pod, "IdentityTokenExchangeFailed", message, node_id=NODE)
    (event,) = fake.events_for("shop", "web")
    stored = event["message"]
    assert jwt not in stored and "abcdefghijklmnop" not in stored and "planted-client-secret-value" not in stored
    assert len(stored.encode()) <= EVENT_MESSAGE_LIMIT and stored.endswith(" ...")
    # the limit is real: the API server enforces it on events that set eventTime
    body = {
        **event,
        "metadata": {"name": "x", "namespace": "shop"},
        "eventTime": "2024-01-01T00:00:00.000000Z",
        "message": "x" * (EVENT_MESSAGE_LIMIT + 1),
    }
    err = refused(client.create_object, EVENTS, "shop", body)
    assert (err.status, err.reason) == (422, "Invalid") and "at most 1024" in err.message


def test_an_event_refused_by_rbac_or_namespace(fake: FakeKube, client: KubeClient) -> None:
    pod = pod_of(fake.add_pod("shop", "web"))
    fake.denied.add(("create", "events"))
    err = refused(client.create_event, pod, "VolumeFailed", "m", node_id=NODE)
    assert (err.status, err.reason) == (403, "Forbidden")
    assert "events is forbidden: User" in err.message and 'cannot create resource "events"' in err.message
    fake.denied.clear()
    body = {
        "metadata": {"generateName": "web.", "namespace": "shop"},
        "reason": "R",
        "message": "m",
        "involvedObject": {"kind": "Pod", "name": "web", "namespace": "other"},
    }
    err = refused(client.create_object, EVENTS, "shop", body)
    assert err.status == 422 and "involvedObject.namespace" in err.message
    assert fake.events_for("shop", "web") == []


# ---- SecretProviderClassPodStatus --------------------------------------------------------------


def test_spc_pod_status_lifecycle(fake: FakeKube, client: KubeClient) -> None:
    pod = pod_of(fake.add_pod("shop", "web"))
    target = "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/secrets/mount"
    body = spc_pod_status_body(pod, "demo", node_id=NODE, target_path=target)
    created = client.create_object(SPC_POD_STATUSES, "shop", body)
    name = spc_pod_status_name(pod, "demo")
    assert name == "web-shop-demo" and created["metadata"]["name"] == name
    assert created["metadata"]["labels"] == {NODE_LABEL: NODE}
    assert created["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "web", "uid": pod.uid}
    ]
    assert created["status"] == {
        "podName": "web",
        "secretProviderClassName": "demo",
        "mounted": True,
        "targetPath": target,
        "objects": [],
    }
    assert "spec" not in created
    err = refused(client.create_object, SPC_POD_STATUSES, "shop", body)
    assert (err.status, err.reason) == (409, "AlreadyExists")
    assert err.message == f'secretproviderclasspodstatuses.secrets-store.csi.x-k8s.io "{name}" already exists'

    served = {"secret/db": "v2", "cert/tls": "v1"}
    updated = client.replace_object(
        SPC_POD_STATUSES,
        "shop",
        spc_pod_status_body(pod, "demo", node_id=NODE, target_path=target, objects=served)
        | {"metadata": created["metadata"]},
    )
    assert updated["status"]["objects"] == [{"id": "cert/tls", "version": "v1"}, {"id": "secret/db", "version": "v2"}]
    assert int(updated["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    assert updated["metadata"]["uid"] == created["metadata"]["uid"]
    stale = refused(client.replace_object, SPC_POD_STATUSES, "shop", {**body, "metadata": created["metadata"]})
    assert (stale.status, stale.reason) == (409, "Conflict") and "the object has been modified" in stale.message
    assert client.get_object(SPC_POD_STATUSES, "shop", name)["status"]["objects"] == updated["status"]["objects"]

    client.delete_object(SPC_POD_STATUSES, "shop", name)
    assert refused(client.get_object, SPC_POD_STATUSES, "shop", name).status == 404
    assert refused(client.delete_object, SPC_POD_STATUSES, "shop", name).reason == "NotFound"


def test_the_garbage_collector_stand_in_removes_a_deleted_pods_status(fake: FakeKube, client: KubeClient) -> None:
    pod = pod_of(fake.add_pod("shop", "web"))
    client.create_object(SPC_POD_STATUSES, "shop", spc_pod_status_body(pod, "demo", node_id=NODE, target_path="/t"))
    fake.delete_pod("shop", "web")
    assert fake.items("secretproviderclasspodstatuses") == []


# ---- Secrets -----------------------------------------------------------------------------------


def test_secret_create_read_replace_delete(fake: FakeKube, client: KubeClient) -> None:
    pod = pod_of(fake.add_pod("shop", "web"))
    data = {"password": b"p@ss\n", "blob": bytes(range(256))}
    body = secret_body("shop", "db", data, labels={"app": "web"}, annotations={"note": "synced"}, owners=[pod])
    created = client.create_object(SECRETS, "shop", body)
    got = client.get_object(SECRETS, "shop", "db")
    assert {k: base64.b64decode(v) for k, v in got["data"].items()} == data
    assert (got["type"], got["metadata"]["labels"], got["metadata"]["annotations"]) == (
        "Opaque",
        {"app": "web"},
        {"note": "synced"},
    )
    assert got["metadata"]["ownerReferences"] == [pod.owner_reference()]

    got["data"]["password"] = base64.b64encode(b"new").decode()
    client.replace_object(SECRETS, "shop", got)
    err = refused(client.replace_object, SECRETS, "shop", created)  # created's resourceVersion is stale now
    assert (err.status, err.reason) == (409, "Conflict")
    err = refused(client.delete_object, SECRETS, "shop", "db", resource_version=created["metadata"]["resourceVersion"])
    assert err.status == 409 and "Precondition failed: ResourceVersion" in err.message
    answer = client.delete_object(SECRETS, "shop", "db", uid=created["metadata"]["uid"])
    assert answer["status"] == "Success" and answer["details"]["uid"] == created["metadata"]["uid"]
    assert fake.get("secrets", "shop", "db") is None


def test_secret_validation_and_immutable_type(fake: FakeKube, client: KubeClient) -> None:
    err = refused(client.create_object, SECRETS, "shop", secret_body("shop", "db", {"a/b": b"x"}))
    assert (err.status, err.reason) == (422, "Invalid") and "data[a/b]" in err.message
    tls = client.create_object(
        SECRETS, "shop", secret_body("shop", "tls", {"tls.crt": b"c", "tls.key": b"k"}, secret_type="kubernetes.io/tls")
    )
    err = refused(client.replace_object, SECRETS, "shop", {**tls, "type": "Opaque"})
    assert err.status == 422 and "field is immutable" in err.message
    assert client.replace_object(
        SECRETS, "shop", {**tls, "metadata": {"name": "tls"}}
    )  # no resourceVersion: unconditional


def test_a_secret_with_two_owner_pods_goes_with_the_last(fake: FakeKube, client: KubeClient) -> None:
    pods = [pod_of(fake.add_pod("shop", name)) for name in ("web-1", "web-2")]
    client.create_object(SECRETS, "shop", secret_body("shop", "db", {"k": b"v"}, owners=pods))
    fake.delete_pod("shop", "web-1")
    secret = fake.get("secrets", "shop", "db")
    assert secret is not None and secret["metadata"]["ownerReferences"] == [pods[1].owner_reference()]
    fake.delete_pod("shop", "web-2")
    assert fake.get("secrets", "shop", "db") is None


# ---- read-modify-write -------------------------------------------------------------------------


def test_read_modify_write_creates_then_retries_a_lost_race(fake: FakeKube, client: KubeClient) -> None:
    def add_key(key: str) -> Any:
        def change(current: dict[str, Any] | None) -> dict[str, Any]:
            if current is None:
                return secret_body("shop", "db", {key: b"1"})
            current["data"][key] = base64.b64encode(b"1").decode()
            return current

        return change

    assert client.read_modify_write(SECRETS, "shop", "db", add_key("a"))["data"].keys() == {"a"}  # type: ignore[index]
    calls = []

    def racing(current: dict[str, Any] | None) -> dict[str, Any]:
        calls.append(current)
        if len(calls) == 1:  # another writer changes the Secret between our read and our write
            client.read_modify_write(SECRETS, "shop", "db", add_key("other"))
        return add_key("b")(current)

    written = client.read_modify_write(SECRETS, "shop", "db", racing)
    assert len(calls) == 2 and written is not None and written["data"].keys() == {"a", "b", "other"}

    before = len(fake.requests)
    assert client.read_modify_write(SECRETS, "shop", "db", lambda current: None) == fake.get("secrets", "shop", "db")
    assert [r.method for r in fake.requests[before:]] == ["GET"]  # nothing to write, nothing written


def test_read_modify_write_gives_up_with_the_conflict(fake: FakeKube, client: KubeClient) -> None:
    client.create_object(SECRETS, "shop", secret_body("shop", "db", {"k": b"v"}))
    conflict = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": "Conflict",
        "code": 409,
        "message": 'Operation cannot be fulfilled on secrets "db": the object has been modified',
    }
    fake.inject("PUT", "secrets", 409, conflict, times=10)
    err = refused(client.read_modify_write, SECRETS, "shop", "db", lambda current: current, attempts=3)
    assert (err.status, err.reason) == (409, "Conflict")
    assert [r.method for r in fake.requests].count("PUT") == 3


# ---- what can go wrong on the wire -------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "body", "status", "says"),
    [
        (200, b"<html>proxy login</html>", 0, "not a JSON object"),
        (200, b"[1, 2]", 0, "not a JSON object"),
        (200, b'{"kind": "Secret", "metadata": {}}', 0, "answered with kind 'Secret', not a Pod"),
        (200, b'{"kind": "Pod", "metadata": "x"}', 0, "not a Pod"),
        (502, b"Bad Gateway", 502, "GET /api/v1/namespaces/shop/pods/web: HTTP 502"),
        (
            503,
            b'{"kind": "Status", "code": 503, "reason": "ServiceUnavailable", "message": "etcd is down"}',
            503,
            "etcd is down",
        ),
    ],
)
def test_a_bad_answer_is_a_clear_error(
    fake: FakeKube, client: KubeClient, code: int, body: bytes, status: int, says: str
) -> None:
    fake.inject("GET", "pods", code, body)
    err = refused(client.get_pod, "shop", "web")
    assert err.status == status and says in err.message


def test_a_hanging_api_server_times_out(fake: FakeKube, tmp_path: Path) -> None:
    client = KubeClient.from_kubeconfig(str(fake.kubeconfig(tmp_path / "kc")))
    client.timeout = 0.5
    fake.inject("POST", "events", 201, {}, delay=60)
    err = refused(client.create_event, PodRef("shop", "web", "u"), "VolumeFailed", "m", node_id=NODE)
    assert err.status == 0 and "unreachable" in err.message and "Timeout" in err.message
    client.close()


@pytest.mark.parametrize("name", ["", ".", ".."])
def test_dot_segments_never_reach_the_server(fake: FakeKube, client: KubeClient, name: str) -> None:
    assert refused(client.get_object, SECRETS, "shop", name).status == 400
    assert refused(client.get_object, SECRETS, name, "db").status == 400
    assert fake.requests == []


def test_path_segments_are_percent_encoded(fake: FakeKube, client: KubeClient) -> None:
    refused(client.get_object, SECRETS, "../kube-system", "db?watch=1")
    (request,) = fake.requests
    assert request.path == "/api/v1/namespaces/..%2Fkube-system/secrets/db%3Fwatch%3D1"
    assert request.namespace == "../kube-system"  # one segment: the request stayed in that (invalid) namespace


def test_the_fake_refuses_what_the_api_server_refuses(fake: FakeKube, client: KubeClient) -> None:
    created = client.create_object(SECRETS, "shop", secret_body("shop", "db", {"k": b"v"}))
    assert refused(client.create_object, SECRETS, "shop", created).status == 500  # resourceVersion set on create
    assert refused(client.create_object, SECRETS, "shop", secret_body("shop", "Not_A_Name", {})).status == 422
    assert refused(client.create_object, SECRETS, "other", secret_body("shop", "x", {})).status == 400
    assert refused(client.replace_object, SECRETS, "shop", secret_body("shop", "missing", {})).status == 404
    assert (
        refused(
            client.replace_object, SECRETS, "shop", {**created, "metadata": {**created["metadata"], "uid": "u"}}
        ).status
        == 422
    )
    owned = secret_body("shop", "x", {}, owners=[PodRef("shop", "web", "")])
    assert "ownerReferences[0].uid" in refused(client.create_object, SECRETS, "shop", owned).message
    labelled = secret_body("shop", "x", {}, labels={NODE_LABEL: "n" * 64})
    assert refused(client.create_object, SECRETS, "shop", labelled).status == 422
    assert refused(client.create_object, PODS, "shop", {"metadata": {}}).message.endswith(
        "name or generateName is required"
    )


def test_one_client_serves_many_threads(fake: FakeKube, client: KubeClient) -> None:
    pod = pod_of(fake.add_pod("shop", "web"))
    errors: list[BaseException] = []

    def post(i: int) -> None:
        try:
            client.create_event(pod, "VolumeFailed", f"event {i}", node_id=NODE)
        except BaseException as exc:  # noqa: BLE001 — reported below
            errors.append(exc)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sorted(e["message"] for e in fake.events_for("shop", "web")) == [f"event {i}" for i in range(8)]
