"""The csi/ kustomizations build with `kubectl kustomize`, are valid Kubernetes, and agree with the plugin.

Every build is what `kubectl apply -k` would send: the base, the CRDs, the upstream-name overlay,
and each component on top of the base (through a temporary kustomization, as an admin composes
them). The arguments the manifests pass to `kvfs csi node` / `kvfs csi mounter` are parsed with
the real CLI parser.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kvfs import __version__
from kvfs.cli import build_parser

CSI = Path(__file__).resolve().parents[2] / "csi"
KUBECTL = shutil.which("kubectl")
DRIVER = "csi.kvfs.io"
UPSTREAM_DRIVER = "secrets-store.csi.k8s.io"
COMPONENTS = sorted(p.parent.name for p in (CSI / "components").glob("*/kustomization.yaml"))

pytestmark = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl is NOT installed: the csi/ kustomizations were neither built nor checked"
    " (install kubectl to test the manifests)",
)


@dataclass(frozen=True)
class Build:
    """The objects one kustomization produces."""

    docs: list[dict[str, Any]]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.all(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
        return found[0]

    @property
    def plugin(self) -> dict[str, Any]:
        return self.one("DaemonSet", "kvfs-csi-node")

    @property
    def mounters(self) -> list[dict[str, Any]]:
        return [d for d in self.all("DaemonSet") if d["metadata"]["labels"].get("app") == "kvfs-mounter"]

    def rules(self) -> list[dict[str, Any]]:
        return list(self.one("ClusterRole", "kvfs-csi-node")["rules"])

    def text(self) -> str:
        return yaml.safe_dump_all(self.docs)


def _container(daemonset: dict[str, Any], name: str) -> dict[str, Any]:
    pod = daemonset["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == name)


def _host_path(daemonset: dict[str, Any], container: dict[str, Any], mount_path: str) -> str:
    """The node folder a container sees at `mount_path`."""
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == mount_path)
    volume = next(v for v in daemonset["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    return str(volume["hostPath"]["path"])


def _grants(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(
        group in r.get("apiGroups", []) and {resource, "*"} & set(r["resources"]) and {verb, "*"} & set(r["verbs"])
        for r in rules
    )


def _kvfs_containers(build: Build) -> Iterator[dict[str, Any]]:
    for daemonset in build.all("DaemonSet"):
        for container in daemonset["spec"]["template"]["spec"]["containers"]:
            if container["image"].split(":")[0] == "kvfs":
                yield container


def _parse(args: list[str]) -> argparse.Namespace:
    """What `kvfs ARGS` parses to; a clear failure (argparse's message) if it refuses them."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return build_parser().parse_args(args)
    except SystemExit:
        raise AssertionError(f"kvfs refuses the manifests' arguments {args}: {stderr.getvalue().strip()}") from None


def _node_args(build: Build) -> argparse.Namespace:
    return _parse(_container(build.plugin, "kvfs-plugin")["args"])


def _metrics_addr(build: Build) -> tuple[str, int]:
    host, _, port = _node_args(build).metrics_addr.rpartition(":")
    return host, int(port)


@pytest.fixture(scope="module")
def kustomize(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Build]:
    """kustomize("base", "sync-secrets", ...): build csi/<target>, with those components on top."""
    built: dict[tuple[str, ...], Build] = {}

    def build(target: str, *components: str) -> Build:
        key = (target, *components)
        if key not in built:
            folder = CSI / target
            if components:
                folder = tmp_path_factory.mktemp("kustomization")
                # kustomize accepts only relative paths to other kustomizations
                spec = {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": [os.path.relpath(CSI / target, folder)],
                    "components": [os.path.relpath(CSI / "components" / c, folder) for c in components],
                }
                (folder / "kustomization.yaml").write_text(yaml.safe_dump(spec))
            assert KUBECTL is not None
            done = subprocess.run([KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"kubectl kustomize {target} {components}: {done.stderr.strip()}"
            built[key] = Build([d for d in yaml.safe_load_all(done.stdout) if d])
        return built[key]

    return build


BUILDS = [
    ("base",),
    ("crds",),
    ("overlays/secrets-store",),
    *[("base", c) for c in COMPONENTS],
    ("overlays/secrets-store", *COMPONENTS),  # everything at once composes
]


@pytest.mark.parametrize("build", BUILDS, ids=lambda b: "+".join(b))
def test_build_is_valid_kubernetes(kustomize: Callable[..., Build], build: tuple[str, ...]) -> None:
    docs = kustomize(*build).docs
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize(
    "folder", sorted(str(k.parent.relative_to(CSI)) for k in CSI.rglob("kustomization.yaml")), ids=str
)
def test_every_kustomization_builds_on_its_own(kustomize: Callable[..., Build], folder: str) -> None:
    """The before-stop check: `kubectl kustomize DIR` for every folder (components build empty)."""
    kustomize(folder)


def test_base_two_daemonsets_plugin_rolls_mounter_is_a_generation(kustomize: Callable[..., Build]) -> None:
    base = kustomize("base")
    assert len(base.all("DaemonSet")) == 2 and len(base.mounters) == 1
    plugin, mounter = base.plugin, base.mounters[0]
    assert plugin["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
    }
    # a generation is never rolled in place, and its name and selector carry the version
    assert mounter["spec"]["updateStrategy"] == {"type": "OnDelete"}
    assert mounter["metadata"]["name"] == f"kvfs-mounter-{__version__}"
    for labels in (
        mounter["metadata"]["labels"],
        mounter["spec"]["selector"]["matchLabels"],
        mounter["spec"]["template"]["metadata"]["labels"],
    ):
        assert labels["kvfs.io/mounter-version"] == __version__
    assert {c["image"] for c in _kvfs_containers(base)} == {f"kvfs:{__version__}"}
    for daemonset in (plugin, mounter):
        assert daemonset["metadata"]["namespace"] == "kube-system"
        assert daemonset["spec"]["template"]["spec"]["hostPID"] is True  # the plugin checks daemons by pid


def test_base_plugin_and_mounter_share_the_state_folder(kustomize: Callable[..., Build]) -> None:
    base = kustomize("base")
    plugin, mounter = base.plugin, base.mounters[0]
    node_container, mounter_container = _container(plugin, "kvfs-plugin"), _container(mounter, "kvfs-mounter")
    node, mounter_args = _node_args(base), _parse(mounter_container["args"])
    assert (node.command, node.csi_command, mounter_args.csi_command) == ("csi", "node", "mounter")
    assert node.no_start_mounter is True  # the mounter DaemonSets run the mounters
    assert _host_path(plugin, node_container, node.state_dir) == _host_path(
        mounter, mounter_container, mounter_args.state_dir
    )
    # metrics on the named port `metrics`, reachable from outside the pod
    host, port = _metrics_addr(base)
    assert host == "0.0.0.0" and {"name": "metrics", "containerPort": port} in node_container["ports"]


def test_base_mounter_holds_no_more_rights_than_it_needs(kustomize: Callable[..., Build]) -> None:
    mounter = kustomize("base").mounters[0]
    pod = mounter["spec"]["template"]["spec"]
    container = _container(mounter, "kvfs-mounter")
    context = container["securityContext"]
    assert not context.get("privileged") and context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]
    assert set(context["capabilities"]["add"]) <= {"SETUID", "SETGID", "KILL", "SYS_RESOURCE"}
    # the plugin passes mounted FUSE fds: no /dev/fuse, no kubelet folders, no API token
    assert {v["hostPath"]["path"] for v in pod["volumes"]} == {"/var/lib/kvfs/csi", "/etc/kubernetes"}
    assert all(m.get("readOnly") for m in container["volumeMounts"] if m["mountPath"] == "/etc/kubernetes")
    assert pod["automountServiceAccountToken"] is False
    assert not pod.get("hostNetwork")  # only with components/pod-identity


def test_csidriver_and_plugin_agree(kustomize: Callable[..., Build]) -> None:
    base = kustomize("base")
    driver = base.one("CSIDriver")
    spec = driver["spec"]
    assert driver["metadata"]["name"] == DRIVER
    assert spec["volumeLifecycleModes"] == ["Ephemeral"] and spec["podInfoOnMount"] is True
    assert spec["requiresRepublish"] is True and spec["attachRequired"] is False
    assert spec["tokenRequests"] == [{"audience": "api://AzureADTokenExchange"}]
    assert spec["fsGroupPolicy"] == "None"
    plugin = base.plugin
    container = _container(plugin, "kvfs-plugin")
    node = _node_args(base)
    assert container["securityContext"]["privileged"] is True
    assert node.driver_name == DRIVER
    pods = next(m for m in container["volumeMounts"] if m["mountPath"] == f"{node.kubelet_dir}/pods")
    assert pods["mountPropagation"] == "Bidirectional"
    # kubelet reaches the socket the plugin serves, through the plugin-dir hostPath
    assert node.endpoint == "unix:///csi/csi.sock"
    registrar = _container(plugin, "node-driver-registrar")
    assert "--csi-address=/csi/csi.sock" in registrar["args"]
    assert f"--kubelet-registration-path={_host_path(plugin, container, '/csi')}/csi.sock" in registrar["args"]
    assert _host_path(plugin, container, "/csi") == f"/var/lib/kubelet/plugins/{DRIVER}"
    example = _example("Pod")["spec"]["volumes"][0]["csi"]
    assert example["driver"] == DRIVER and example["readOnly"] is True


def test_secrets_store_overlay_renames_the_driver_everywhere(kustomize: Callable[..., Build]) -> None:
    overlay = kustomize("overlays/secrets-store")
    assert overlay.one("CSIDriver")["metadata"]["name"] == UPSTREAM_DRIVER
    plugin = overlay.plugin
    container = _container(plugin, "kvfs-plugin")
    assert _node_args(overlay).driver_name == UPSTREAM_DRIVER
    assert _host_path(plugin, container, "/csi") == f"/var/lib/kubelet/plugins/{UPSTREAM_DRIVER}"
    registration = f"--kubelet-registration-path=/var/lib/kubelet/plugins/{UPSTREAM_DRIVER}/csi.sock"
    assert registration in _container(plugin, "node-driver-registrar")["args"]
    assert DRIVER not in overlay.text()
    # nothing else changes: the same objects, one renamed
    base = kustomize("base")
    assert sorted((d["kind"], d["metadata"]["name"]) for d in overlay.docs) == sorted(
        (d["kind"], d["metadata"]["name"].replace(DRIVER, UPSTREAM_DRIVER)) for d in base.docs
    )


def test_base_grants_no_secrets_and_no_pod_deletion(kustomize: Callable[..., Build]) -> None:
    rules = kustomize("base").rules()
    assert not any({"secrets", "*"} & set(r["resources"]) for r in rules)
    assert not _grants(rules, "", "pods", "delete")
    assert _grants(rules, "secrets-store.csi.x-k8s.io", "secretproviderclasses", "get")
    # exactly the verbs kvfs.csi.kube sends (GET by name, POST, PUT, DELETE; the fake API serves no others)
    for verb in ("get", "create", "update", "delete"):
        assert _grants(rules, "secrets-store.csi.x-k8s.io", "secretproviderclasspodstatuses", verb)
    for verb in ("list", "watch", "patch"):
        assert not _grants(rules, "secrets-store.csi.x-k8s.io", "secretproviderclasspodstatuses", verb)
    assert _grants(rules, "", "events", "create") and _grants(rules, "", "pods", "get")


@pytest.mark.parametrize(
    ("component", "flag", "grant"),
    [
        ("sync-secrets", "--sync-secrets", [("secrets", v) for v in ("get", "create", "update", "delete")]),
        ("restart-failed-pods", "--restart-pods-with-failed-volumes", [("pods", "delete")]),
        ("aks-addon-defaults", "--write-cert-and-key-in-separate-files", []),
    ],
)
def test_component_adds_its_flag_and_its_rights(
    kustomize: Callable[..., Build], component: str, flag: str, grant: list[tuple[str, str]]
) -> None:
    base, built = kustomize("base"), kustomize("base", component)
    args = _container(built.plugin, "kvfs-plugin")["args"]
    assert args == [*_container(base.plugin, "kvfs-plugin")["args"], flag]
    for resource, verb in grant:
        assert _grants(built.rules(), "", resource, verb), (resource, verb)
    assert len(built.rules()) == len(base.rules()) + bool(grant)


def test_pod_identity_puts_the_mounters_on_the_host_network(kustomize: Callable[..., Build]) -> None:
    built = kustomize("base", "pod-identity")
    for mounter in built.mounters:
        pod = mounter["spec"]["template"]["spec"]
        assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert not built.plugin["spec"]["template"]["spec"].get("hostNetwork")
    assert "--allow-node-identity" not in _container(built.plugin, "kvfs-plugin")["args"]  # the admin's decision


def test_metrics_service_selects_the_plugin_port(kustomize: Callable[..., Build]) -> None:
    built = kustomize("base", "metrics-service")
    service = built.one("Service", "kvfs-csi-node-metrics")
    template = built.plugin["spec"]["template"]
    assert service["metadata"]["namespace"] == built.plugin["metadata"]["namespace"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    [port] = service["spec"]["ports"]
    named = {p["name"]: p["containerPort"] for p in _container(built.plugin, "kvfs-plugin")["ports"]}
    _, served = _metrics_addr(built)
    assert named[port["targetPort"]] == served == port["port"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == str(served)


@pytest.mark.parametrize("build", [("base",), ("overlays/secrets-store", *COMPONENTS)], ids=lambda b: "+".join(b))
def test_every_argument_is_one_the_cli_accepts(kustomize: Callable[..., Build], build: tuple[str, ...]) -> None:
    for container in _kvfs_containers(kustomize(*build)):
        _parse(container["args"])


def _assert_structural(schema: dict[str, Any], where: str) -> None:
    """The API server accepts only structural schemas: a type at every level, down to the leaves."""
    assert "type" in schema, f"{where}: no type"
    for name, sub in schema.get("properties", {}).items():
        _assert_structural(sub, f"{where}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        _assert_structural(schema["additionalProperties"], f"{where}.*")
    if "items" in schema:
        _assert_structural(schema["items"], f"{where}[]")


def _crd_schema(crds: Build, kind: str, version: str = "v1") -> dict[str, Any]:
    crd = next(d for d in crds.all("CustomResourceDefinition") if d["spec"]["names"]["kind"] == kind)
    assert crd["spec"]["group"] == "secrets-store.csi.x-k8s.io" and crd["spec"]["scope"] == "Namespaced"
    assert [v["name"] for v in crd["spec"]["versions"] if v["storage"]] == ["v1"]
    for served in crd["spec"]["versions"]:
        _assert_structural(served["schema"]["openAPIV3Schema"], f"{kind} {served['name']}")
    entry = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    return dict(entry["schema"]["openAPIV3Schema"])


def test_pod_status_crd_has_upstreams_fields(kustomize: Callable[..., Build]) -> None:
    # the API server drops fields its schema does not name: the names must be exactly upstream's
    schema = _crd_schema(kustomize("crds"), "SecretProviderClassPodStatus")
    status = schema["properties"]["status"]["properties"]
    assert {k: v["type"] for k, v in status.items()} == {
        "podName": "string",
        "secretProviderClassName": "string",
        "mounted": "boolean",
        "targetPath": "string",
        "objects": "array",
    }
    assert {k: v["type"] for k, v in status["objects"]["items"]["properties"].items()} == {
        "id": "string",
        "version": "string",
    }
    assert "spec" not in schema["properties"]


def test_spc_crd_takes_secret_objects(kustomize: Callable[..., Build]) -> None:
    schema = _crd_schema(kustomize("crds"), "SecretProviderClass")
    secret_object = schema["properties"]["spec"]["properties"]["secretObjects"]["items"]["properties"]
    assert set(secret_object) == {"secretName", "type", "labels", "annotations", "data"}
    assert set(secret_object["data"]["items"]["properties"]) == {"objectName", "key"}
    spc = {
        **_example("SecretProviderClass"),
        "spec": {
            **_example("SecretProviderClass")["spec"],
            "secretObjects": [
                {
                    "secretName": "demo-tls",
                    "type": "kubernetes.io/tls",
                    "labels": {"team": "a"},
                    "data": [{"objectName": "demo-cert", "key": "tls.key"}],
                }
            ],
        },
    }
    jsonschema.validate(spc, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**spc, "spec": {**spc["spec"], "secretObjects": [{"labels": {"a": 1}}]}}, schema)


def _example(kind: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((CSI / "example.yaml").read_text()) if d]
    return next(d for d in docs if d["kind"] == kind)


def test_example_is_valid_and_its_spc_parses(kustomize: Callable[..., Build]) -> None:
    from kvfs.config.parameters import parse_parameters
    from kvfs.config.spc import spc_parameters

    for kind in ("ServiceAccount", "Pod"):
        kubernetes_validate.validate(_example(kind), kubernetes_validate.latest_version(), strict=True)
    spc = _example("SecretProviderClass")
    jsonschema.validate(spc, _crd_schema(kustomize("crds"), "SecretProviderClass", spc["apiVersion"].split("/")[1]))
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
