"""parse_parameters: upstream's order of checks and error texts (those of its parameters and
authentication code and unit tests), kvfs fixes, CSI vs CLI."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import pytest

from kvfs.config.model import RenderDefaults
from kvfs.config.parameters import (
    FEDERATED_TOKEN_FILE_ENV,
    SA_TOKENS_KEY,
    parse_bool,
    parse_duration,
    parse_parameters,
    read_cloud_env_file,
)
from kvfs.errors import ConfigError

POD = {
    "csi.storage.k8s.io/pod.name": "web-0",
    "csi.storage.k8s.io/pod.namespace": "shop",
}
OBJECTS = "array:\n  - |\n    objectName: secret1\n    objectType: secret\n"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2lnbmF0dXJlLXRva2VuLXZhbHVl"
CLIENT_SECRET = "Zx8Q~s3cr3t-VALUE_never.shown"
WI = "failed to parse workload identity tokens, error: "
SP = {"clientid": "11111111-2222-3333-4444-555555555555", "clientsecret": CLIENT_SECRET}
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
APP = "00000000-0000-0000-0000-0000000000a1"
MI = "00000000-0000-0000-0000-0000000000b2"


def tokens_json(token: object = TOKEN, audience: str = "api://AzureADTokenExchange") -> str:
    return json.dumps({audience: {"token": token, "expirationTimestamp": "2030-01-01T00:00:00Z"}})


def base(**extra: str) -> dict[str, str]:
    return {**POD, "keyvaultName": "testkv", "tenantID": TENANT, "objects": OBJECTS, **extra}


def csi_error(params: Mapping[str, str], secrets: Mapping[str, str] | None = None, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        parse_parameters(params, secrets, context="csi", **kw)
    return str(info.value)


# --- upstream order of checks and exact texts (TestGetSecretsStoreObjectContent) ------------


def test_error_sequence_as_upstream() -> None:
    params: dict[str, str] = {}
    assert csi_error(params).startswith("pod name is not provided")
    params["csi.storage.k8s.io/pod.name"] = "p"
    assert csi_error(params).startswith("pod namespace is not provided")
    params["csi.storage.k8s.io/pod.namespace"] = "ns"
    assert csi_error(params).startswith("keyvaultName is not provided")
    params["keyvaultName"] = "testkv"
    assert csi_error(params).startswith("tenantId is not provided")
    params["tenantID"] = TENANT
    params["cloudName"] = "AzureCloud1"
    assert csi_error(params).startswith("cloudName AzureCloud1 is not valid")
    del params["cloudName"]
    assert "nodePublishSecretRef secret is not set" in csi_error(params)
    assert csi_error(params, SP).startswith("objects is not set")
    params["objects"] = "- |\n  objectName: a\n"
    assert csi_error(params, SP).startswith(
        "failed to yaml unmarshal objects, error: yaml: unmarshal errors"
    )
    params["objects"] = "array:"
    cfg = parse_parameters(params, SP, context="csi")
    assert cfg.objects == ()


@pytest.mark.parametrize("flag", ["usePodIdentity", "useVMManagedIdentity", "useAzureTokenProxy"])
def test_parse_bool_error_text(flag: str) -> None:
    msg = csi_error(base(**{flag: "tru"}))
    assert msg.startswith(
        f'failed to parse {flag} flag, error: strconv.ParseBool: parsing "tru": invalid syntax'
    )


def test_parse_bool_comes_before_keyvault_name() -> None:
    assert csi_error({**POD, "usePodIdentity": "yes"}).startswith(
        "failed to parse usePodIdentity flag"
    )


@pytest.mark.parametrize("text", ["1", "t", "T", "TRUE", "true", "True"])
def test_parse_bool_true_forms(text: str) -> None:
    assert parse_bool(text, "f") is True


@pytest.mark.parametrize("text", ["0", "f", "F", "FALSE", "false", "False"])
def test_parse_bool_false_forms(text: str) -> None:
    assert parse_bool(text, "f", default=True) is False


@pytest.mark.parametrize("text", ["yes", "on", "tRUE", "2", "y"])
def test_parse_bool_rejects_like_go(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_bool(text, "f")


def test_mutual_exclusion() -> None:
    msg = csi_error(base(usePodIdentity="true", useVMManagedIdentity="True"))
    assert msg.startswith(
        "only one identity mode can be enabled at a time: usePodIdentity, useVMManagedIdentity,"
        " or useAzureTokenProxy"
    )


def test_token_proxy_not_supported_points_to_workload_identity() -> None:
    msg = csi_error(base(useAzureTokenProxy="true", clientID=APP))
    assert "identity binding" in msg and "not supported by kvfs yet" in msg
    assert "clientID" in msg and "workload identity" in msg


def test_token_proxy_false_is_fine() -> None:
    cfg = parse_parameters(base(useAzureTokenProxy="false"), SP, context="csi")
    assert cfg.auth.mode == "service_principal"


def test_object_errors_keep_wrapper_through_parameters() -> None:
    objects = (
        "array:\n  - |\n    objectName: secret1\n    objectType: secret\n    objectFormat: pkcs\n"
    )
    assert csi_error(base(objects=objects), SP).startswith(
        "failed to get objectType:secret, objectName:secret1, objectVersion:: invalid objectFormat:"
        " pkcs, should be PEM or PFX"
    )


# --- tenant ----------------------------------------------------------------------------------


def test_tenant_id_preferred_over_deprecated_spelling() -> None:
    cfg = parse_parameters(base(tenantID=TENANT, tenantId=MI), SP, context="csi")
    assert cfg.auth.tenant_id == TENANT
    params = base(tenantId=MI)
    del params["tenantID"]
    assert parse_parameters(params, SP, context="csi").auth.tenant_id == MI


@pytest.mark.parametrize(
    ("extra", "kw"),
    [
        ({"useVMManagedIdentity": "true"}, {"allow_node_identity": True}),
        ({"usePodIdentity": "true"}, {}),
    ],
)
def test_tenant_not_required_for_node_and_pod_identity(extra: dict, kw: dict) -> None:
    params = base(**extra)
    del params["tenantID"]
    cfg = parse_parameters(params, None, context="csi", **kw)
    assert cfg.auth.tenant_id == ""


def test_tenant_required_for_workload_identity() -> None:
    params = base(clientID=APP, **{SA_TOKENS_KEY: tokens_json()})
    del params["tenantID"]
    assert csi_error(params).startswith("tenantId is not provided")


def test_tenant_shape_validated() -> None:
    assert "is not a tenant ID" in csi_error(base(tenantID="evil/../x"), SP)
    assert parse_parameters(
        base(tenantID="contoso.onmicrosoft.com"), SP, context="csi"
    ).auth.tenant_id


# --- modes -----------------------------------------------------------------------------------


def test_workload_identity_csi_token_from_params() -> None:
    cfg = parse_parameters(
        base(clientID=f" {APP} ", **{SA_TOKENS_KEY: tokens_json()}), None, context="csi"
    )
    assert cfg.auth.mode == "workload_identity"
    assert cfg.auth.client_id == APP and cfg.auth.sa_token == TOKEN
    assert cfg.auth.sa_token_file == ""
    assert TOKEN not in repr(cfg) and TOKEN not in cfg.summary()


def test_workload_identity_token_in_secrets_wins() -> None:
    other = tokens_json("other-token")
    cfg = parse_parameters(
        base(clientID=APP, **{SA_TOKENS_KEY: other}),
        {SA_TOKENS_KEY: tokens_json()},
        context="csi",
    )
    assert cfg.auth.sa_token == TOKEN


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", "failed to parse workload identity tokens, error: service account tokens not found"),
        (
            "not json",
            WI + "failed to unmarshal service account tokens, error: ",
        ),
        (
            "[1]",
            WI + "failed to unmarshal service account tokens, error: ",
        ),
        (
            tokens_json(audience="api://Other"),
            WI + "token for audience api://AzureADTokenExchange not found",
        ),
        (
            tokens_json(token=5),
            WI + "token for audience api://AzureADTokenExchange not found",
        ),
        (
            json.dumps({"api://AzureADTokenExchange": TOKEN}),
            "token for audience api://AzureADTokenExchange not found",
        ),
    ],
)
def test_workload_identity_token_errors(raw: str, expected: str) -> None:
    params = base(clientID=APP)
    if raw:
        params[SA_TOKENS_KEY] = raw
    msg = csi_error(params)
    assert expected in msg
    assert "tokenRequests" in msg or "kubelet" in msg
    assert TOKEN not in msg


def test_missing_audience_lists_received_audiences() -> None:
    msg = csi_error(base(clientID=APP, **{SA_TOKENS_KEY: tokens_json(audience="api://Other")}))
    assert "audiences received: api://Other" in msg


def test_workload_identity_cli_uses_token_file_env() -> None:
    cfg = parse_parameters(
        {"keyvaultName": "testkv", "tenantID": TENANT, "clientID": APP, "objects": OBJECTS},
        None,
        context="cli",
        environ={FEDERATED_TOKEN_FILE_ENV: "/var/run/token"},
    )
    assert cfg.auth.mode == "workload_identity"
    assert cfg.auth.sa_token_file == "/var/run/token" and cfg.auth.sa_token == ""


def test_workload_identity_cli_without_env_names_it() -> None:
    with pytest.raises(ConfigError) as info:
        parse_parameters(
            {"keyvaultName": "testkv", "tenantID": TENANT, "clientID": APP, "objects": OBJECTS},
            None,
            context="cli",
            environ={},
        )
    assert FEDERATED_TOKEN_FILE_ENV in str(info.value) and "export" in str(info.value)


def test_cli_environ_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FEDERATED_TOKEN_FILE_ENV, "/from/os/environ")
    cfg = parse_parameters(
        {"keyvaultName": "testkv", "tenantID": TENANT, "clientID": APP, "objects": OBJECTS},
        None,
        context="cli",
    )
    assert cfg.auth.sa_token_file == "/from/os/environ"


def test_service_principal_keys_case_insensitive() -> None:
    cfg = parse_parameters(
        base(), {"ClientID": f" {APP} ", "CLIENTSECRET": CLIENT_SECRET}, context="csi"
    )
    assert cfg.auth.mode == "service_principal"
    assert cfg.auth.client_id == APP and cfg.auth.client_secret == CLIENT_SECRET
    assert CLIENT_SECRET not in repr(cfg) and CLIENT_SECRET not in cfg.summary()


@pytest.mark.parametrize(
    ("secrets", "missing"),
    [
        ({"clientsecret": CLIENT_SECRET}, "clientid"),
        ({"clientid": "id"}, "clientsecret"),
        ({"clientid": "id", "clientsecret": ""}, "clientsecret"),
    ],
)
def test_service_principal_missing_entry(secrets: dict, missing: str) -> None:
    msg = csi_error(base(), secrets)
    assert msg.startswith(
        f"failed to build auth config for mode None: could not find {missing} in secrets"
    )
    assert CLIENT_SECRET not in msg


def test_secret_holding_only_sa_tokens_counts_as_not_set() -> None:
    msg = csi_error(base(), {SA_TOKENS_KEY: tokens_json()})
    assert "failed to get credentials, nodePublishSecretRef secret is not set" in msg
    assert TOKEN not in msg


def test_vm_managed_identity_refused_in_csi_by_default() -> None:
    msg = csi_error(base(useVMManagedIdentity="true"))
    assert "every pod on the node" in msg
    assert "--allow-node-identity" in msg and "workload identity" in msg


def test_vm_managed_identity_allowed_by_admin_or_cli() -> None:
    cfg = parse_parameters(
        base(useVMManagedIdentity="true", userAssignedIdentityID=MI),
        None,
        context="csi",
        allow_node_identity=True,
    )
    assert (
        cfg.auth.mode == "vm_managed_identity" and cfg.auth.user_assigned_identity_id == MI
    )
    cfg = parse_parameters(
        {"keyvaultName": "testkv", "useVMManagedIdentity": "1", "objects": OBJECTS},
        None,
        context="cli",
    )
    assert cfg.auth.mode == "vm_managed_identity" and cfg.auth.user_assigned_identity_id == ""


def test_vm_managed_identity_ignores_client_id_instead_of_needing_tokens() -> None:
    cfg = parse_parameters(
        base(useVMManagedIdentity="true", clientID=APP),
        None,
        context="csi",
        allow_node_identity=True,
    )
    assert cfg.auth.mode == "vm_managed_identity"


def test_pod_identity_carries_pod_info() -> None:
    cfg = parse_parameters(base(usePodIdentity="true"), None, context="csi")
    assert (cfg.auth.mode, cfg.auth.pod_name, cfg.auth.pod_namespace) == (
        "pod_identity",
        "web-0",
        "shop",
    )


def test_pod_identity_cli_needs_pod_info() -> None:
    with pytest.raises(ConfigError, match="pod information is not available"):
        parse_parameters(
            {"keyvaultName": "testkv", "usePodIdentity": "true", "objects": OBJECTS},
            None,
            context="cli",
        )


def test_cli_without_credentials_uses_default_chain_and_needs_no_pod_info() -> None:
    cfg = parse_parameters({"keyvaultName": "testkv", "objects": OBJECTS}, None, context="cli")
    assert cfg.auth.mode == "default_chain" and cfg.auth.tenant_id == "" and cfg.pod_name == ""
    cfg = parse_parameters(
        {"keyvaultName": "testkv", "tenantId": TENANT, "objects": OBJECTS}, None, context="cli"
    )
    assert cfg.auth.tenant_id == TENANT


def test_cli_with_secrets_file_is_service_principal() -> None:
    params = {"keyvaultName": "testkv", "tenantID": TENANT, "objects": OBJECTS}
    assert parse_parameters(params, SP, context="cli").auth.mode == "service_principal"
    with pytest.raises(ConfigError, match="could not find clientid in secrets.*--secrets file"):
        parse_parameters(params, {}, context="cli")
    with pytest.raises(ConfigError, match="tenantId is not provided"):
        parse_parameters({"keyvaultName": "testkv", "objects": OBJECTS}, SP, context="cli")


# --- vault name: Key Vault's rules (upstream checks only length and charset; its TestGetVaultURL)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("longkeyvaultnamewhichisnotvalid", "must be between 3 and 24 chars"),
        ("kv", "must be between 3 and 24 chars"),
        ("kv_test", "must match [-a-zA-Z0-9]{3,24}"),
        ("1kvtest", "must start with a letter"),
        ("kv--test", "must not contain consecutive hyphens"),
        ("kvtest-", "must not end with a hyphen"),
    ],
)
def test_vault_name_rules(name: str, problem: str) -> None:
    assert csi_error(base(keyvaultName=name), SP).startswith(
        f'Invalid vault name: "{name}", {problem}'
    )


@pytest.mark.parametrize(
    ("given", "fix"),
    [
        ("https://my-vault.vault.azure.net/", "write keyvaultName: my-vault"),
        ("kv1.vault.usgovcloudapi.net", "write keyvaultName: kv1"),
        ("https://kv.vault.azure.net/", "for https://myvault.vault.azure.net/ write myvault"),  # "kv" is too short
        ("https://my_vault.vault.azure.net", "for https://myvault.vault.azure.net/ write myvault"),
        ("https://[my-vault.vault.azure.net", "for https://myvault.vault.azure.net/ write myvault"),  # not a URL
        ("my-vault.vault.azure.net:443/x", "write keyvaultName: my-vault"),
    ],
)
def test_a_vault_url_is_answered_with_the_name_to_write(given: str, fix: str) -> None:
    assert csi_error(base(keyvaultName=given), SP).endswith(f"(keyvaultName is the vault's name, not its URL: {fix})")


def test_vault_name_checked_after_objects() -> None:
    msg = csi_error(base(keyvaultName="kv", objects="- a"), SP)
    assert msg.startswith("failed to yaml unmarshal objects")


@pytest.mark.parametrize(
    ("cloud", "url"),
    [
        ("", "https://testkv.vault.azure.net/"),
        ("AZURECHINACLOUD", "https://testkv.vault.azure.cn/"),
    ],
)
def test_vault_url(cloud: str, url: str) -> None:
    assert parse_parameters(base(cloudName=cloud), SP, context="csi").vault_url == url


def test_default_cloud_argument() -> None:
    cfg = parse_parameters(base(), SP, context="csi", default_cloud="AzureUSGovernmentCloud")
    assert cfg.cloud.name == "AzureUSGovernmentCloud"
    assert (
        parse_parameters(
            base(cloudName="AzurePublicCloud"), SP, context="csi", default_cloud="AzureChinaCloud"
        ).cloud.name
        == "AzurePublicCloud"
    )


# --- keys, trimming, pod info, extensions ----------------------------------------------------


def test_values_trimmed_keys_case_sensitive() -> None:
    cfg = parse_parameters(base(keyvaultName="  testkv \n"), SP, context="csi")
    assert cfg.vault_name == "testkv"
    params = base()
    params["KeyVaultName"] = params.pop("keyvaultName")
    msg = csi_error(params, SP)
    assert (
        msg.startswith("keyvaultName is not provided")
        and "rename KeyVaultName to keyvaultName" in msg
    )


def test_unknown_keys_ignored() -> None:
    cfg = parse_parameters(
        base(resourceGroup="rg", subscriptionId="s", whatever="x"), SP, context="csi"
    )
    assert cfg.vault_name == "testkv"


def test_pod_info_and_spc_name_recorded() -> None:
    params = base(
        **{
            "csi.storage.k8s.io/pod.uid": "uid-1",
            "csi.storage.k8s.io/serviceAccount.name": "sa-1",
            "secretProviderClass": "my-spc",
        }
    )
    cfg = parse_parameters(params, SP, context="csi")
    assert (
        cfg.pod_name,
        cfg.pod_namespace,
        cfg.pod_uid,
        cfg.service_account_name,
        cfg.secret_provider_class,
    ) == ("web-0", "shop", "uid-1", "sa-1", "my-spc")


def test_extension_defaults() -> None:
    cfg = parse_parameters(base(), SP, context="csi")
    assert (
        cfg.split_cert_key,
        cfg.construct_pem_chain,
        cfg.refresh_interval,
        cfg.max_staleness,
    ) == (False, True, 120.0, 0.0)


def test_extensions_parsed() -> None:
    cfg = parse_parameters(
        base(
            writeCertAndKeyInSeparateFiles="true",
            constructPEMChain="false",
            refreshInterval="2m",
            maxStaleness="1h",
        ),
        SP,
        context="csi",
    )
    assert (
        cfg.split_cert_key,
        cfg.construct_pem_chain,
        cfg.refresh_interval,
        cfg.max_staleness,
    ) == (True, False, 120.0, 3600.0)
    assert parse_parameters(base(refreshInterval="0"), SP, context="csi").refresh_interval == 0.0


@pytest.mark.parametrize(
    ("extra", "split", "chain"),
    [
        ({}, True, False),  # nothing said: the node's defaults
        ({"writeCertAndKeyInSeparateFiles": " ", "constructPEMChain": ""}, True, False),  # empty: the same
        ({"writeCertAndKeyInSeparateFiles": "false", "constructPEMChain": "true"}, False, True),  # the class wins
    ],
)
def test_node_wide_defaults_apply_where_the_class_says_nothing(extra: dict[str, str], split: bool, chain: bool) -> None:
    node = RenderDefaults(split_cert_key=True, construct_pem_chain=False)
    cfg = parse_parameters(base(**extra), SP, context="csi", defaults=node)
    assert (cfg.split_cert_key, cfg.construct_pem_chain) == (split, chain)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("writeCertAndKeyInSeparateFiles", "yes"),
        ("constructPEMChain", "nope"),
        ("refreshInterval", "soon"),
        ("maxStaleness", "-5s"),
    ],
)
def test_extension_errors_name_field(key: str, value: str) -> None:
    assert key in csi_error(base(**{key: value}), SP)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("1.5", 1.5),
        ("30s", 30.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("500ms", 0.5),
        ("1h0m5s", 3605.0),
        (" 0 ", 0.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text, "refreshInterval") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "-5", "-1m", "5x", "m", "1 m", "1e3", "nan", "inf", "1s2"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(text, "refreshInterval")
    assert "refreshInterval" in str(info.value) and '"30s"' in str(info.value)


def test_non_string_value_refused() -> None:
    assert "must be strings" in csi_error({**base(), "keyvaultName": 5}, SP)  # type: ignore[dict-item]


# --- no secret ever in an error --------------------------------------------------------------


SECRET_CASES = [
    ("sp missing id", base(), {"clientsecret": CLIENT_SECRET}),
    ("sp odd keys", base(), {"client_id": CLIENT_SECRET, "clientsecret": CLIENT_SECRET}),
    ("sp ok but bad vault", base(keyvaultName="k"), SP),
    ("sp ok but bad objects", base(objects="array: [x"), SP),
    ("wi wrong audience", base(clientID=APP, **{SA_TOKENS_KEY: tokens_json(audience="aud")}), None),
    (
        "wi token as key",
        base(clientID=APP, **{SA_TOKENS_KEY: json.dumps({TOKEN: {"token": TOKEN}})}),
        None,
    ),
    ("wi broken json", base(clientID=APP, **{SA_TOKENS_KEY: tokens_json()[:-3]}), None),
    (
        "wi token not str",
        base(
            clientID=APP,
            **{SA_TOKENS_KEY: json.dumps({"api://AzureADTokenExchange": {"token": [TOKEN]}})},
        ),
        None,
    ),
    (
        "wi in secrets, bad vault",
        base(clientID=APP, keyvaultName="x"),
        {SA_TOKENS_KEY: tokens_json()},
    ),
    (
        "wi in secrets, no tenant",
        {**POD, "keyvaultName": "kv1", "clientID": APP},
        {SA_TOKENS_KEY: tokens_json(), **SP},
    ),
    ("vm refused", base(useVMManagedIdentity="true", **{SA_TOKENS_KEY: tokens_json()}), SP),
]


@pytest.mark.parametrize(
    ("label", "params", "secrets"), SECRET_CASES, ids=[c[0] for c in SECRET_CASES]
)
def test_errors_never_contain_tokens_or_client_secrets(
    label: str, params: dict, secrets: dict | None
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_parameters(params, secrets, context="csi")
    err = info.value
    shown = " ".join(
        [str(err), repr(err), str(err.value), err.problem, err.fix, err.field, str(err.args)]
    )
    for needle in (TOKEN, CLIENT_SECRET, TOKEN[:20], CLIENT_SECRET[:12]):
        assert needle not in shown, label


# --- ids are checked before use (issue 9: they reach URLs and suggested `az` commands) ----------


@pytest.mark.parametrize("tenant", [TENANT, TENANT.upper(), "adfs", "contoso.onmicrosoft.com", "x.example"])
def test_tenant_forms_accepted(tenant: str) -> None:
    assert parse_parameters(base(tenantID=tenant), SP, context="csi").auth.tenant_id == tenant


@pytest.mark.parametrize(
    "tenant", ["t", "tenant-1", "ADFS x", "contoso.onmicrosoft.com'; rm -rf ~", "a..b.com", "-x.com", "x.c0m"]
)
def test_tenant_forms_refused(tenant: str) -> None:
    assert "is not a tenant ID" in csi_error(base(tenantID=tenant), SP)


@pytest.mark.parametrize("field", ["clientID", "userAssignedIdentityID"])
@pytest.mark.parametrize("value", ["app", "0000-00", "00000000-0000-0000-0000-00000000000a'; id"])
def test_client_ids_must_be_guids(field: str, value: str) -> None:
    if field == "clientID":
        params, kw = base(clientID=value, **{SA_TOKENS_KEY: tokens_json()}), {}
    else:
        params, kw = base(useVMManagedIdentity="true", userAssignedIdentityID=value), {"allow_node_identity": True}
    msg = csi_error(params, None, **kw)
    assert msg.startswith(f"{field} ") and "is not a GUID" in msg


def test_service_principal_client_id_must_be_a_guid_and_is_not_echoed() -> None:
    msg = csi_error(base(), {"clientid": "not-a-guid-VALUE", "clientsecret": CLIENT_SECRET})
    assert "clientid" in msg and "is not a GUID" in msg and "nodePublishSecretRef" in msg
    assert "not-a-guid-VALUE" not in msg and CLIENT_SECRET not in msg


def _stack_env_file(folder) -> str:  # type: ignore[no-untyped-def]
    """An Azure Stack cloud env file in `folder`; its path."""
    env = folder / "env.json"
    env.write_text(json.dumps({
        "activeDirectoryEndpoint": "https://adfs.local/adfs/",
        "keyVaultEndpoint": "https://vault.local/",
        "keyVaultDNSSuffix": "vault.local",
    }))  # fmt: skip
    return str(env)


def test_csi_reads_cloud_env_files_only_from_the_admin_folder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = _stack_env_file(tmp_path)
    params = base(cloudName="AzureStackCloud", cloudEnvFileName=env)
    assert "is not a file inside /etc/kubernetes" in csi_error(params, SP)  # the default folder
    cfg = parse_parameters(params, SP, context="csi", cloud_env_dir=str(tmp_path))
    assert cfg.cloud.keyvault_dns_suffix == "vault.local"
    assert parse_parameters(params, SP, context="cli").cloud.name == "AzureStackCloud"  # workstation: any path


def test_a_cloud_env_file_read_ahead_parses_as_one_read_in_place(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The CSI daemon reads the file as root and parses after its drop: same config, same errors, same order."""
    folder = tmp_path / "clouds"
    folder.mkdir()
    env = _stack_env_file(folder)
    params = base(cloudName="AzureStackCloud", cloudEnvFileName=env)
    in_place = parse_parameters(params, SP, context="csi", cloud_env_dir=str(folder))
    ahead = read_cloud_env_file(params, cloud_env_dir=str(folder))
    os.unlink(env)  # the parse opens nothing
    assert parse_parameters(params, SP, context="csi", cloud_env_dir=str(folder), cloud_env=ahead) == in_place

    outside = base(cloudName="AzureStackCloud", cloudEnvFileName="/etc/shadow")
    for bad in (outside, {**outside, "keyvaultName": ""}):  # a failed read is told where the parse reaches it
        ahead = read_cloud_env_file(bad)
        assert csi_error(bad, SP, cloud_env=ahead) == csi_error(bad, SP)
    assert "is not a file inside /etc/kubernetes" in csi_error(outside, SP, cloud_env=read_cloud_env_file(outside))
    with pytest.raises(ValueError, match="was not the file read ahead"):
        parse_parameters(params, SP, context="csi", cloud_env_dir=str(folder), cloud_env=read_cloud_env_file(outside))
