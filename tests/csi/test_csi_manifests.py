"""The csi/ manifests validate offline against Kubernetes schemas and agree with the plugin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

CSI = Path(__file__).resolve().parents[2] / "csi"


def _docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(CSI.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def _find(kind: str, name: str | None = None) -> dict[str, Any]:
    for _, doc in _docs():
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name):
            return doc
    raise AssertionError(f"no {kind} {name or ''}")


@pytest.mark.parametrize(("file", "doc"), [d for d in _docs() if d[1]["kind"] != "SecretProviderClass"],
                         ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_is_valid_kubernetes(file: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_example_spc_matches_the_crd_and_parses() -> None:
    import jsonschema

    from kvfs.config.parameters import parse_parameters
    from kvfs.config.spc import spc_parameters

    crd = _find("CustomResourceDefinition")
    spc = _find("SecretProviderClass")
    version = next(v for v in crd["spec"]["versions"] if v["name"] == spc["apiVersion"].split("/")[1])
    jsonschema.validate(spc, version["schema"]["openAPIV3Schema"])
    params = spc_parameters(spc)
    params.update(
        {
            "csi.storage.k8s.io/pod.name": "kvfs-demo",
            "csi.storage.k8s.io/pod.namespace": "default",
            "csi.storage.k8s.io/serviceAccount.tokens": '{"api://AzureADTokenExchange": {"token": "x.y.z"}}',
        }
    )
    config = parse_parameters(params, None, context="csi")
    assert [o.name for o in config.objects] == ["demo-secret"]
    assert config.auth.mode == "workload_identity"


def test_csidriver_and_daemonset_agree() -> None:
    driver = _find("CSIDriver")
    spec = driver["spec"]
    assert spec["volumeLifecycleModes"] == ["Ephemeral"] and spec["podInfoOnMount"] is True
    assert spec["requiresRepublish"] is True and spec["attachRequired"] is False
    assert spec["tokenRequests"] == [{"audience": "api://AzureADTokenExchange"}]
    assert spec["fsGroupPolicy"] == "None"
    pod = _find("DaemonSet")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    plugin = containers["kvfs-plugin"]
    assert plugin["securityContext"]["privileged"] is True
    assert f"--driver-name={driver['metadata']['name']}" in plugin["args"]
    pods_mount = next(m for m in plugin["volumeMounts"] if m["mountPath"] == "/var/lib/kubelet/pods")
    assert pods_mount["mountPropagation"] == "Bidirectional"
    assert containers["kvfs-mounter"]["args"][:2] == ["csi", "mounter"]
    example = _find("Pod")["spec"]["volumes"][0]["csi"]
    assert example["driver"] == driver["metadata"]["name"] and example["readOnly"] is True


def test_secrets_store_overlay_patches_the_right_fields() -> None:
    overlay = yaml.safe_load((CSI / "overlays" / "secrets-store" / "kustomization.yaml").read_text())
    for patch in overlay["patches"]:
        target = _find(patch["target"]["kind"], patch["target"]["name"])
        for op in yaml.safe_load(patch["patch"]):
            node: Any = target
            *parents, last = op["path"].strip("/").split("/")
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            current = node[int(last)] if isinstance(node, list) else node[last]
            # the patched field holds the same kind of value, with the kvfs name in it
            assert op["value"] == current.replace("csi.kvfs.io", "secrets-store.csi.k8s.io")
            assert current != op["value"]
