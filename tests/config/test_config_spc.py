"""SecretProviderClass manifests, --param overlays and --secrets files."""

from __future__ import annotations

import base64
import json
import logging
import textwrap
from pathlib import Path

import pytest

from kvfs.config.parameters import parse_parameters
from kvfs.config.model import SecretObject, SecretObjectData
from kvfs.config.spc import load_manifest, load_secrets_file, overlay, secret_objects, spc_parameters
from kvfs.errors import ConfigError

SPC = textwrap.dedent(
    """\
    apiVersion: secrets-store.csi.x-k8s.io/v1
    kind: SecretProviderClass
    metadata:
      name: azure-kvname
    spec:
      provider: azure
      parameters:
        usePodIdentity: "false"
        useVMManagedIdentity: false
        keyvaultName: "kvname"
        cloudName: ""
        tenantId: "tid"
        someNumber: 0755
        otherNumber: 12
        objects: |
          array:
            - |
              objectName: secret1
              objectType: secret
              objectVersion: ""
            - |
              objectName: key1
              objectType: key
              filePermission: 0600
    """
)
SECRET_VALUE = "Zx8Q~s3cr3t-VALUE_never.shown"


def write(tmp_path: Path, text: str, name: str = "f.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def manifest_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_manifest(path)
    assert path in str(info.value)
    return str(info.value)


def test_load_manifest_parameters_are_strings(tmp_path: Path) -> None:
    manifest = load_manifest(write(tmp_path, SPC))
    assert manifest.name == "azure-kvname"
    params = manifest.parameters
    assert params["usePodIdentity"] == "false"
    assert params["useVMManagedIdentity"] == "false"
    assert params["keyvaultName"] == "kvname"
    assert params["cloudName"] == ""
    assert params["someNumber"] == "0755"  # the text written, not YAML 1.1's octal 493
    assert params["otherNumber"] == "12"
    assert params["objects"].startswith("array:\n  - |\n    objectName: secret1\n")
    assert all(isinstance(v, str) for v in params.values())


def test_manifest_end_to_end_with_overlay(tmp_path: Path) -> None:
    tenant = "contoso.onmicrosoft.com"
    params = overlay(load_manifest(write(tmp_path, SPC)).parameters, ["keyvaultName=other-kv", f"tenantID={tenant}"])
    app = "00000000-0000-0000-0000-0000000000a1"
    cfg = parse_parameters(params, {"clientid": app, "clientsecret": SECRET_VALUE}, context="cli")
    assert cfg.vault_url == "https://other-kv.vault.azure.net/"
    assert cfg.auth.tenant_id == tenant
    assert [(o.name, o.type, o.file_mode) for o in cfg.objects] == [
        ("secret1", "secret", 0o644),
        ("key1", "key", 0o600),
    ]


def test_v1alpha1_and_missing_provider_accepted(tmp_path: Path) -> None:
    text = SPC.replace("/v1\n", "/v1alpha1\n").replace("  provider: azure\n", "")
    assert load_manifest(write(tmp_path, text)).parameters["keyvaultName"] == "kvname"


def test_multi_document_with_one_spc(tmp_path: Path) -> None:
    pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n"
    text = "---\n" + pod + "---\n" + SPC + "---\n"
    assert load_manifest(write(tmp_path, text)).parameters["keyvaultName"] == "kvname"


def test_kubectl_list_output(tmp_path: Path) -> None:
    import yaml

    doc = {"apiVersion": "v1", "kind": "List", "items": [yaml.safe_load(SPC)]}
    assert load_manifest(write(tmp_path, yaml.safe_dump(doc))).parameters["keyvaultName"] == "kvname"


def test_two_spcs_refused(tmp_path: Path) -> None:
    msg = manifest_error(tmp_path, SPC + "---\n" + SPC.replace("azure-kvname", "second"))
    assert "azure-kvname" in msg and "second" in msg and "own file" in msg


def test_no_spc(tmp_path: Path) -> None:
    msg = manifest_error(tmp_path, "apiVersion: v1\nkind: Pod\n")
    assert "no SecretProviderClass found" in msg and "Pod" in msg


def test_kind_case_hint(tmp_path: Path) -> None:
    assert "case-sensitive" in manifest_error(
        tmp_path, SPC.replace("kind: SecretProviderClass", "kind: secretproviderclass")
    )


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ("secrets-store.csi.x-k8s.io/v1", "secrets-store.csi.x-k8s.io/v2", "apiVersion"),
        ("provider: azure", "provider: gcp", "spec.provider"),
        ("provider: azure", "provider: Azure", "case-sensitive"),
        (
            "spec:\n  provider: azure\n  parameters:",
            "spec:\n  provider: azure\n  parameters: [1]\n  x:",
            "spec.parameters",
        ),
    ],
)
def test_manifest_field_errors(tmp_path: Path, old: str, new: str, needle: str) -> None:
    assert needle in manifest_error(tmp_path, SPC.replace(old, new, 1))


def test_objects_written_as_mapping_explains_block_string(tmp_path: Path) -> None:
    text = SPC.replace("objects: |", "objects:")
    msg = manifest_error(tmp_path, text)
    assert "spec.parameters.objects" in msg and "objects: |" in msg


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError) as info:
        load_manifest(missing)
    assert missing in str(info.value) and "--spc" in str(info.value)
    assert "not valid YAML at line 2" in manifest_error(tmp_path, "kind: x\n  bad: [\n")


def test_spc_parameters_from_api_json() -> None:
    obj = json.loads(
        json.dumps(
            {
                "apiVersion": "secrets-store.csi.x-k8s.io/v1",
                "kind": "SecretProviderClass",
                "metadata": {"name": "x", "namespace": "ns"},
                "spec": {
                    "provider": "azure",
                    "parameters": {"keyvaultName": "kv1", "flag": True, "n": 3},
                },
            }
        )
    )
    assert spc_parameters(obj) == {"keyvaultName": "kv1", "flag": "true", "n": "3"}
    obj["spec"]["parameters"] = None
    assert spc_parameters(obj) == {}
    with pytest.raises(ConfigError, match="ns/x"):
        spc_parameters({**obj, "kind": "Secret"}, source="ns/x")


def _with_secret_objects(secret_objects: object) -> dict[str, object]:
    return {
        "apiVersion": "secrets-store.csi.x-k8s.io/v1",
        "kind": "SecretProviderClass",
        "spec": {"provider": "azure", "parameters": {"keyvaultName": "kv1"}, "secretObjects": secret_objects},
    }


def test_secret_objects_are_read_as_upstream_writes_them(caplog: pytest.LogCaptureFixture) -> None:
    obj = _with_secret_objects(
        [
            {
                "secretName": " db ",
                "type": "Opaque",
                "labels": {"team": "a", "tier": 3},
                "annotations": {"note": "x"},
                "data": [{"objectName": "conf/password ", "key": "password"}, {"objectName": "user", "key": "user"}],
            },
            {
                "secretName": "ingress-tls",
                "type": "kubernetes.io/tls",
                "data": [{"objectName": "web", "key": "tls.key"}, {"objectName": "web", "key": "tls.crt"}],
            },
        ]
    )
    assert spc_parameters(obj, source="ns/x") == {"keyvaultName": "kv1"}  # parameters are unchanged by them
    assert [r for r in caplog.records if r.levelname == "WARNING"] == []  # the CSI plugin decides what to do
    objects, errors = secret_objects(obj, source="ns/x")
    assert errors == []
    db, tls = objects
    assert db == SecretObject(
        "db",
        "Opaque",
        (SecretObjectData("conf/password", "password"), SecretObjectData("user", "user")),
        labels=(("team", "a"), ("tier", "3")),
        annotations=(("note", "x"),),
    )
    assert tls.files == ("web",) and [d.key for d in tls.data] == ["tls.key", "tls.crt"]
    assert secret_objects({"spec": {}}) == ([], [])


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("db", "spec.secretObjects[1]: must be a mapping"),
        ({"type": "Opaque", "data": [{"objectName": "a", "key": "a"}]}, "[1].secretName: secretName is empty"),
        ({"secretName": "DB_1", "type": "Opaque", "data": [{"objectName": "a", "key": "a"}]}, "is not a Secret name"),
        ({"secretName": "db", "data": [{"objectName": "a", "key": "a"}]}, "[1].type: type is empty (set type: Opaque"),
        ({"secretName": "db", "type": "Opaque", "data": []}, "[1].data: data is empty"),
        ({"secretName": "db", "type": "Opaque", "data": [{"key": "a"}]}, "[1].data[0].objectName: objectName is empty"),
        ({"secretName": "db", "type": "Opaque", "data": [{"objectName": "a", "key": "a/b"}]}, "not a Secret data key"),
        (
            {"secretName": "t", "type": "kubernetes.io/tls", "data": [{"objectName": "web", "key": "ca.crt"}]},
            "key 'ca.crt' is not supported for a kubernetes.io/tls Secret (only tls.crt and tls.key",
        ),
        (
            {"secretName": "db", "type": "Opaque", "data": [{"objectName": "a", "key": "k"}, {"objectName": "b", "key": "k"}]},
            "[1].data[1].key: key 'k' appears twice",
        ),
        ({"secretName": "db", "type": "Opaque", "labels": {"a": {"b": 1}}, "data": [{"objectName": "a", "key": "a"}]},
         "[1].labels: labels must map names to strings"),
        ({"secretName": "good", "type": "Opaque", "data": [{"objectName": "a", "key": "a"}]},
         "[1].secretName: a second entry for Secret 'good'"),
    ],
)
def test_a_bad_secret_object_is_named_with_the_fix_and_the_others_stay(entry: object, says: str) -> None:
    good = {"secretName": "good", "type": "Opaque", "data": [{"objectName": "a", "key": "a"}]}
    objects, errors = secret_objects(_with_secret_objects([good, entry]), source="ns/x")
    assert [o.secret_name for o in objects] == ["good"]
    assert len(errors) == 1 and str(errors[0]).startswith("ns/x: spec.secretObjects") and says in str(errors[0])
    _, [error] = secret_objects(_with_secret_objects({"secretName": "db"}), source="ns/x")
    assert "spec.secretObjects must be a list" in str(error)


def test_kvfs_mount_says_it_ignores_secret_objects(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "spc.yaml"
    path.write_text(json.dumps(_with_secret_objects([{"secretName": "s", "type": "Opaque", "data": []}])))
    assert load_manifest(str(path)).parameters == {"keyvaultName": "kv1"}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"{path}: spec.secretObjects is ignored by kvfs mount: only the CSI plugin syncs Kubernetes Secrets"
        " (kvfs csi node --sync-secrets)"
    ]


def test_overlay_wins_and_keeps_equals_in_values() -> None:
    base = {"keyvaultName": "a", "tenantID": "t"}
    out = overlay(base, ["keyvaultName=b", "objects=array:\n  - |\n    x: a=b", " clientID =c"])
    assert out["keyvaultName"] == "b" and out["tenantID"] == "t" and out["clientID"] == "c"
    assert out["objects"].endswith("x: a=b")
    assert base["keyvaultName"] == "a"  # input untouched


@pytest.mark.parametrize(
    ("manifest", "pair", "meant"),
    [
        ({"keyvaultName": "a"}, "keyVaultName=b", "keyvaultName"),  # wrong case of the manifest's key
        ({}, "clientId=x", "clientID"),  # wrong case of a parameter kvfs reads
        ({}, "TENANTID=x", "tenantID or tenantId"),
        ({"customKey": "a"}, "CustomKey=b", "customKey"),  # a key only the manifest knows
    ],
)
def test_overlay_refuses_a_name_that_differs_only_in_case(manifest: dict[str, str], pair: str, meant: str) -> None:
    with pytest.raises(ConfigError) as info:
        overlay(manifest, [pair])
    key = pair.split("=")[0]
    assert info.value.field == "--param" and info.value.value == f"{key}=..."
    assert f"did you mean {meant}?" in str(info.value)


def test_overlay_takes_exact_names_of_parameters_and_of_the_manifests_keys(caplog: pytest.LogCaptureFixture) -> None:
    manifest = {"tenantId": "t", "keyVaultName": "miscased-in-the-manifest"}
    pairs = ["tenantID=u", "keyVaultName=v", "csi.storage.k8s.io/pod.name=web-0", "csi.storage.k8s.io/ephemeral=true"]
    out = overlay(manifest, pairs)
    assert out == {"tenantId": "t", "tenantID": "u", "keyVaultName": "v", "csi.storage.k8s.io/pod.name": "web-0",
                   "csi.storage.k8s.io/ephemeral": "true"}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    ("pair", "hint"),
    [("somethingNew=hidden-value", "parameters: keyvaultName,"),
     ("refreshIntervall=hidden-value", "did you mean refreshInterval? parameters: "),
     ("objectType=hidden-value", "(objectType is a field of one object, not a parameter (set it in that object's"),
     ("objectversionhistory=hidden-value", "(objectVersionHistory is a field of one object")],
)
def test_overlay_takes_an_unknown_name_as_volume_attributes_do_but_warns(
    pair: str, hint: str, caplog: pytest.LogCaptureFixture
) -> None:
    key, value = pair.split("=")
    assert overlay({"keyvaultName": "a"}, [pair]) == {"keyvaultName": "a", key: value}
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"--param {key}=...: neither a parameter kvfs reads nor one the manifest sets")
    assert hint in warning and value not in warning


@pytest.mark.parametrize("pair", ["novalue", "=hidden-value", " =hidden-value", ""])
def test_overlay_bad_pair(pair: str) -> None:
    with pytest.raises(ConfigError) as info:
        overlay({}, [pair])
    assert "KEY=VALUE" in str(info.value)
    if pair.startswith("=") or "=" in pair:
        assert pair.split("=", 1)[1] not in str(info.value)


def test_secrets_yaml_and_json(tmp_path: Path) -> None:
    yaml_path = write(
        tmp_path, f"clientid: id-1\nclientsecret: {SECRET_VALUE}\nnum: 0x1F\n", "s.yaml"
    )
    assert load_secrets_file(yaml_path) == {
        "clientid": "id-1",
        "clientsecret": SECRET_VALUE,
        "num": "0x1F",
    }
    json_path = write(
        tmp_path, json.dumps({"ClientID": "id-2", "ClientSecret": SECRET_VALUE}), "s.json"
    )
    assert load_secrets_file(json_path) == {"ClientID": "id-2", "ClientSecret": SECRET_VALUE}


def test_secrets_kubernetes_secret_manifest(tmp_path: Path) -> None:
    encoded = base64.b64encode(SECRET_VALUE.encode()).decode()
    text = (
        f"apiVersion: v1\nkind: Secret\ndata:\n  clientsecret: {encoded}\n"
        "stringData:\n  clientid: id-3\n"
    )
    assert load_secrets_file(write(tmp_path, text)) == {
        "clientsecret": SECRET_VALUE,
        "clientid": "id-3",
    }


@pytest.mark.parametrize(
    "text",
    [
        f'clientid: id\nclientsecret: "{SECRET_VALUE}\n',  # unterminated quote
        f"clientid: id\nclientsecret: {SECRET_VALUE}: x\n",
        f'{{"clientid": "id", "clientsecret": "{SECRET_VALUE}"',  # broken JSON
        f"clientid: id\nclientsecret:\n  nested: {SECRET_VALUE}\n",
        f"- {SECRET_VALUE}\n",
        f"kind: Secret\ndata:\n  clientsecret: {SECRET_VALUE}\n",  # not base64
    ],
)
def test_secrets_file_errors_never_echo_values(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_secrets_file(path)
    shown = str(info.value) + repr(info.value) + str(info.value.value)
    assert path in str(info.value)
    assert SECRET_VALUE not in shown and SECRET_VALUE[:10] not in shown


def test_secrets_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--secrets"):
        load_secrets_file(str(tmp_path / "nope"))


def test_secrets_yaml_flow_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, f"{{clientid: id-4, clientsecret: {SECRET_VALUE}}}\n")
    assert load_secrets_file(path) == {"clientid": "id-4", "clientsecret": SECRET_VALUE}
