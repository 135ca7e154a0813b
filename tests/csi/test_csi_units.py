"""Pure units: mountinfo parsing, state files, the mounter registry, request assembly, proto loading,
kube config."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from fakekube import FakeKube
from kvfs.config.parameters import WORKLOAD_IDENTITY_AUDIENCE, token_for_audience
from kvfs.csi import request
from kvfs.csi.kube import KubeClient, KubeConfigError, KubeError
from kvfs.csi.mountinfo import Health, find_mount, is_kvfs_mount, parse_mountinfo, probe_mount
from kvfs.csi.mounters import ORPHAN_AGE, MounterInfo, MounterRegistry
from kvfs.daemon import jsonline
from kvfs.csi.state import StateStore, new_state, process_alive, process_start_time, volume_key
from kvfs.csi.status import main as status_main

MOUNTINFO = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    "40 22 0:35 / /var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/my\\040vol/mount ro,nosuid,nodev "
    "shared:20 master:3 - fuse.kvfs kvfs ro,user_id=65534,group_id=65534,default_permissions,allow_other\n"
    "41 22 0:36 / /mnt/stacked rw - tmpfs tmpfs rw\n"
    "42 41 0:37 / /mnt/stacked ro - fuse.kvfs kvfs ro\n"
    "garbage line\n"
    "43 22 0:38 / /mnt/other rw - fuse.sshfs host:/ rw\n"
)


def test_mountinfo_parsing_unescapes_and_reads_optional_fields() -> None:
    entries = parse_mountinfo(MOUNTINFO)
    assert len(entries) == 5  # the garbage line is skipped
    vol = entries[1]
    assert vol.mount_point == "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/my vol/mount"
    assert vol.optional_fields == ("shared:20", "master:3")
    assert (vol.fstype, vol.source) == ("fuse.kvfs", "kvfs")
    assert "allow_other" in vol.super_options
    assert entries[0].optional_fields == ("shared:1",)


def test_find_mount_sees_the_top_of_a_stack() -> None:
    entries = parse_mountinfo(MOUNTINFO)
    assert is_kvfs_mount("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/my vol/mount/", entries)
    top = find_mount("/mnt/stacked", entries)
    assert top is not None and top.fstype == "fuse.kvfs"
    assert not is_kvfs_mount("/mnt/other", entries)
    assert not is_kvfs_mount("/mnt/none", entries)


def test_probe_of_an_unmounted_path(tmp_path: Path) -> None:
    assert probe_mount(str(tmp_path)).health is Health.UNMOUNTED


def test_state_store_round_trip_and_no_secret_fields(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    state = new_state("vol-1", "/pods/x/mount/", 65534, 65534)
    store.save(state)
    assert store.load("/pods/x/mount") == state
    assert oct(os.stat(tmp_path / "state").st_mode & 0o777) == "0o700"
    raw = json.loads((store.volume_dir("/pods/x/mount") / "state.json").read_text())
    identifiers = {"volume_id", "target_path", "phase", "pid", "pid_start", "uid", "gid", "created", "mounter"}
    pod = {"pod_namespace", "pod_name", "pod_uid", "secret_provider_class"}
    assert set(raw) == identifiers | pod  # ids only: never a token, a secret or the parameters
    assert [s.volume_id for s in store.all()] == ["vol-1"]
    store.remove("/pods/x/mount")
    assert store.load("/pods/x/mount") is None and store.all() == []
    assert volume_key("/a/b") == volume_key("/a/b/") != volume_key("/a/c")


def test_unreadable_state_is_ignored(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    folder = store.volume_dir("/t")
    folder.mkdir()
    (folder / "state.json").write_text("{not json")
    assert store.all() == []


def test_long_state_dir_is_refused_with_a_fix(tmp_path: Path) -> None:
    store = StateStore(tmp_path / ("x" * 100))
    with pytest.raises(ValueError, match="shorter --state-dir"):
        store.control_socket("/t")


def test_process_identity() -> None:
    me = process_start_time(os.getpid())
    assert me is not None
    assert process_alive(os.getpid(), me)
    assert not process_alive(os.getpid(), me + 1)  # pid reuse guard
    assert not process_alive(os.getpid(), 0)  # an unknown start time never means "any"
    assert not process_alive(0, 0)


def test_tokens_read_from_secrets_first() -> None:
    tok = lambda t: json.dumps({WORKLOAD_IDENTITY_AUDIENCE: {"token": t}})  # noqa: E731
    inputs = request.split_inputs(
        {request.TOKENS_KEY: tok("from-context"), "keyvaultName": "kv"}, {request.TOKENS_KEY: tok("from-secrets"), "clientid": "c"}
    )
    assert token_for_audience(inputs.tokens_json) == "from-secrets"
    assert request.TOKENS_KEY not in inputs.secrets and request.TOKENS_KEY not in inputs.attributes
    assert "from-" not in repr(inputs) and "'c'" not in repr(inputs)
    inputs = request.split_inputs({request.TOKENS_KEY: tok("from-context")}, {})
    assert token_for_audience(inputs.tokens_json) == "from-context"
    assert token_for_audience("not json") == ""
    assert token_for_audience(json.dumps({"other": {"token": "x"}})) == ""


POD_INFO = {
    "csi.storage.k8s.io/pod.name": "web",
    "csi.storage.k8s.io/pod.namespace": "shop",
    "csi.storage.k8s.io/pod.uid": "u-1",
    "csi.storage.k8s.io/serviceAccount.name": "sa",
    "csi.storage.k8s.io/ephemeral": "true",
}


def test_daemon_params_take_only_kubelets_attributes(caplog: pytest.LogCaptureFixture) -> None:
    attrs = {**POD_INFO, "secretProviderClass": "demo", "keyvaultName": "pod", "kvfs.io/volumeMountGroup": "0"}
    inputs = request.split_inputs(attrs, {})
    spc = {"keyvaultName": "spc", "b": "2", "csi.storage.k8s.io/pod.namespace": "other", "kvfs.io/volumeMountGroup": "0"}
    params = request.daemon_params(spc, inputs, allow_inline=False)
    assert params == {**POD_INFO, "keyvaultName": "spc", "b": "2"}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "'keyvaultName'" in warnings[0] and "'kvfs.io/volumeMountGroup'" in warnings[0]
    assert "'pod'" not in warnings[0]  # keys only, never values


def test_daemon_params_overlay_order_with_inline_parameters() -> None:
    inputs = request.split_inputs({"keyvaultName": "pod", "a": "1", "kvfs.io/volumeMountGroup": "0"}, {})
    params = request.daemon_params({"keyvaultName": "spc", "b": "2"}, inputs, allow_inline=True)
    assert params == {"keyvaultName": "pod", "a": "1", "b": "2"}


@pytest.mark.parametrize(
    ("namespace", "name"),
    [("ns", "../../other-ns/secretproviderclasses/x"), ("ns", "x?labelSelector=a"), ("ns", "Upper"), ("ns", "a/b"),
     ("ns", "%2e%2e"), ("ns", ".."), ("ns", ""), ("ns", "a" * 254), ("../kube-system", "x"), ("ns.x", "x"), ("", "x")],
)  # fmt: skip
def test_spc_references_that_could_leave_the_namespace_are_refused(namespace: str, name: str) -> None:
    with pytest.raises(request.RequestError) as info:
        request.check_spc_reference(namespace, name)
    assert info.value.code == "INVALID_ARGUMENT"


def test_spc_references_kubernetes_allows_pass() -> None:
    request.check_spc_reference("team-a", "my.spc-1")
    request.check_spc_reference("a" * 63, "b" * 253)


def test_proto_load_is_idempotent() -> None:
    from kvfs.csi.proto import load

    a, b = load(), load()
    assert a[0] is b[0]
    assert a[0].NodePublishVolumeRequest.DESCRIPTOR.fields_by_name["volume_context"].number == 8
    assert a[0].NodeGetInfoResponse.DESCRIPTOR.fields_by_name["max_volumes_per_node"].number == 2


# ---- the Kubernetes client against the fake API server ----


@pytest.fixture
def fake_kube(tmp_path: Path) -> FakeKube:
    kube = FakeKube(tmp_path / "kube")
    kube.add_spc("ns1", "demo", {"keyvaultName": "kv1"})
    yield kube  # type: ignore[misc]
    kube.close()


def test_in_cluster_config(fake_kube: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "ca.crt").write_bytes(fake_kube.ca_pem)
    (sa / "token").write_text(fake_kube.allowed_token + "\n")
    host, port = fake_kube.url.removeprefix("https://").split(":")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    client = KubeClient.in_cluster(sa)
    obj = client.get_secret_provider_class("ns1", "demo")
    assert obj["spec"]["parameters"] == {"keyvaultName": "kv1"}
    (sa / "token").write_text("rotated-and-wrong")  # re-read per call
    with pytest.raises(KubeError) as info:
        client.get_secret_provider_class("ns1", "demo")
    assert info.value.status == 401
    assert "rotated-and-wrong" not in str(info.value)
    client.close()


def test_kubeconfig_errors(fake_kube: FakeKube, tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match="cannot read"):
        KubeClient.from_kubeconfig(str(tmp_path / "missing"))
    path = fake_kube.kubeconfig(tmp_path / "kc")
    doc = json.loads(path.read_text())
    doc["users"][0]["user"] = {"exec": {"command": "aws"}}
    path.write_text(json.dumps(doc))
    with pytest.raises(KubeConfigError, match="'exec'"):
        KubeClient.from_kubeconfig(str(path))
    doc["clusters"][0]["cluster"]["server"] = "http://plain"
    path.write_text(json.dumps(doc))
    with pytest.raises(KubeConfigError, match="https://"):
        KubeClient.from_kubeconfig(str(path))


def test_kubeconfig_with_ca_file_and_untrusted_server(fake_kube: FakeKube, tmp_path: Path) -> None:
    path = fake_kube.kubeconfig(tmp_path / "kc")
    doc = json.loads(path.read_text())
    del doc["clusters"][0]["cluster"]["certificate-authority-data"]
    doc["clusters"][0]["cluster"]["certificate-authority"] = "ca.pem"
    (tmp_path / "ca.pem").write_bytes(fake_kube.ca_pem)
    path.write_text(json.dumps(doc))
    assert KubeClient.from_kubeconfig(str(path)).get_secret_provider_class("ns1", "demo")["kind"] == "SecretProviderClass"
    other = FakeKube(tmp_path / "other")  # a different CA: TLS must fail
    try:
        doc["clusters"][0]["cluster"] = {
            "server": fake_kube.url,
            "certificate-authority-data": base64.b64encode(other.ca_pem).decode(),
        }
        path.write_text(json.dumps(doc))
        with pytest.raises(KubeError, match="unreachable"):
            KubeClient.from_kubeconfig(str(path)).get_secret_provider_class("ns1", "demo")
    finally:
        other.close()


def test_daemon_uid_range_flag() -> None:
    import argparse

    from kvfs.csi.cli import uid_range

    assert uid_range("1900000000-1900999999") == (1900000000, 1900999999)
    assert uid_range("5000-5000") == (5000, 5000)
    for bad in ("0-5", "5-4", "x-y", "10", "1-2147483648", "-5-10"):
        with pytest.raises(argparse.ArgumentTypeError, match="START-END"):
            uid_range(bad)


def test_the_daemon_applies_the_plugins_cloud_env_folder_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon re-parses its parameters: a file outside the folder it was sent is refused there too."""
    from kvfs.daemon import entry
    from kvfs.net import http as transport

    monkeypatch.setattr(transport, "_preloaded_context", None)  # prepare() sets it process-wide

    env = tmp_path / "env.json"
    env.write_text(json.dumps({"activeDirectoryEndpoint": "https://a.example/", "keyVaultEndpoint": "https://v.example/",
                               "keyVaultDNSSuffix": "v.example"}))  # fmt: skip
    params = {
        **POD_INFO,
        "keyvaultName": "kv1",
        "tenantID": "72f988bf-86f1-41af-91ab-2d7cd011db47",
        "clientID": "00000000-0000-0000-0000-0000000000c1",
        "cloudName": "AzureStackCloud",
        "cloudEnvFileName": str(env),
        "objects": "array:\n  - |\n    objectName: s\n    objectType: secret\n",
        request.TOKENS_KEY: json.dumps({WORKLOAD_IDENTITY_AUDIENCE: {"token": "x.y.z"}}),
    }
    ready_r, ready_w = os.pipe()
    spec = entry.DaemonSpec("vol-1", params, {}, False, -1, -1, ready_w, cloud_env_dir=str(tmp_path / "admin"))
    entry.prepare(spec)
    assert entry.run_volume(spec) == 2
    assert os.read(ready_r, 4096).startswith(b"error cloudName AzureStackCloud is not valid, error: cloudEnvFileName")
    os.close(ready_r)
    os.close(ready_w)


def test_the_mounter_registry_lists_the_newest_first_and_prunes_only_the_dead_and_unused(tmp_path: Path) -> None:
    registry = MounterRegistry(tmp_path)
    me = os.getpid()
    alive = {"pid": me, "pid_start": process_start_time(me) or 0, "version": "0.2.0"}
    dead = {"pid": me, "pid_start": 1, "version": "0.1.0"}  # a start time that is not this process's
    for mounter_id, fields, started in (
        ("old-dead", dead, 1.0), ("old-used", dead, 2.0), ("new", alive, 3.0), ("listening", dead, 4.0)
    ):  # fmt: skip
        registry.prepare(mounter_id)
        registry.register(MounterInfo(mounter_id, started=started, **fields))  # type: ignore[arg-type]
    listener = jsonline.listen(registry.socket_path("listening"), backlog=1)  # pid unseen, socket alive
    (tmp_path / "mounters" / "never-registered").mkdir()
    (tmp_path / "mounters" / "starting").mkdir()
    os.utime(tmp_path / "mounters" / "never-registered", (0, 0))
    try:
        assert [m.id for m in registry.all()] == ["listening", "new", "old-used", "old-dead"]
        assert [m.id for m in registry.live()] == ["new"]
        removed = registry.prune({"old-used"}, now=ORPHAN_AGE + 1)
    finally:
        listener.close()
    assert sorted(removed) == ["never-registered", "old-dead"]
    assert sorted(p.name for p in (tmp_path / "mounters").iterdir()) == ["listening", "new", "old-used", "starting"]


def test_csi_status_names_a_folder_without_state_and_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert status_main(str(tmp_path / "nowhere"), as_json=True) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--state-dir" in err and "nowhere" in err and "plugin's --state-dir" in err
    MounterRegistry(tmp_path).prepare("m-1")  # a node where only a mounter has started: no volumes yet
    assert status_main(str(tmp_path), as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["mounters"], report["volumes"]) == ([], []) and not (tmp_path / "volumes").exists()
