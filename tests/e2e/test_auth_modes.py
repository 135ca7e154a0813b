"""Issue 4, "every way to authenticate", end to end: real FUSE mounts, HTTPS to the emulator.

Each identity mode reads a secret through `kvfs mount`; bad identity settings are refused before
any network call; every Entra ID / IMDS / NMI failure we can provoke shows as EACCES on read plus
one daemon log line naming the code, what kvfs presented and the fix (never a token or secret).
Those mounts skip the identity preflight (`--no-preflight`): they show what a read answers when an
identity breaks after mounting. The preflight itself is tests/e2e/test_preflight.py.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import jwt
import pytest
import yaml

from guards import LogCheck
from loopback import LoopbackServer
from e2e.conftest import (
    Mount,
    Mounter,
    errno_of,
    is_mounted,
    needs_fuse,
    objects_yaml,
    read,
    spc_manifest,
    wait_until,
    workload_parameters,
)
from kvfs.auth.cache import refresh_margin_for
from kvfs.config.parameters import parse_parameters
from kvfs.emulator import entra
from kvfs.emulator.server import Emulator, EmulatorThread
from kvfs.errors import ConfigError

pytestmark = [needs_fuse, pytest.mark.mount]

SECRET = {"objectName": "demo-secret", "objectType": "secret"}
VALUE = "auth-modes value ✓"
WORKLOAD_SUBJECT = "system:serviceaccount:default:workload"


# ---- helpers ---------------------------------------------------------------------------------


def read_ok(mount: Mount, name: str = "demo-secret") -> bytes:
    """Read a file that must be readable; a failure shows the daemon's log."""
    try:
        return read(mount.path / name)
    except OSError as err:
        raise AssertionError(f"reading {name} failed ({err.strerror}); daemon log:\n{mount.log()}") from None


def unauthenticated(emu: Emulator) -> int:
    """Key Vault requests without a valid token (the emulator counts them with client id None)."""
    return sum(e["count"] for e in emu.counts.snapshot() if e["vault"] is not None and e["client_id"] is None)


def clean_env(mounter: Mounter, **extra: str) -> dict[str, str]:
    """The mount environment without any AZURE_* variable from the outside (hermetic modes)."""
    env = {k: v for k, v in mounter.env().items() if not k.startswith("AZURE_")}
    env.update(extra)
    return env


def stack_parameters(emu: Emulator, *objects: dict, **extra: str) -> dict[str, str]:
    """Vault + cloud only: no clientID, so the identity comes from the mode under test."""
    params = workload_parameters(emu, *(objects or (SECRET,)), **extra)
    del params["clientID"]
    return params


def write_secrets(path: Path, mapping: dict[str, str]) -> str:
    path.write_text(yaml.safe_dump(mapping))
    path.chmod(0o600)
    return str(path)


def refusal_line(mount: Mount, code: str) -> str:
    """The one WARNING line the daemon logs for the object's first failure."""
    lines = [line for line in mount.log().splitlines() if " WARNING " in line and code in line]
    assert len(lines) == 1, f"expected one WARNING line with {code}:\n{mount.log()}"
    return lines[0]


def assert_refused(mount: Mount, code: str, *presented: str, fix: str, secrets: tuple[str, ...] = ()) -> str:
    """EACCES on read, and one log line with the code, the presented values and `fix`; no credentials."""
    assert errno_of(mount.path / "demo-secret") == errno.EACCES
    assert errno_of(mount.path / "demo-secret") == errno.EACCES  # a second read: same answer, no new line
    line = refusal_line(mount, code)
    assert "object=secret/demo-secret" in line
    for value in presented:
        assert value in line, f"{value!r} missing from: {line}"
    assert fix in line, f"the fix {fix!r} is missing from: {line}"
    log = mount.log()
    assert "eyJ" not in log, "a JWT reached the log"
    assert "Traceback" not in log
    for secret in secrets:
        assert secret and secret not in log
    return line


def mount_refused(emu: Emulator, tmp_path: Path, params: dict[str, str], *args: str,
                  env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`kvfs mount` that must fail validation: nothing mounted, nothing sent."""
    spc = tmp_path / "refused.yaml"
    spc.write_text(spc_manifest(params))
    mountpoint = tmp_path / "refused-mnt"
    mountpoint.mkdir(exist_ok=True)
    emu.reset_counts()
    result = subprocess.run(
        [sys.executable, "-m", "kvfs", "mount", "--spc", str(spc), str(mountpoint), *args],
        capture_output=True, text=True, timeout=30, env=env,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert not is_mounted(mountpoint)
    assert emu.count() == 0, "a refused configuration must not reach the network"
    return result


@pytest.fixture
def assertions(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Claims of every client assertion the emulator's Entra ID checked (it runs in this process)."""
    seen: list[dict] = []
    original = entra._check_assertion

    def recording(provider, app, raw):  # type: ignore[no-untyped-def]
        seen.append(jwt.decode(raw.strip(), options={"verify_signature": False}))
        return original(provider, app, raw)

    monkeypatch.setattr(entra, "_check_assertion", recording)
    return seen


@pytest.fixture
def short_emu(tmp_path: Path) -> Iterator[Emulator]:
    """An emulator issuing 4 s access tokens, so a test sees several token lifetimes."""
    with EmulatorThread(tmp_path / "short-emulator", token_lifetime=4) as emulator:
        yield emulator


@pytest.fixture
def short_mounter(short_emu: Emulator, tmp_path: Path, checklogs: LogCheck) -> Iterator[Mounter]:
    mounter = Mounter(short_emu, tmp_path / "short", checklogs)
    mounter.tmp.mkdir()
    try:
        yield mounter
    finally:
        mounter.close()


class SentinelProxy(LoopbackServer):
    """A proxy that forwards nothing and records who tried to use it: any public-Azure call shows."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        super().__init__()
        self.url = f"http://127.0.0.1:{self.port}"

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(2)
        try:
            self.requests.append(conn.recv(4096).split(b"\r\n", 1)[0].decode("latin-1"))
        except OSError:
            self.requests.append("(connection without a request line)")

    def env(self, env: dict[str, str], no_proxy: str = "") -> dict[str, str]:
        """`env` with every proxy variable pointing here (and NO_PROXY = `no_proxy`)."""
        env = dict(env)
        for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            env[name] = self.url
        env["NO_PROXY"] = env["no_proxy"] = no_proxy
        return env


@pytest.fixture
def sentinel() -> Iterator[SentinelProxy]:
    proxy = SentinelProxy()
    try:
        yield proxy
    finally:
        proxy.close()


# ---- every mode reads a secret ---------------------------------------------------------------


def test_workload_identity_with_a_user_assigned_managed_identity(
    emu: Emulator, mounter: Mounter, assertions: list[dict]
) -> None:
    emu.set_secret("demo", "demo-secret", VALUE)
    identity = emu.identity.add_managed_identity()
    emu.identity.add_federated_credential(identity.client_id, issuer=emu.oidc_issuer, subject=WORKLOAD_SUBJECT)
    emu.grant("demo", identity.client_id)
    emu.reset_counts()
    mount = mounter.start(workload_parameters(emu, SECRET, clientID=identity.client_id))
    assert read_ok(mount) == VALUE.encode()
    assert emu.count(route="token", client_id=identity.client_id) == 1
    assert emu.count(route="get_secret", client_id=identity.client_id) == 1
    assert [a["sub"] for a in assertions] == [WORKLOAD_SUBJECT]
    assert "auth=workload_identity" in mount.log()


def _flat_yaml(client_id: str, secret: str) -> str:
    return yaml.safe_dump({"ClientID": client_id, "CLIENTSECRET": secret})


def _json(client_id: str, secret: str) -> str:
    return json.dumps({"clientId": client_id, "clientSecret": secret})


def _secret_manifest(client_id: str, secret: str) -> str:
    """What `kubectl get secret -o yaml` gives for a nodePublishSecretRef secret."""
    b64 = lambda text: base64.b64encode(text.encode()).decode()  # noqa: E731
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sp-creds"}, "type": "Opaque",
        "data": {"clientid": b64(client_id), "clientsecret": b64(secret)},
    })


@pytest.mark.parametrize("render", [_flat_yaml, _json, _secret_manifest], ids=["yaml", "json", "secret-manifest"])
def test_service_principal_from_a_secrets_file(
    emu: Emulator, mounter: Mounter, tmp_path: Path, render: Callable[[str, str], str]
) -> None:
    emu.set_secret("demo", "demo-secret", VALUE)
    app = emu.identity.default_app
    assert app.client_secret
    secrets = tmp_path / "sp-creds"
    secrets.write_text(render(app.client_id, app.client_secret))
    secrets.chmod(0o600)
    emu.reset_counts()
    mount = mounter.start(stack_parameters(emu), "--secrets", str(secrets), env=clean_env(mounter))
    assert read_ok(mount) == VALUE.encode()
    assert emu.count(route="token", client_id=app.client_id) == 1
    assert emu.count(route="get_secret", client_id=app.client_id) == 1
    log = mount.log()
    assert "auth=service_principal" in log
    assert app.client_secret not in log
    assert " WARNING " not in log


def test_vm_managed_identity_user_assigned_never_through_a_proxy(
    emu: Emulator, mounter: Mounter, sentinel: SentinelProxy
) -> None:
    emu.set_secret("demo", "demo-secret", VALUE)
    identity = emu.identity.add_managed_identity()
    emu.grant("demo", identity.client_id)
    emu.reset_counts()
    mount = mounter.start(
        stack_parameters(emu, useVMManagedIdentity="true", userAssignedIdentityID=identity.client_id),
        env=sentinel.env(clean_env(mounter, AZURE_POD_IDENTITY_AUTHORITY_HOST=emu.imds_url)),
    )
    assert read_ok(mount) == VALUE.encode()
    assert emu.count(route="imds", client_id=identity.client_id) == 1
    assert emu.count(route="get_secret", client_id=identity.client_id) == 1
    assert emu.count(route="token") == 0
    assert sentinel.requests == []  # IMDS is node-local: a proxy must never see it


def test_vm_managed_identity_system_assigned_without_tenant(emu: Emulator, mounter: Mounter) -> None:
    emu.set_secret("demo", "demo-secret", VALUE)
    system = emu.info["managed_identity"]["client_id"]
    params = stack_parameters(emu, useVMManagedIdentity="true")
    del params["tenantId"]  # upstream demands a tenant it never uses here; kvfs does not
    emu.reset_counts()
    mount = mounter.start(params, env=clean_env(mounter, AZURE_POD_IDENTITY_AUTHORITY_HOST=emu.imds_url))
    assert read_ok(mount) == VALUE.encode()
    assert emu.count(route="imds", client_id=system) == 1
    assert emu.count(route="get_secret", client_id=system) == 1


def test_pod_identity_through_nmi_never_through_a_proxy(
    emu: Emulator, mounter: Mounter, sentinel: SentinelProxy
) -> None:
    emu.set_secret("demo", "demo-secret", VALUE)
    identity = emu.identity.add_managed_identity()
    emu.identity.bind_pod("shop", "web-0", identity.client_id)
    emu.grant("demo", identity.client_id)
    emu.reset_counts()
    mount = mounter.start(
        stack_parameters(emu, usePodIdentity="true"),
        "--param", "csi.storage.k8s.io/pod.name=web-0",
        "--param", "csi.storage.k8s.io/pod.namespace=shop",
        env=sentinel.env(clean_env(mounter, KVFS_NMI_URL=emu.nmi_url)),
    )
    assert read_ok(mount) == VALUE.encode()
    assert emu.count(route="nmi", client_id=identity.client_id) == 1
    assert emu.count(route="get_secret", client_id=identity.client_id) == 1
    assert "pod=shop/web-0" in mount.log()
    assert sentinel.requests == []


@pytest.mark.parametrize(
    ("variant", "authority_suffix"),
    [("client-secret", ""), ("client-secret", "/"), ("federated-token", "/")],
    ids=["client-secret", "client-secret-trailing-slash", "federated-token"],
)
def test_workstation_default_chain_with_environment_credentials_and_no_public_azure(
    emu: Emulator, mounter: Mounter, sentinel: SentinelProxy, variant: str, authority_suffix: str
) -> None:
    """No clientID, no --secrets: azure-identity's DefaultAzureCredential, pointed at the emulator.

    "federated-token" is what the workload identity webhook injects into a pod (AZURE_CLIENT_ID,
    AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE, AZURE_AUTHORITY_HOST with its trailing '/').
    """
    emu.set_secret("demo", "demo-secret", VALUE)
    app = emu.identity.default_app
    assert app.client_secret
    env = clean_env(
        mounter,
        AZURE_CLIENT_ID=app.client_id,
        AZURE_TENANT_ID=emu.tenant_id,
        AZURE_AUTHORITY_HOST=emu.authority_host + authority_suffix,
    )
    if variant == "client-secret":
        env["AZURE_CLIENT_SECRET"] = app.client_secret
    else:
        env["AZURE_FEDERATED_TOKEN_FILE"] = str(emu.sa_token_file)
    # Anything not bound for the emulator (login.microsoftonline.com instance discovery, ...)
    # goes through the sentinel proxy and is recorded there.
    env = sentinel.env(env, no_proxy="localhost,.localhost,127.0.0.1")
    emu.reset_counts()
    mount = mounter.start(stack_parameters(emu), env=env)
    assert read_ok(mount) == VALUE.encode()
    assert emu.count(route="token", client_id=app.client_id) >= 1
    assert emu.count(route="get_secret", client_id=app.client_id) == 1
    assert sentinel.requests == []
    log = mount.log()
    assert "auth=default_chain" in log
    assert app.client_secret not in log
    assert "eyJ" not in log


# ---- refused before any network call ---------------------------------------------------------


def test_conflicting_modes_are_refused(emu: Emulator, mounter: Mounter, tmp_path: Path) -> None:
    result = mount_refused(
        emu, tmp_path, stack_parameters(emu, usePodIdentity="true", useVMManagedIdentity="true"),
        env=clean_env(mounter),
    )
    assert "only one identity mode can be enabled at a time" in result.stderr


def test_service_principal_without_a_secret_is_refused(emu: Emulator, mounter: Mounter, tmp_path: Path) -> None:
    app = emu.identity.default_app
    secrets = write_secrets(tmp_path / "sp.yaml", {"clientId": app.client_id})
    result = mount_refused(emu, tmp_path, stack_parameters(emu), "--secrets", secrets, env=clean_env(mounter))
    assert "could not find clientsecret in secrets" in result.stderr
    assert "keys present: clientId" in result.stderr


def test_service_principal_with_an_empty_secrets_file_is_refused(
    emu: Emulator, mounter: Mounter, tmp_path: Path
) -> None:
    secrets = tmp_path / "empty.yaml"
    secrets.write_text("{}\n")
    result = mount_refused(emu, tmp_path, stack_parameters(emu), "--secrets", str(secrets), env=clean_env(mounter))
    assert "could not find clientid in secrets" in result.stderr


def test_workload_identity_without_a_token_file_is_refused(emu: Emulator, mounter: Mounter, tmp_path: Path) -> None:
    result = mount_refused(emu, tmp_path, workload_parameters(emu, SECRET), env=clean_env(mounter))
    assert "AZURE_FEDERATED_TOKEN_FILE" in result.stderr
    assert "is not set" in result.stderr


def test_pod_identity_without_pod_info_is_refused(emu: Emulator, mounter: Mounter, tmp_path: Path) -> None:
    result = mount_refused(
        emu, tmp_path, stack_parameters(emu, usePodIdentity="true"), "--param", "csi.storage.k8s.io/pod.name=web-0",
        env=clean_env(mounter, KVFS_NMI_URL=emu.nmi_url),
    )
    assert "pod information is not available" in result.stderr
    assert "--param csi.storage.k8s.io/pod.namespace=NAMESPACE" in result.stderr


def test_a_token_file_that_does_not_exist_is_refused_at_mount(emu: Emulator, mounter: Mounter, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-token"
    result = mount_refused(emu, tmp_path, workload_parameters(emu, SECRET),
                           env=mounter.env(AZURE_FEDERATED_TOKEN_FILE=str(missing)))
    assert "AZURE_FEDERATED_TOKEN_FILE" in result.stderr and str(missing) in result.stderr


def test_a_token_file_that_disappears_is_named_on_read(emu: Emulator, mounter: Mounter, tmp_path: Path) -> None:
    token = tmp_path / "vanishing-token"
    token.write_text(emu.identity.mint_sa_token("default", "workload"))
    # without the preflight's token in the cache, the first read needs the file
    mount = mounter.start(
        workload_parameters(emu, SECRET), "--no-preflight", env=mounter.env(AZURE_FEDERATED_TOKEN_FILE=str(token))
    )
    token.unlink()
    emu.reset_counts()
    assert_refused(mount, "token_file_missing", str(token), fix="check AZURE_FEDERATED_TOKEN_FILE")
    assert emu.count() == 0


def test_csi_refuses_the_node_identity_unless_allowed() -> None:
    params = {
        "csi.storage.k8s.io/pod.name": "web-0",
        "csi.storage.k8s.io/pod.namespace": "shop",
        "useVMManagedIdentity": "true",
        "keyvaultName": "demo",
        "objects": objects_yaml(SECRET),
    }
    with pytest.raises(ConfigError, match="--allow-node-identity"):
        parse_parameters(params, None, context="csi")
    config = parse_parameters(params, None, context="csi", allow_node_identity=True)
    assert config.auth.mode == "vm_managed_identity"


# ---- each failure: EACCES on read + one actionable log line -----------------------------------


@pytest.mark.parametrize(
    ("mint", "refined", "code", "presented"),
    [
        ({"audience": "api://SomethingElse"}, False, "AADSTS70021", ["Audience 'api://SomethingElse'"]),
        ({"issuer": "https://issuer.example/cluster"}, False, "AADSTS70021",
         ["Issuer 'https://issuer.example/cluster'"]),
        ({"issuer": "https://issuer.example/cluster"}, True, "AADSTS700211", ["'https://issuer.example/cluster'"]),
        ({"audience": "api://SomethingElse"}, True, "AADSTS700212", ["'api://SomethingElse'"]),
        ({"service_account": "Workload"}, True, "AADSTS700213", ["'system:serviceaccount:default:Workload'"]),
    ],
    ids=["audience", "issuer", "issuer-refined", "audience-refined", "subject-refined"],
)
def test_federated_credential_mismatch(
    emu: Emulator, mounter: Mounter, tmp_path: Path, mint: dict, refined: bool, code: str, presented: list[str]
) -> None:
    emu.set_secret("demo", "demo-secret", VALUE)
    emu.identity.refined_fic_errors = refined
    service_account = mint.pop("service_account", "workload")
    token = emu.identity.mint_sa_token("default", service_account, **mint)
    token_file = tmp_path / "sa-token"
    token_file.write_text(token + "\n")
    mount = mounter.start(
        workload_parameters(emu, SECRET), "--no-preflight", env=mounter.env(AZURE_FEDERATED_TOKEN_FILE=str(token_file))
    )
    assert_refused(mount, code, emu.identity.default_app.client_id, *presented,
                   fix="az ad app federated-credential", secrets=(token,))


def test_a_refused_identity_recovers_once_its_federated_credential_exists(
    emu: Emulator, mounter: Mounter, tmp_path: Path
) -> None:
    """The 70021 message promises that later reads retry (a new FIC takes minutes to propagate)."""
    emu.set_secret("demo", "demo-secret", VALUE)
    token_file = tmp_path / "sa-token"
    token_file.write_text(emu.identity.mint_sa_token("shop", "web"))
    mount = mounter.start(
        workload_parameters(emu, SECRET), "--no-preflight", env=mounter.env(AZURE_FEDERATED_TOKEN_FILE=str(token_file))
    )
    assert_refused(mount, "AADSTS70021", "system:serviceaccount:shop:web", fix="az ad app federated-credential")
    emu.identity.add_federated_credential(
        emu.identity.default_app.client_id, issuer=emu.oidc_issuer, subject="system:serviceaccount:shop:web"
    )

    def readable() -> bool:
        try:
            return read(mount.path / "demo-secret") == VALUE.encode()
        except PermissionError:
            return False

    wait_until(readable, timeout=15, interval=0.25)
    assert "fetched again after failures" in mount.log()


def test_unknown_client_id_is_700016(emu: Emulator, mounter: Mounter) -> None:
    unknown = str(uuid.uuid4())
    mount = mounter.start(workload_parameters(emu, SECRET, clientID=unknown), "--no-preflight")
    assert_refused(mount, "AADSTS700016", unknown, emu.tenant_id,
                   fix="set clientID to the identity's client (application) id")
    assert emu.count(route="token", client_id=unknown) == 1


def test_bad_client_secret_is_7000215(emu: Emulator, mounter: Mounter, tmp_path: Path) -> None:
    app = emu.identity.default_app
    wrong = "not-the-secret-" + uuid.uuid4().hex
    secrets = write_secrets(tmp_path / "sp.yaml", {"clientid": app.client_id, "clientsecret": wrong})
    mount = mounter.start(stack_parameters(emu), "--secrets", secrets, "--no-preflight", env=clean_env(mounter))
    assert_refused(mount, "AADSTS7000215", app.client_id, emu.tenant_id,
                   fix="must be the secret's Value, not its Secret ID", secrets=(wrong, str(app.client_secret)))


def test_expired_assertion_is_700024(emu: Emulator, mounter: Mounter, tmp_path: Path) -> None:
    token = emu.identity.mint_sa_token("default", "workload", lifetime=-60)  # expired a minute ago
    claims = jwt.decode(token, options={"verify_signature": False})
    token_file = tmp_path / "expired-token"
    token_file.write_text(token)
    mount = mounter.start(
        workload_parameters(emu, SECRET), "--no-preflight", env=mounter.env(AZURE_FEDERATED_TOKEN_FILE=str(token_file))
    )
    assert_refused(mount, "AADSTS700024", f"iat={claims['iat']}", f"exp={claims['exp']}",
                   fix="check the node's clock", secrets=(token,))


def test_unknown_tenant_is_90002(emu: Emulator, mounter: Mounter) -> None:
    tenant = str(uuid.uuid4())
    mount = mounter.start(workload_parameters(emu, SECRET, tenantId=tenant), "--no-preflight")
    assert_refused(mount, "AADSTS90002", tenant, fix="set tenantID to the directory (tenant) id")


def test_imds_unknown_user_assigned_identity(emu: Emulator, mounter: Mounter) -> None:
    unknown = str(uuid.uuid4())
    mount = mounter.start(
        stack_parameters(emu, useVMManagedIdentity="true", userAssignedIdentityID=unknown),
        "--no-preflight",
        env=clean_env(mounter, AZURE_POD_IDENTITY_AUTHORITY_HOST=emu.imds_url),
    )
    assert_refused(mount, "imds_identity_not_found", unknown, "Identity not found",
                   fix="set userAssignedIdentityID to the client id of an identity assigned")


def test_nmi_unbound_pod(emu: Emulator, mounter: Mounter) -> None:
    emu.identity.bind_pod("shop", "web-0", None)
    mount = mounter.start(
        stack_parameters(emu, usePodIdentity="true"),
        "--param", "csi.storage.k8s.io/pod.name=web-0",
        "--param", "csi.storage.k8s.io/pod.namespace=shop",
        "--no-preflight",
        env=clean_env(mounter, KVFS_NMI_URL=emu.nmi_url),
    )
    assert_refused(mount, "nmi_404", "shop/web-0", fix="check that an AzureIdentityBinding selects this pod")


# ---- tokens over time ------------------------------------------------------------------------


def test_mount_keeps_reading_across_token_lifetimes(short_emu: Emulator, short_mounter: Mounter) -> None:
    emu = short_emu
    lifetime = 4.0
    emu.set_secret("demo", "demo-secret", "v0")
    mount = short_mounter.start(workload_parameters(emu, SECRET), "--refresh-interval", "0.5s")
    emu.reset_counts()
    assert read(mount.path / "demo-secret") == b"v0"
    started = time.monotonic()
    read_at: list[float] = []  # seconds since `started` of each successful read
    failures = 0
    rotation = 0
    seen: set[bytes] = set()
    while time.monotonic() - started < 13:
        elapsed = time.monotonic() - started
        if int(elapsed / 2) > rotation:  # a new version every 2 s proves the refreshes really ran
            rotation = int(elapsed / 2)
            emu.set_secret("demo", "demo-secret", f"v{rotation}")
        try:
            seen.add(read(mount.path / "demo-secret"))
            read_at.append(elapsed)
        except OSError:
            failures += 1
        time.sleep(0.2)
    duration = time.monotonic() - started
    assert failures == 0
    # Reads succeeded within every token lifetime of the run, however slow the machine is.
    lifetimes_with_reads = {int(at / lifetime) for at in read_at}
    assert lifetimes_with_reads >= set(range(int(duration / lifetime))), sorted(read_at)
    assert len(seen) >= rotation, f"the refresh stopped following rotations: saw {sorted(seen)}"
    # No request ever reached Key Vault with an expired or missing token (those count as client None).
    assert unauthenticated(emu) == 0
    # One exchange per refresh period (kvfs.auth.cache.refresh_margin_for: a 4 s token is
    # replaced 2 s before expiry), plus one for the period the loop started in.
    period = lifetime - refresh_margin_for(lifetime)
    exchanges = emu.count(route="token")
    assert int(duration / lifetime) <= exchanges <= int(duration / period) + 2, (exchanges, duration)
    assert " WARNING " not in mount.log()


def test_an_identity_provider_answering_expires_in_0_is_asked_once_a_minute(emu: Emulator, mounter: Mounter) -> None:
    """An odd identity provider: its tokens live an hour, yet it answers `expires_in: 0`. Each Key Vault
    request would exchange a token; kvfs uses each for a minute (kvfs.auth.cache.EXPIRED_TOKEN_HOLD),
    says so once, and reads on."""
    emu.identity.answered_lifetime = 0
    emu.set_secret("demo", "demo-secret", "v0")
    mount = mounter.start(workload_parameters(emu, SECRET), "--refresh-interval", "0.3s")
    assert read(mount.path / "demo-secret") == b"v0"
    exchanges, gets = emu.count(route="token"), emu.count(route="get_secret")
    for version in range(1, 6):  # the background refresh follows five rotations, each a few GETs
        emu.set_secret("demo", "demo-secret", f"v{version}")
        wait_until(lambda want=f"v{version}".encode(): read(mount.path / "demo-secret") == want, timeout=10)
    assert emu.count(route="get_secret") >= gets + 5
    assert emu.count(route="token") == exchanges, "a token was exchanged again within its minute"
    assert unauthenticated(emu) == 0
    warnings = [line for line in mount.log().splitlines() if " WARNING " in line]
    assert len(warnings) == 1, warnings
    assert re.search(r"Entra ID at https://\S+ answered an access token that expires in 0 s", warnings[0]), warnings


def test_token_file_is_reread_when_kubelet_swaps_it(
    short_emu: Emulator, short_mounter: Mounter, tmp_path: Path, assertions: list[dict]
) -> None:
    emu = short_emu
    app = emu.identity.default_app
    second = "system:serviceaccount:default:second"
    emu.identity.add_federated_credential(app.client_id, issuer=emu.oidc_issuer, subject=second)
    # kubelet's projected volume: token -> ..data/token, ..data -> a timestamped folder, swapped atomically.
    volume = tmp_path / "projected"
    volume.mkdir()

    def project(token: str, stamp: str) -> None:
        folder = volume / stamp
        folder.mkdir()
        (folder / "token").write_text(token)
        (volume / "..data_tmp").symlink_to(stamp)
        os.replace(volume / "..data_tmp", volume / "..data")

    project(emu.identity.mint_sa_token("default", "workload"), "..2026_01_01_00_00_00.1")
    (volume / "token").symlink_to("..data/token")
    emu.set_secret("demo", "demo-secret", "first")
    mount = short_mounter.start(
        workload_parameters(emu, SECRET), "--refresh-interval", "0.3s",
        env=short_mounter.env(AZURE_FEDERATED_TOKEN_FILE=str(volume / "token")),
    )
    assert read(mount.path / "demo-secret") == b"first"
    assert {a["sub"] for a in assertions} == {WORKLOAD_SUBJECT}
    project(emu.identity.mint_sa_token("default", "second"), "..2026_01_01_01_00_00.2")
    wait_until(lambda: any(a["sub"] == second for a in assertions), timeout=10)
    subjects = [a["sub"] for a in assertions]
    assert subjects[subjects.index(second):] == [second] * (len(subjects) - subjects.index(second))
    emu.set_secret("demo", "demo-secret", "second")
    wait_until(lambda: read(mount.path / "demo-secret") == b"second", timeout=10)
    assert unauthenticated(emu) == 0
    assert " WARNING " not in mount.log()
