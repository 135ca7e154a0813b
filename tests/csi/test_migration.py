"""Issue 12 end to end: what a team moving from the upstream driver + Azure provider relies on.

kubelet's calls over the plugin's socket, the REAL per-volume daemon against the emulator over
HTTPS, and the fake Kubernetes API: `secretObjects` synced into Secrets (--sync-secrets),
SecretProviderClassPodStatus objects, and upstream's node-wide provider flags on `kvfs csi node`.
One in-process plugin (so tests run its watcher rounds themselves) with its own mounter serves the
module; a second one, without --sync-secrets, shares that mounter.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

import certgen
from csi_harness import (
    FUSE_OK,
    Kubelet,
    _kill_leftover_daemons,
    _stop_mounters,
    newest_mounter,
    short_tmpdir,
    tokens_json,
    wait_for,
)
from fakekube import FakeKube
from kvfs.config.model import RenderDefaults
from kvfs.csi.podstatus import CHECK_INTERVAL
from kvfs.emulator.server import Emulator, EmulatorThread

pytestmark = [pytest.mark.mount, pytest.mark.skipif(not FUSE_OK, reason="needs root and /dev/fuse")]

REAL_DAEMON = "kvfs.daemon.entry:run_volume"
VAULT = "migrate-vault"
# the node's flags in this module: upstream's AKS add-on split, and no chain construction
NODE_DEFAULTS = RenderDefaults(split_cert_key=True, construct_pem_chain=False)


def objects_yaml(*objects: dict[str, str]) -> str:
    """The upstream `objects` shape: a mapping with `array`, each item a YAML string."""
    return yaml.safe_dump({"array": [yaml.safe_dump(o, sort_keys=False) for o in objects]}, sort_keys=False)


@dataclass
class Pod:
    """One pod mounting one SecretProviderClass: who it is and what kubelet sends for it."""

    name: str
    namespace: str
    spc: str
    token: str = field(repr=False)
    uid: str = ""
    target: str = ""
    volume_id: str = ""

    def volume_context(self) -> dict[str, str]:
        return {
            "secretProviderClass": self.spc,
            "csi.storage.k8s.io/pod.name": self.name,
            "csi.storage.k8s.io/pod.namespace": self.namespace,
            "csi.storage.k8s.io/pod.uid": self.uid,
            "csi.storage.k8s.io/serviceAccount.name": "app",
            "csi.storage.k8s.io/ephemeral": "true",
            "csi.storage.k8s.io/serviceAccount.tokens": tokens_json(self.token),
        }


class World:
    """The emulator (one vault, one app federated to `app` in every namespace) and the fake API."""

    def __init__(self, emu: Emulator, kube: FakeKube, base: Path) -> None:
        self.emu = emu
        self.kube = kube
        self.base = base
        emu.add_vault(VAULT)
        self.app = emu.identity.add_app()
        emu.grant(VAULT, self.app.client_id)
        self.federated: set[str] = set()

    def parameters(self, *objects: dict[str, str], **extra: str) -> dict[str, str]:
        return {
            "tenantId": self.emu.tenant_id,
            "clientID": self.app.client_id,
            "keyvaultName": VAULT,
            "cloudName": "AzureStackCloud",
            "cloudEnvFileName": str(self.emu.cloud_env_file),
            "objects": objects_yaml(*objects),
            **extra,
        }

    def pod(self, namespace: str, name: str, spc: str) -> Pod:
        """A pod of `namespace` (its service account federated to the app) mounting `spc`."""
        if namespace not in self.federated:
            self.federated.add(namespace)
            self.emu.identity.add_federated_credential(
                self.app.client_id, issuer=self.emu.oidc_issuer, subject=f"system:serviceaccount:{namespace}:app"
            )
        token = self.emu.identity.mint_sa_token(namespace, "app", pod=name)
        pod = Pod(name, namespace, spc, token, uid=f"0c0ffee0-0000-4000-8000-{os.urandom(6).hex()}")
        pod.volume_id = f"csi-{os.urandom(8).hex()}"
        pod.target = str(Path(self.base, "kubelet", "pods", pod.uid, "volumes", "kubernetes.io~csi", "vol", "mount"))
        Path(pod.target).parent.mkdir(parents=True, exist_ok=True)
        return pod


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    if not FUSE_OK:
        pytest.skip("needs root and /dev/fuse")
    base = Path(tempfile.mkdtemp(prefix="kvfsmig-", dir="/tmp"))
    base.chmod(0o700)  # daemons read the CA and cloud env files before they drop privileges
    kube = FakeKube(base / "kube")
    try:
        with EmulatorThread(base / "emulator", vaults=()) as emu, pytest.MonkeyPatch.context() as mp:
            mp.setenv("SSL_CERT_FILE", str(emu.ca_file))  # passed on to the mounter and every daemon
            yield World(emu, kube, base)
    finally:
        kube.close()
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Node:
    """The in-process plugin (`volumes`), kubelet's side of its socket, and the world."""

    world: World
    volumes: Any
    kubelet: Kubelet

    def publish(self, pod: Pod) -> None:
        self.kubelet.publish(pod.volume_id, pod.target, pod.volume_context(), token=None, timeout=60)

    def unpublish(self, pod: Pod) -> None:
        self.kubelet.unpublish(pod.volume_id, pod.target)

    def watch_until(self, predicate: Callable[[], Any], what: str) -> Any:
        """Run the plugin's watcher rounds (its thread's job) until `predicate` holds."""
        return wait_for(lambda: self.volumes.watcher.poll() is not None and predicate(), 60, what)


@contextlib.contextmanager
def plugin(world: World, **overrides: Any) -> Iterator[Node]:
    """An in-process plugin with the real daemon; it starts a mounter unless given one's socket."""
    from kvfs.csi.node import serve
    from kvfs.csi.volumes import NodeConfig, Volumes

    state_dir = short_tmpdir()
    settings: dict[str, Any] = dict(
        node_id="node-1",
        state_dir=state_dir,
        daemon_entry=REAL_DAEMON,
        mounter_log=os.path.join(state_dir, "mounter.log"),
        kubelet_dir=str(world.base / "kubelet"),
        kubeconfig=str(world.kube.kubeconfig(world.base / "kubeconfig")),
        cloud_env_dir=str(world.emu.cloud_env_file.parent),
        publish_timeout=30.0,
        render_defaults=NODE_DEFAULTS,
        sync_secrets=True,
    )
    settings.update(overrides)
    config = NodeConfig(**settings)
    volumes = Volumes(config)
    endpoint = f"unix://{state_dir}/csi.sock"
    server = serve(volumes, endpoint, workers=4)
    kubelet = Kubelet(endpoint, state_dir)
    try:
        yield Node(world, volumes, kubelet)
    finally:
        kubelet.cleanup()
        server.stop(grace=1).wait()
        volumes.recorder.close()
        _kill_leftover_daemons(state_dir)
        if config.start_mounter:
            _stop_mounters(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def node(world: World) -> Iterator[Node]:
    with plugin(world) as started:
        yield started


def subjects(pem: bytes) -> list[str]:
    """The common names of the CERTIFICATE blocks of a PEM file, in file order."""
    return [c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value for c in x509.load_pem_x509_certificates(pem)]


# ---- node-wide provider flags ----------------------------------------------------------------


def test_node_wide_flags_set_the_files_of_volumes_whose_class_does_not(node: Node) -> None:
    world = node.world
    chain = certgen.make_chain(3, key_type="rsa")  # leaf, int1, root
    shuffled = [chain.leaf, chain.root, chain.certs[1]]  # a PFX whose bags are not in chain order
    world.emu.import_certificate(VAULT, "web", pfx=certgen.pfx(chain.leaf_key, shuffled), keep_value=True)
    web = {"objectName": "web", "objectType": "secret"}
    world.kube.add_spc("team-a", "follows-node", world.parameters(web))
    world.kube.add_spc(
        "team-a",
        "says-own",
        world.parameters(web, writeCertAndKeyInSeparateFiles="false", constructPEMChain="true"),
    )
    follows = world.pod("team-a", "follows", "follows-node")
    own = world.pod("team-a", "own", "says-own")
    node.publish(follows)
    node.publish(own)

    # the node's flags: .crt and .key beside the file, the PFX's certificates in bag order
    assert sorted(os.listdir(follows.target)) == ["..data", "web", "web.crt", "web.key"]
    combined = Path(follows.target, "web").read_bytes()
    assert subjects(combined) == ["leaf", "root", "int1"]
    assert Path(follows.target, "web.crt").read_bytes() == certgen.certs_pem(shuffled)
    assert Path(follows.target, "web.key").read_bytes() == certgen.key_pem(chain.leaf_key)
    # the class's own parameters win over the node's
    assert sorted(os.listdir(own.target)) == ["..data", "web"]
    assert subjects(Path(own.target, "web").read_bytes()) == ["leaf", "int1", "root"]
    node.unpublish(follows)
    node.unpublish(own)


# ---- secretObjects → Kubernetes Secrets, SecretProviderClassPodStatus -----------------------


def secret(world: World, namespace: str, name: str) -> dict[str, Any] | None:
    return world.kube.get("secrets", namespace, name)


def data_of(obj: dict[str, Any] | None) -> dict[str, bytes]:
    assert obj is not None
    return {key: base64.b64decode(value) for key, value in obj["data"].items()}


def owners(obj: dict[str, Any] | None) -> list[str]:
    assert obj is not None
    return sorted(f"{r['kind']}/{r['name']}" for r in obj["metadata"].get("ownerReferences") or [])


def pod_status(world: World, pod: Pod) -> dict[str, Any] | None:
    return world.kube.get("secretproviderclasspodstatuses", pod.namespace, f"{pod.name}-{pod.namespace}-{pod.spc}")


def traditional_key(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


STATUSES = "secretproviderclasspodstatuses"

SYNCED = [
    {
        "secretName": "db",
        "type": "Opaque",
        "labels": {"app": "shop"},
        "annotations": {"team": "payments"},
        "data": [{"objectName": "conf/db", "key": "password"}, {"objectName": "web.crt", "key": "web.crt"}],
    },
    {
        "secretName": "web-tls",
        "type": "kubernetes.io/tls",
        "data": [{"objectName": "web", "key": "tls.crt"}, {"objectName": "web", "key": "tls.key"}],
    },
]


def test_two_pods_sync_secrets_that_follow_rotations_and_go_with_the_last_pod(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    world = node.world
    caplog.set_level(logging.DEBUG)
    first_password = "pw-one-" + os.urandom(6).hex()
    world.emu.set_secret(VAULT, "shop-db", first_password)
    chain = certgen.make_chain(3, key_type="rsa")
    world.emu.import_certificate(VAULT, "shop-web", pfx=certgen.pfx(chain.leaf_key, chain.certs))  # PFX-backed
    # in the class but in no secretObjects entry: never read, so never fetched. A key, so the
    # emulator's per-route count tells whether anything fetched it
    world.emu.import_key(VAULT, "shop-signing", certgen.make_key())
    keys_fetched = world.emu.count(vault=VAULT, route="get_key")
    objects = [
        {"objectName": "shop-db", "objectType": "secret", "objectAlias": "conf/db"},
        {"objectName": "shop-web", "objectType": "secret", "objectAlias": "web"},
        {"objectName": "shop-signing", "objectType": "key"},
    ]
    world.kube.add("secretproviderclasses", {
        "apiVersion": "secrets-store.csi.x-k8s.io/v1", "kind": "SecretProviderClass",
        "metadata": {"name": "shop", "namespace": "shop"},
        "spec": {"provider": "azure", "parameters": world.parameters(*objects, refreshInterval="1s"),
                 "secretObjects": SYNCED},
    })  # fmt: skip
    first, second = world.pod("shop", "shop-1", "shop"), world.pod("shop", "shop-2", "shop")
    node.publish(first)
    node.publish(second)

    db, tls = secret(world, "shop", "db"), secret(world, "shop", "web-tls")
    assert data_of(db) == {
        "password": Path(first.target, "conf/db").read_bytes(),
        "web.crt": Path(first.target, "web.crt").read_bytes(),  # the node's split files count as files
    }
    assert data_of(db)["password"] == first_password.encode()
    combined = Path(first.target, "web").read_bytes()
    assert data_of(tls) == {
        "tls.crt": b"".join(certgen.cert_pem(c) for c in x509.load_pem_x509_certificates(combined)),
        "tls.key": traditional_key(chain.leaf_key),
    }
    assert data_of(tls)["tls.key"].startswith(b"-----BEGIN RSA PRIVATE KEY-----\n")
    assert db is not None and tls is not None
    assert db["type"] == "Opaque" and tls["type"] == "kubernetes.io/tls"
    assert db["metadata"]["labels"] == {"app": "shop", "secrets-store.csi.k8s.io/managed": "true"}
    assert tls["metadata"]["labels"] == {"secrets-store.csi.k8s.io/managed": "true"}
    assert db["metadata"]["annotations"] == {"team": "payments"}
    both = [f"SecretProviderClassPodStatus/{p.name}-shop-shop" for p in (first, second)]
    assert owners(db) == owners(tls) == both
    assert world.emu.count(vault=VAULT, route="get_key") == keys_fetched  # the sync fetched only what it syncs

    # a status object per pod, owned by the pod, listing the versions served (the sync read two objects)
    for pod in (first, second):
        status = pod_status(world, pod)
        assert status is not None
        assert status["metadata"]["labels"] == {"internal.secrets-store.csi.k8s.io/node-name": "node-1"}
        assert [(r["kind"], r["name"], r["uid"]) for r in status["metadata"]["ownerReferences"]] == [
            ("Pod", pod.name, pod.uid)
        ]
        assert {k: status["status"][k] for k in ("podName", "secretProviderClassName", "mounted", "targetPath")} == {
            "podName": pod.name, "secretProviderClassName": "shop", "mounted": True, "targetPath": pod.target,
        }  # fmt: skip
    node.watch_until(
        lambda: [o["id"] for o in pod_status(world, first)["status"]["objects"]] == ["secret/shop-db", "secret/shop-web"],
        "the status to list what was served",
    )

    # a rotation reaches the Secrets of both pods' class, and the status objects
    second_password = "pw-two-" + os.urandom(6).hex()
    new_db = world.emu.set_secret(VAULT, "shop-db", second_password)
    rotated = certgen.make_chain(2, key_type="ec")
    new_web = world.emu.import_certificate(VAULT, "shop-web", pfx=certgen.pfx(rotated.leaf_key, rotated.certs))
    node.watch_until(
        lambda: data_of(secret(world, "shop", "db"))["password"] == second_password.encode()
        and data_of(secret(world, "shop", "web-tls"))["tls.key"] == traditional_key(rotated.leaf_key),
        "the Secrets to follow the rotation",
    )
    assert data_of(secret(world, "shop", "web-tls"))["tls.key"].startswith(b"-----BEGIN EC PRIVATE KEY-----\n")
    for pod in (first, second):  # each pod's daemon refreshes on its own
        wait_for(lambda: Path(pod.target, "conf/db").read_bytes() == second_password.encode(), 30, "the file")
    assert data_of(secret(world, "shop", "web-tls"))["tls.crt"] == certgen.certs_pem(rotated.certs)
    node.watch_until(
        lambda: all(
            {o["id"]: o["version"] for o in pod_status(world, p)["status"]["objects"]}
            == {"secret/shop-db": new_db, "secret/shop-web": new_web}
            for p in (first, second)
        ),
        "the status objects to list the new versions",
    )

    assert world.emu.count(vault=VAULT, route="get_key") == keys_fetched  # nor at the rotation
    node.unpublish(first)  # one owner goes, the Secrets stay
    assert pod_status(world, first) is None
    assert owners(secret(world, "shop", "db")) == owners(secret(world, "shop", "web-tls")) == both[1:]
    node.unpublish(second)  # the last one: the Secrets go with it
    assert pod_status(world, second) is None
    assert secret(world, "shop", "db") is None and secret(world, "shop", "web-tls") is None

    # the values went from the daemon to the API, never through a log line
    logs = caplog.text + Path(node.volumes.config.mounter_log).read_text(errors="replace")
    for value in (first_password, second_password):
        assert value not in logs and base64.b64encode(value.encode()).decode() not in logs


def add_synced_class(world: World, namespace: str, name: str, secret_name: str, file_object: str) -> None:
    world.kube.add("secretproviderclasses", {
        "apiVersion": "secrets-store.csi.x-k8s.io/v1", "kind": "SecretProviderClass",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"provider": "azure", "parameters": world.parameters({"objectName": file_object, "objectType": "secret"}),
                 "secretObjects": [{"secretName": secret_name, "type": "Opaque",
                                    "data": [{"objectName": file_object, "key": "value"}]}]},
    })  # fmt: skip


def test_a_secret_kvfs_did_not_create_is_never_written_and_the_pod_is_told(node: Node) -> None:
    world = node.world
    world.emu.set_secret(VAULT, "foreign-src", "from-key-vault")
    foreign = world.kube.add("secrets", {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "hand-made", "namespace": "ops", "labels": {"owner": "someone"}},
        "data": {"value": base64.b64encode(b"hand written").decode()},
    })  # fmt: skip
    add_synced_class(world, "ops", "clash", "hand-made", "foreign-src")
    pod = world.pod("ops", "clash-1", "clash")
    node.publish(pod)  # the publish itself succeeds
    assert Path(pod.target, "foreign-src").read_bytes() == b"from-key-vault"
    assert secret(world, "ops", "hand-made") == foreign  # not a byte, label or owner changed
    assert node.volumes.recorder.flush()
    [event] = world.kube.events_for("ops", "clash-1")
    assert (event["type"], event["reason"]) == ("Warning", "SecretSyncRefused")
    assert "hand-made" in event["message"] and "secrets-store.csi.k8s.io/managed=true" in event["message"]
    assert event["involvedObject"]["uid"] == pod.uid
    node.unpublish(pod)
    assert secret(world, "ops", "hand-made") == foreign  # nor deleted


def test_without_sync_secrets_nothing_is_written_but_the_status_objects(node: Node) -> None:
    world = node.world
    world.emu.set_secret(VAULT, "quiet-src", "stays-in-the-volume")
    add_synced_class(world, "quiet", "quiet", "quiet-copy", "quiet-src")
    pod = world.pod("quiet", "quiet-1", "quiet")
    already = len(world.kube.requests)
    mounter = newest_mounter(node.volumes.config.state_dir).socket_path
    with plugin(world, sync_secrets=False, mounter_socket=mounter, start_mounter=False) as other:
        other.publish(pod)
        assert Path(pod.target, "quiet-src").read_bytes() == b"stays-in-the-volume"
        assert pod_status(world, pod) is not None  # always on
        other.unpublish(pod)
    assert not [r for r in world.kube.requests[already:] if r.path.startswith("/api/v1/namespaces/quiet/secrets")]
    assert world.kube.items("secrets", "quiet") == [] and pod_status(world, pod) is None


def test_a_pod_gone_without_unpublish_takes_its_status_and_last_secret_along(node: Node) -> None:
    """A node lost with its pods: the garbage collector follows pod → status object → Secret."""
    world = node.world
    world.emu.set_secret(VAULT, "gc-src", "collected")
    add_synced_class(world, "gc", "gc", "gc-copy", "gc-src")
    pods = [world.pod("gc", f"gc-{i}", "gc") for i in (1, 2)]
    for pod in pods:
        world.kube.add_pod("gc", pod.name, uid=pod.uid)
        node.publish(pod)
    assert data_of(secret(world, "gc", "gc-copy")) == {"value": b"collected"}
    world.kube.delete_pod("gc", "gc-1")
    assert pod_status(world, pods[0]) is None and owners(secret(world, "gc", "gc-copy")) == ["SecretProviderClassPodStatus/gc-2-gc-gc"]
    world.kube.delete_pod("gc", "gc-2")
    assert pod_status(world, pods[1]) is None and secret(world, "gc", "gc-copy") is None
    for pod in pods:  # kubelet's late unpublish finds nothing left to release
        node.unpublish(pod)


def test_a_status_object_deleted_under_a_running_pod_is_made_again_with_its_secret(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admin (or a CRD removed during a switch-over) deletes a mounted pod's status object, and
    the garbage collector the Secret only it owned. A republish makes both again once CHECK_INTERVAL
    has passed since the status was last seen; a rotation's sync at once."""
    world = node.world
    first = world.emu.set_secret(VAULT, "renew-src", "one")
    world.kube.add("secretproviderclasses", {
        "apiVersion": "secrets-store.csi.x-k8s.io/v1", "kind": "SecretProviderClass",
        "metadata": {"name": "renew", "namespace": "renew"},
        "spec": {"provider": "azure",
                 "parameters": world.parameters({"objectName": "renew-src", "objectType": "secret"}, refreshInterval="1s"),
                 "secretObjects": [{"secretName": "renew-copy", "type": "Opaque",
                                    "data": [{"objectName": "renew-src", "key": "value"}]}]},
    })  # fmt: skip
    pod = world.pod("renew", "renew-1", "renew")
    world.kube.add_pod("renew", pod.name, uid=pod.uid)
    now = [0.0]
    monkeypatch.setattr(node.volumes.statuses, "clock", lambda: now[0])
    node.publish(pod)  # the status is seen at 0
    node.watch_until(
        lambda: pod_status(world, pod)["status"]["objects"] == [{"id": "secret/renew-src", "version": first}],
        "the status to list what was served",
    )
    name = f"{pod.name}-renew-renew"

    world.kube.delete(STATUSES, "renew", name)
    assert secret(world, "renew", "renew-copy") is None  # collected with its only owner
    asked = len(world.kube.requests)
    now[0] += CHECK_INTERVAL - 1
    node.publish(pod)  # too soon to check
    assert not [r for r in world.kube.requests[asked:] if STATUSES in r.path] and pod_status(world, pod) is None
    now[0] += 1
    node.publish(pod)
    status = pod_status(world, pod)
    assert status is not None and status["status"]["objects"] == [{"id": "secret/renew-src", "version": first}]
    assert status["status"]["targetPath"] == pod.target and status["metadata"]["ownerReferences"][0]["uid"] == pod.uid
    assert data_of(secret(world, "renew", "renew-copy")) == {"value": b"one"}
    assert owners(secret(world, "renew", "renew-copy")) == [f"SecretProviderClassPodStatus/{name}"]

    world.kube.delete(STATUSES, "renew", name)  # again, and then the secret rotates: no republish needed
    second = world.emu.set_secret(VAULT, "renew-src", "two")
    node.watch_until(
        lambda: (s := secret(world, "renew", "renew-copy")) is not None and data_of(s) == {"value": b"two"},
        "the rotation's sync to make the Secret again",
    )
    status = pod_status(world, pod)
    assert status is not None and status["status"]["objects"] == [{"id": "secret/renew-src", "version": second}]
    assert [r["uid"] for r in secret(world, "renew", "renew-copy")["metadata"]["ownerReferences"]] == [
        status["metadata"]["uid"]
    ]
    node.unpublish(pod)
    assert pod_status(world, pod) is None and secret(world, "renew", "renew-copy") is None
