"""Requests the plugin must refuse, identity/node-info RPCs, idempotent unpublish, no leaks."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import grpc
import pytest

from conftest import INLINE
from csi_harness import Kubelet, inline_params, pb2, tokens_json
from fakekube import FakeKube
from kvfs.csi.kube import KubeClient

pytestmark = INLINE


def _refused(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@pytest.mark.parametrize(
    ("kwargs", "code", "text"),
    [
        ({"volume_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "volume_id is missing"),
        ({"target": ""}, grpc.StatusCode.INVALID_ARGUMENT, "target_path is missing"),
        ({"target": "relative/path"}, grpc.StatusCode.INVALID_ARGUMENT, "must be an absolute path"),
        ({"capability": None}, grpc.StatusCode.INVALID_ARGUMENT, "volume_capability is missing"),
        ({"capability": "block"}, grpc.StatusCode.INVALID_ARGUMENT, "block access is not supported"),
        ({"readonly": False}, grpc.StatusCode.INVALID_ARGUMENT, "readonly is not true"),
        ({"params": {}, "token": None}, grpc.StatusCode.INVALID_ARGUMENT, "volume_context is empty"),
    ],
)
def test_publish_argument_errors(csi_plugin: Kubelet, tmp_path: Path, kwargs: dict[str, Any], code: Any, text: str) -> None:
    target = csi_plugin.target(tmp_path, "p")
    args: dict[str, Any] = {"volume_id": "vol-1", "target": target}
    args.update(kwargs)
    err = _refused(lambda: csi_plugin.publish(args.pop("volume_id"), args.pop("target"), **args))
    assert err.code() == code
    assert text in err.details()
    assert not os.path.exists(target)  # nothing created before the checks passed


def test_bad_parameters_carry_the_config_error_text(csi_plugin: Kubelet, tmp_path: Path) -> None:
    from kvfs.config.parameters import parse_parameters
    from kvfs.errors import ConfigError

    params = inline_params(keyvaultName="-bad--name-")
    with pytest.raises(ConfigError) as expected:
        parse_parameters({**params, "csi.storage.k8s.io/serviceAccount.tokens": tokens_json("t")}, {}, context="csi")
    err = _refused(lambda: csi_plugin.publish("vol-1", csi_plugin.target(tmp_path, "p"), params))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == str(expected.value)


def test_missing_token_is_an_invalid_argument(csi_plugin: Kubelet, tmp_path: Path) -> None:
    err = _refused(lambda: csi_plugin.publish("vol-1", csi_plugin.target(tmp_path, "p"), token=None))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "service account tokens not found" in err.details()


@pytest.mark.parametrize("key", ["useVMManagedIdentity", "usePodIdentity"])
def test_node_identity_refused_without_the_admin_flag(csi_plugin: Kubelet, tmp_path: Path, key: str) -> None:
    params = inline_params(**{key: "true"})
    del params["clientID"]
    err = _refused(lambda: csi_plugin.publish("vol-1", csi_plugin.target(tmp_path, "p"), params, token=None))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert key in err.details() and "--allow-node-identity" in err.details()


def test_node_identity_allowed_with_the_admin_flag(csi_plugin: Kubelet, tmp_path: Path) -> None:
    kubelet = csi_plugin.make(allow_node_identity=True)  # type: ignore[attr-defined]
    params = inline_params(useVMManagedIdentity="true")
    del params["clientID"]
    target = kubelet.target(tmp_path, "p")
    kubelet.publish("vol-1", target, params, token=None)
    assert sorted(os.listdir(target)) == ["hello"]


def test_identity_rpcs(csi_plugin: Kubelet) -> None:
    info = csi_plugin.identity.GetPluginInfo(pb2.GetPluginInfoRequest())
    assert info.name == "csi.kvfs.io" and info.vendor_version
    caps = csi_plugin.identity.GetPluginCapabilities(pb2.GetPluginCapabilitiesRequest())
    assert list(caps.capabilities) == []
    assert csi_plugin.probe() is True


def test_driver_name_is_configurable(csi_plugin: Kubelet) -> None:
    kubelet = csi_plugin.make(driver_name="secrets-store.csi.k8s.io")  # type: ignore[attr-defined]
    assert kubelet.identity.GetPluginInfo(pb2.GetPluginInfoRequest()).name == "secrets-store.csi.k8s.io"


def test_node_info_and_capabilities(csi_plugin: Kubelet) -> None:
    info = csi_plugin.node.NodeGetInfo(pb2.NodeGetInfoRequest())
    assert info.node_id == "node-1"
    caps = csi_plugin.node.NodeGetCapabilities(pb2.NodeGetCapabilitiesRequest())
    assert [c.rpc.type for c in caps.capabilities] == [pb2.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP]


def test_other_rpcs_are_unimplemented(csi_plugin: Kubelet) -> None:
    stage = csi_plugin.channel.unary_unary(
        "/csi.v1.Node/NodeStageVolume", request_serializer=lambda _: b"", response_deserializer=lambda b: b
    )
    err = _refused(lambda: stage(None))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED


def test_unpublish_arguments_and_idempotency(csi_plugin: Kubelet, tmp_path: Path) -> None:
    err = _refused(lambda: csi_plugin.unpublish("", "/x"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "volume_id" in err.details()
    err = _refused(lambda: csi_plugin.unpublish("vol-1", ""))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "target_path" in err.details()
    unknown = csi_plugin.target(tmp_path, "never-published")
    csi_plugin.unpublish("vol-1", unknown)  # unknown target = success
    target = csi_plugin.target(tmp_path, "p")
    csi_plugin.publish("vol-1", target)
    csi_plugin.unpublish("vol-1", target)
    csi_plugin.unpublish("vol-1", target)
    assert not os.path.exists(target)


def test_second_volume_on_a_published_target_is_refused(csi_plugin: Kubelet, tmp_path: Path) -> None:
    target = csi_plugin.target(tmp_path, "p")
    csi_plugin.publish("vol-1", target)
    err = _refused(lambda: csi_plugin.publish("vol-2", target))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "vol-1" in err.details()


def test_tokens_and_secrets_never_reach_logs_or_state(
    csi_plugin: Kubelet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token, secret = "eyJhbGciOiJSUzI1NiJ9.UNIQUE-TOKEN-4711.sig", "UNIQUE-CLIENT-SECRET-0815"
    target = csi_plugin.target(tmp_path, "p")
    csi_plugin.publish("vol-1", target, token=token, token_in_secrets=True)
    csi_plugin.publish("vol-1", target, token=token + "x")  # republish
    # a refused request with a secret in it
    params = inline_params(keyvaultName="x")
    _refused(lambda: csi_plugin.publish("vol-2", csi_plugin.target(tmp_path, "q"), params, {"clientsecret": secret}))
    stored = b"".join(p.read_bytes() for p in Path(csi_plugin.state_dir).rglob("*") if p.is_file())
    assert b"volume_id" in stored  # the state file was read
    for value in (token, secret, "UNIQUE-TOKEN"):
        assert value not in caplog.text
        assert value.encode() not in stored


# ---- SecretProviderClass lookups through the (fake) Kubernetes API ----


def _spc_plugin(csi_plugin: Kubelet, fake_kube: FakeKube, tmp_path: Path, **kw: Any) -> Kubelet:
    path = fake_kube.kubeconfig(tmp_path / "kubeconfig", **kw)
    return csi_plugin.make(kube_factory=lambda: KubeClient.from_kubeconfig(str(path)))  # type: ignore[attr-defined]


def _pod_attrs(spc: str, **extra: str) -> dict[str, str]:
    base = inline_params()
    attrs = {k: v for k, v in base.items() if k.startswith("csi.storage.k8s.io/")}
    attrs["secretProviderClass"] = spc
    attrs.update(extra)
    return attrs


def test_spc_parameters_overlaid_by_volume_attributes(csi_plugin: Kubelet, fake_kube: FakeKube, tmp_path: Path) -> None:
    spc = {k: v for k, v in inline_params().items() if not k.startswith("csi.storage.k8s.io/")}
    spc.update({"standin.file.a": "from spc\n", "standin.file.b": "spc b\n"})
    fake_kube.add_spc("default", "demo", spc)
    kubelet = _spc_plugin(csi_plugin, fake_kube, tmp_path)
    target = kubelet.target(tmp_path, "p")
    kubelet.publish("vol-1", target, _pod_attrs("demo", **{"standin.file.b": "from the pod\n"}))
    assert Path(target, "a").read_text() == "from spc\n"
    assert Path(target, "b").read_text() == "from the pod\n"
    assert fake_kube.requests[0].path.endswith("/namespaces/default/secretproviderclasses/demo")


def test_spc_lookup_with_a_client_certificate(csi_plugin: Kubelet, fake_kube: FakeKube, tmp_path: Path) -> None:
    spc = {k: v for k, v in inline_params().items() if not k.startswith("csi.storage.k8s.io/")}
    fake_kube.add_spc("default", "demo", spc)
    kubelet = _spc_plugin(csi_plugin, fake_kube, tmp_path, client_cert=True)
    kubelet.publish("vol-1", kubelet.target(tmp_path, "p"), _pod_attrs("demo"))
    assert fake_kube.requests and {r.identity for r in fake_kube.requests} == {fake_kube.client_cn}


def test_spc_not_found(csi_plugin: Kubelet, fake_kube: FakeKube, tmp_path: Path) -> None:
    kubelet = _spc_plugin(csi_plugin, fake_kube, tmp_path)
    err = _refused(lambda: kubelet.publish("vol-1", kubelet.target(tmp_path, "p"), _pod_attrs("missing")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert 'SecretProviderClass "missing" not found in namespace "default"' in err.details()
    assert "create it before the pod" in err.details()


def test_spc_forbidden_and_unauthorized(csi_plugin: Kubelet, fake_kube: FakeKube, tmp_path: Path) -> None:
    fake_kube.forbidden.add("default")
    kubelet = _spc_plugin(csi_plugin, fake_kube, tmp_path)
    err = _refused(lambda: kubelet.publish("vol-1", kubelet.target(tmp_path, "p"), _pod_attrs("demo")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "cannot get resource" in err.details() and "grant" in err.details()
    kubelet = _spc_plugin(csi_plugin, fake_kube, tmp_path, token="wrong-token")
    err = _refused(lambda: kubelet.publish("vol-1", kubelet.target(tmp_path, "q"), _pod_attrs("demo")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "Unauthorized" in err.details()


def test_inline_volume_never_touches_the_kubernetes_api(csi_plugin: Kubelet, tmp_path: Path) -> None:
    def no_kube() -> KubeClient:
        raise AssertionError("the Kubernetes API was used for an inline volume")

    kubelet = csi_plugin.make(kube_factory=no_kube)  # type: ignore[attr-defined]
    kubelet.publish("vol-1", kubelet.target(tmp_path, "p"))


def test_spc_without_kubernetes_configuration(
    csi_plugin: Kubelet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kubelet = csi_plugin.make()  # type: ignore[attr-defined]
    err = _refused(lambda: kubelet.publish("vol-1", kubelet.target(tmp_path, "p"), _pod_attrs("demo")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--kubeconfig" in err.details()
