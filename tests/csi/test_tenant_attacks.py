"""Issue 9: a tenant with rights in one namespace attacks the node plugin with what it may write,
its pods' volume attributes and its SecretProviderClasses.

The real plugin (kvfs.csi.node.serve over its gRPC socket, default flags: no inline parameters)
with the fake Kubernetes API and stand-in daemons. Each attack is refused with the stated code
(a gRPC deadline of a few seconds turns a hang into a failure), no API call leaves the tenant's
namespace, and another tenant's already-published volume keeps serving.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_harness import Kubelet, inline_params
from fakekube import FakeKube
from kvfs.csi.kube import KubeClient

pytestmark = pytest.mark.mount

TENANT, VICTIM = "tenant", "victim"
DEADLINE = 5.0
# the class a volume names, and its pods' SecretProviderClassPodStatus objects: all in the tenant's namespace
_TENANT_PATH = re.compile(
    rf"^/apis/secrets-store\.csi\.x-k8s\.io/v1/namespaces/{TENANT}/"
    r"(secretproviderclasses/[a-z0-9.-]+|secretproviderclasspodstatuses(/[a-z0-9.-]+)?)$"
)
CLOUD_ENV = {
    "activeDirectoryEndpoint": "https://adfs.local.azurestack.external/adfs/",
    "keyVaultEndpoint": "https://vault.local.azurestack.external/",
    "keyVaultDNSSuffix": "vault.local.azurestack.external",
}


def spc_parameters(**extra: str) -> dict[str, str]:
    """A valid workload-identity class (what a tenant may legitimately write)."""
    params = {k: v for k, v in inline_params().items() if not k.startswith("csi.storage.k8s.io/")}
    params.update(extra)
    return params


def pod_attributes(namespace: str, spc: str, **extra: str) -> dict[str, str]:
    """volume_context as kubelet sends it for a pod in `namespace` naming `spc`, plus `extra`."""
    attrs = {k: v for k, v in inline_params().items() if k.startswith("csi.storage.k8s.io/")}
    attrs["csi.storage.k8s.io/pod.namespace"] = namespace
    attrs["secretProviderClass"] = spc
    attrs.update(extra)
    return attrs


@dataclass
class Node:
    kubelet: Kubelet
    kube: FakeKube
    base: Path
    cloud_dir: Path
    victim: str  # the other tenant's mounted volume

    def attack(self, name: str, attributes: dict[str, str], **kw: Any) -> grpc.RpcError:
        """A publish that must be refused; nothing may be left at its target."""
        target = self.kubelet.target(self.base, name)
        with pytest.raises(grpc.RpcError) as info:
            self.kubelet.publish(f"vol-{name}", target, attributes, timeout=DEADLINE, **kw)
        assert not os.path.exists(target)
        return info.value

    def tenant_class(self, name: str, **parameters: str) -> dict[str, str]:
        """A class the tenant writes in its own namespace, and the attributes of a pod using it."""
        self.kube.add_spc(TENANT, name, spc_parameters(**parameters))
        return pod_attributes(TENANT, name)

    def assert_boundary_held(self) -> None:
        paths = [request.path for request in self.kube.requests]
        assert all(_TENANT_PATH.match(path) for path in paths), paths
        assert Path(self.victim, "secret").read_text() == "victim bytes\n"
        assert self.kubelet.probe() is True


@pytest.fixture
def node(csi_plugin: Kubelet, tmp_path: Path) -> Iterator[Node]:
    kube = FakeKube(tmp_path / "kube")
    cloud_dir = tmp_path / "clouds"
    cloud_dir.mkdir()
    (cloud_dir / "stack.json").write_text(json.dumps(CLOUD_ENV))
    kubeconfig = kube.kubeconfig(tmp_path / "kubeconfig")
    kubelet = csi_plugin.make(  # type: ignore[attr-defined]
        kube_factory=lambda: KubeClient.from_kubeconfig(str(kubeconfig)), cloud_env_dir=str(cloud_dir)
    )
    kube.add_spc(VICTIM, "victim", spc_parameters(**{"standin.file.secret": "victim bytes\n"}))
    victim = kubelet.target(tmp_path, "victim")
    kubelet.publish("vol-victim", victim, pod_attributes(VICTIM, "victim"), timeout=DEADLINE)
    kube.requests.clear()
    try:
        yield Node(kubelet, kube, tmp_path, cloud_dir, victim)
    finally:
        kube.close()


def test_a_volume_must_name_a_secret_provider_class(node: Node) -> None:
    err = node.attack("inline", inline_params(**{"standin.file.x": "pod's own parameters"}))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "names no secretProviderClass" in err.details() and "--allow-inline-parameters" in err.details()
    assert node.kube.requests == []
    node.assert_boundary_held()


def test_pod_attributes_cannot_override_the_class(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    """Keys an admission policy would check on the class, written into the pod instead, are ignored."""
    caplog.set_level(logging.WARNING, logger="kvfs.csi.request")
    attributes = node.tenant_class("mine", **{"standin.file.a": "from the class\n"})
    attributes.update(
        {
            "standin.file.a": "from the pod\n",
            "standin.file.b": "POD-VALUE-b\n",
            "keyvaultName": "someone-elses",
            "useVMManagedIdentity": "true",  # would be FAILED_PRECONDITION if it were taken
            "cloudName": "AzureStackCloud",
            "cloudEnvFileName": "/dev/zero",
            "kvfs.io/volumeMountGroup": "0",
        }
    )
    target = node.kubelet.target(node.base, "mine")
    node.kubelet.publish("vol-mine", target, attributes, timeout=DEADLINE)
    assert sorted(os.listdir(target)) == ["a"]
    assert Path(target, "a").read_text() == "from the class\n"
    warnings = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(warnings) == 1
    for key in ("keyvaultName", "useVMManagedIdentity", "cloudEnvFileName", "kvfs.io/volumeMountGroup"):
        assert repr(key) in warnings[0]
    assert "POD-VALUE" not in caplog.text and "/dev/zero" not in caplog.text  # names, never values
    node.kubelet.unpublish("vol-mine", target)
    node.assert_boundary_held()


@pytest.mark.parametrize(
    "name",
    ["../../victim/secretproviderclasses/victim", "victim?x=1", "x/../../../victim/secretproviderclasses/victim",
     "%2e%2e", "..", "Victim", "a b"],
)  # fmt: skip
def test_class_names_that_would_leave_the_namespace_are_refused_before_any_api_call(node: Node, name: str) -> None:
    err = node.attack("path", pod_attributes(TENANT, name))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a valid object name" in err.details()
    assert node.kube.requests == []
    node.assert_boundary_held()


def test_an_api_answer_about_another_object_is_refused(node: Node) -> None:
    node.kube.add_spc(TENANT, "mine", spc_parameters(), metadata={"namespace": VICTIM, "name": "victim"})
    err = node.attack("mixup", pod_attributes(TENANT, "mine"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "the Kubernetes API answered" in err.details()
    assert [request.path for request in node.kube.requests] == [
        f"/apis/secrets-store.csi.x-k8s.io/v1/namespaces/{TENANT}/secretproviderclasses/mine"
    ]
    node.assert_boundary_held()


@pytest.mark.parametrize(
    ("plant", "problem"),
    [
        ("/dev/zero", "is not a file inside"),
        ("/etc/shadow", "is not a file inside"),
        ("/etc/hostname", "is not a file inside"),
        ("/no/such/file.json", "is not a file inside"),
        ("{dir}/../kube/ca.crt", "is not a file inside"),
        ("{dir}/shadow-link", "is not a file inside"),
        ("{dir}/fifo", "is not a regular file"),
        ("{dir}/folder", "is not a regular file"),
        ("{dir}/zero-link", "is not a file inside"),
        ("{dir}/huge.json", "is larger than 64 KiB"),
        ("{dir}/leaky.json", "keyVaultDNSSuffix is not a host name"),
        ("stack.json", "is not a file inside"),
    ],
)
def test_cloud_env_files_outside_the_admin_folder_or_unsafe_are_refused(node: Node, plant: str, problem: str) -> None:
    """The privileged plugin opens none of these: no hang (FIFO), no OOM (/dev/zero, 10 MiB), no
    content or existence of node files in the answer."""
    folder = node.cloud_dir
    os.mkfifo(folder / "fifo")
    (folder / "folder").mkdir()
    (folder / "shadow-link").symlink_to("/etc/shadow")
    (folder / "zero-link").symlink_to("/dev/zero")
    (folder / "huge.json").write_bytes(b" " * (10 * 1024 * 1024))
    (folder / "leaky.json").write_text(json.dumps({**CLOUD_ENV, "keyVaultDNSSuffix": "NODE_SECRET_4711"}))
    attributes = node.tenant_class("cloud", cloudName="AzureStackCloud", cloudEnvFileName=plant.format(dir=folder))
    err = node.attack("cloud", attributes)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in err.details() and "cloudEnvFileName" in err.details()
    assert "NODE_SECRET" not in err.details() and "root:" not in err.details()
    assert "no such file" not in err.details()
    node.assert_boundary_held()


def test_the_admin_folders_cloud_env_file_is_used(node: Node) -> None:
    attributes = node.tenant_class("cloud", cloudName="AzureStackCloud", cloudEnvFileName=str(node.cloud_dir / "stack.json"))
    target = node.kubelet.target(node.base, "cloud")
    node.kubelet.publish("vol-cloud", target, attributes, timeout=DEADLINE)
    assert os.listdir(target) == ["hello"]
    node.kubelet.unpublish("vol-cloud", target)
    node.assert_boundary_held()


@pytest.mark.parametrize(
    ("field", "value"),
    [("clientID", "x'; touch /tmp/kvfs-pwned; '"), ("tenantID", "$(id)"), ("clientID", "not-a-guid")],
)
def test_ids_are_checked_before_use(node: Node, field: str, value: str) -> None:
    err = node.attack("ids", node.tenant_class("ids", **{field: value}))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.details() and ("is not a GUID" in err.details() or "is not a tenant ID" in err.details())
    node.assert_boundary_held()


def test_a_huge_version_history_is_refused_naming_the_field_the_value_and_the_fix(node: Node) -> None:
    """2^31-1 history files would be 2^31-1 version GETs and inodes in a daemon: refused at publish."""
    objects = "array:\n  - |\n    objectName: s\n    objectType: secret\n    objectVersionHistory: 2147483647\n"
    err = node.attack("history", node.tenant_class("history", objects=objects))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid objectVersionHistory: 2147483647, must be at most 100" in err.details()
    assert "use a number from 2 to 100" in err.details()
    node.assert_boundary_held()


def test_target_paths_outside_kubelets_pod_folders_are_refused(node: Node, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    escape = tmp_path / "pods" / "escape"
    escape.symlink_to(outside)  # a symlinked parent leading out of pods/
    link_target = Path(node.kubelet.target(tmp_path, "linked"))
    link_target.symlink_to(outside)  # the target itself a symlink: mount(2) would follow it
    attributes = node.tenant_class("mine")
    outside_pods = [
        "/etc/kvfs-attack",
        str(tmp_path / "pods"),
        f"{tmp_path}/pods/../outside/mount",
        str(escape / "volumes" / "kubernetes.io~csi" / "vol" / "mount"),
        str(tmp_path / "podsx" / "mount"),
    ]
    for target in [*outside_pods, str(link_target)]:
        with pytest.raises(grpc.RpcError) as info:
            node.kubelet.publish("vol-path", target, attributes, timeout=DEADLINE)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, target
        assert "target_path" in info.value.details()
    for target in outside_pods:
        with pytest.raises(grpc.RpcError) as info:
            node.kubelet.unpublish("vol-path", target, timeout=DEADLINE)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, target
    assert os.listdir(outside) == []
    assert not Path("/etc/kvfs-attack").exists()
    node.assert_boundary_held()
