"""Issue 11 through the real plugin, the real daemons and the emulator, on one node.

- The identity preflight: a definitive identity or endpoint mistake fails NodePublishVolume with
  the service's code and the fix in the gRPC status (kubelet shows it as the pod event
  `MountVolume.SetUp failed ...`) and leaves nothing behind; an outage does not fail it, and the
  first read works once the service is back. PERMISSION_DENIED: the identity was refused.
  FAILED_PRECONDITION: a host name that does not exist, a certificate that is not trusted. Both
  are final for kubelet, which retries the publish later.
- Metrics: the plugin's scrape sums its daemons' counters, moves by exactly what readers did,
  keeps its sums when a daemon does not answer or goes away, and no label names a pod or object.
- Pod events: a read that fails posts one Warning event on the pod (in the fake API server), and
  a hundred more reads within 10 minutes post no more.
- `kvfs status TARGET --state-dir DIR` on the node: the pod, each object's version and last error.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from csi_harness import FUSE_OK, Kubelet, PluginProcess, tokens_json, wait_for
from fakekube import FakeKube
from kvfs.csi.mountinfo import is_kvfs_mount
from kvfs.csi.state import StateStore
from kvfs.daemon.metrics import CODES, KINDS, READ_RESULTS, REFRESH_RESULTS, TOKEN_RESULTS, VOLUME_STATES
from kvfs.emulator.server import Emulator, EmulatorThread
from loopback import UntrustedTLS
from scrape import REQUIRED, families, label_values, moved, scrape

pytestmark = [pytest.mark.mount, pytest.mark.skipif(not FUSE_OK, reason="needs root and /dev/fuse")]

REAL_DAEMON = "kvfs.daemon.entry:run_volume"
ALLOWED_LABEL_VALUES = {*CODES, *KINDS, *READ_RESULTS, *REFRESH_RESULTS, *TOKEN_RESULTS, *VOLUME_STATES, "republished"}
VALUE = "preflight through CSI"


@dataclass
class Node:
    emu: Emulator
    plugin: PluginProcess
    base: Path
    clouds: Path  # the plugin's --cloud-env-dir
    untrusted: UntrustedTLS
    metrics_url: str
    kube: FakeKube

    @property
    def kubelet(self) -> Kubelet:
        assert self.plugin.kubelet is not None
        return self.plugin.kubelet

    def cloud(self, name: str, **changes: str) -> str:
        """A cloud env file in the plugin's --cloud-env-dir: the emulator's, with `changes`."""
        values = json.loads(self.emu.cloud_env_file.read_text())
        values.update(changes)
        path = self.clouds / f"{name}.json"
        path.write_text(json.dumps(values))
        return str(path)


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    if not FUSE_OK:
        pytest.skip("needs root and /dev/fuse")
    base = Path(tempfile.mkdtemp(prefix="kvfspre-", dir="/tmp"))
    base.chmod(0o700)
    clouds = base / "clouds"
    clouds.mkdir()
    untrusted = UntrustedTLS()
    kube = FakeKube(base / "kube")
    try:
        with EmulatorThread(base / "emulator") as emu:
            emu.set_secret("demo", "demo-secret", VALUE)
            # inherited by the plugin, passed on to every daemon (kvfs.daemon.entry.DAEMON_ENV)
            env = dict(os.environ, SSL_CERT_FILE=str(emu.ca_file), AZURE_POD_IDENTITY_AUTHORITY_HOST=emu.imds_url)
            with socket.socket() as free:
                free.bind(("127.0.0.1", 0))
                metrics = f"127.0.0.1:{free.getsockname()[1]}"
            plugin = PluginProcess(
                daemon_entry=REAL_DAEMON,
                extra_args=(
                    "--cloud-env-dir", str(clouds), "--allow-node-identity", "--health-interval", "0",
                    "--metrics-addr", metrics, "--kubeconfig", str(kube.kubeconfig(base / "kubeconfig")),
                ),  # fmt: skip
                env=env,
                kubelet_dir=str(base / "kubelet"),
                allow_inline_parameters=True,
            )
            plugin.start()
            try:
                yield Node(emu, plugin, base, clouds, untrusted, f"http://{metrics}/metrics", kube)
            finally:
                plugin.close()
    finally:
        kube.close()
        untrusted.close()
        shutil.rmtree(base, ignore_errors=True)


def objects(*names: str) -> str:
    items = [yaml.safe_dump({"objectName": name, "objectType": "secret"}) for name in names or ("demo-secret",)]
    return yaml.safe_dump({"array": items})


def context(node: Node, namespace: str, **params: str) -> dict[str, str]:
    """What kubelet sends for a pod volume carrying its parameters inline, with its token."""
    emu = node.emu
    values = {
        "keyvaultName": "demo",
        "tenantId": emu.tenant_id,
        "cloudName": "AzureStackCloud",
        "cloudEnvFileName": node.cloud("emulator"),
        "objects": objects(),
        "csi.storage.k8s.io/pod.name": "web-0",
        "csi.storage.k8s.io/pod.namespace": namespace,
        "csi.storage.k8s.io/pod.uid": str(uuid.uuid4()),
        "csi.storage.k8s.io/serviceAccount.name": "web",
        "csi.storage.k8s.io/ephemeral": "true",
        "csi.storage.k8s.io/serviceAccount.tokens": tokens_json(emu.identity.mint_sa_token(namespace, "web")),
    }
    values.update(params)
    return {k: v for k, v in values.items() if v}


def federated_app(emu: Emulator, namespace: str) -> str:
    app = emu.identity.add_app()
    emu.identity.add_federated_credential(app.client_id, issuer=emu.oidc_issuer, subject=f"system:serviceaccount:{namespace}:web")
    emu.grant("demo", app.client_id)
    return app.client_id


@dataclass(frozen=True)
class Case:
    status: grpc.StatusCode
    code: str
    fix: str


def _unfederated(node: Node, ns: str) -> tuple[dict[str, str], dict[str, str]]:
    app = node.emu.identity.add_app()  # granted on the vault, but no federated credential
    node.emu.grant("demo", app.client_id)
    return context(node, ns, clientID=app.client_id), {}


def _unknown_tenant(node: Node, ns: str) -> tuple[dict[str, str], dict[str, str]]:
    return context(node, ns, clientID=federated_app(node.emu, ns), tenantId=str(uuid.uuid4())), {}


def _wrong_secret(node: Node, ns: str) -> tuple[dict[str, str], dict[str, str]]:
    app = node.emu.identity.default_app
    return context(node, ns), {"clientid": app.client_id, "clientsecret": "wrong-" + uuid.uuid4().hex}


def _imds_not_assigned(node: Node, ns: str) -> tuple[dict[str, str], dict[str, str]]:
    return context(node, ns, useVMManagedIdentity="true", userAssignedIdentityID=str(uuid.uuid4())), {}


def _vault_not_found(node: Node, ns: str) -> tuple[dict[str, str], dict[str, str]]:
    try:
        socket.getaddrinfo("demo.vault.invalid", 443)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:
            pytest.skip("this machine's resolver cannot say that a name does not exist (EAI_AGAIN)")
    cloud = node.cloud("invalid", keyVaultDNSSuffix="vault.invalid")
    return context(node, ns, clientID=federated_app(node.emu, ns), cloudEnvFileName=cloud), {}


def _vault_untrusted(node: Node, ns: str) -> tuple[dict[str, str], dict[str, str]]:
    cloud = node.cloud("untrusted", keyVaultDNSSuffix=f"vault.localhost:{node.untrusted.port}")
    return context(node, ns, clientID=federated_app(node.emu, ns), cloudEnvFileName=cloud), {}


CASES = {
    "unfederated-client": (_unfederated, Case(grpc.StatusCode.PERMISSION_DENIED, "AADSTS70021",
                                              "az ad app federated-credential create")),
    "unknown-tenant": (_unknown_tenant, Case(grpc.StatusCode.PERMISSION_DENIED, "AADSTS90002",
                                             "set tenantID to the directory (tenant) id")),
    "wrong-client-secret": (_wrong_secret, Case(grpc.StatusCode.PERMISSION_DENIED, "AADSTS7000215",
                                                "must be the secret's Value")),
    "imds-identity-not-assigned": (_imds_not_assigned, Case(grpc.StatusCode.PERMISSION_DENIED,
                                                            "imds_identity_not_found", "userAssignedIdentityID")),
    "vault-host-does-not-exist": (_vault_not_found, Case(grpc.StatusCode.FAILED_PRECONDITION, "DNSNotFound",
                                                         "check keyvaultName")),
    "vault-certificate-untrusted": (_vault_untrusted, Case(grpc.StatusCode.FAILED_PRECONDITION, "TLSVerifyFailed",
                                                           "SSL_CERT_FILE")),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_a_definitive_failure_fails_the_publish_with_the_code_and_the_fix(node: Node, name: str) -> None:
    make, case = CASES[name]
    ns = f"pre-{uuid.uuid4().hex[:8]}"
    params, secrets = make(node, ns)
    target = node.kubelet.target(node.base / "kubelet", ns)
    volume = f"csi-{uuid.uuid4().hex[:12]}"
    node.emu.reset_counts()
    with pytest.raises(grpc.RpcError) as info:
        # kubelet's own deadline is minutes; 5 s shows the refusal does not wait for a read or a retry
        node.kubelet.publish(volume, target, params, secrets, token=None, timeout=5)
    error: grpc.Call = info.value  # type: ignore[assignment]
    assert error.code() == case.status, error.details()
    details = error.details() or ""
    assert f"volume {volume}: " in details and f"({case.code})" in details and case.fix in details, details
    assert "eyJ" not in details and not any(v and v in details for v in secrets.values() if v.startswith("wrong-"))
    assert node.emu.count(route="get_secret") == 0  # no Key Vault object is fetched at mount
    # nothing stays: no mount, no state (so no daemon), at most the empty folder kubelet asked for
    assert not is_kvfs_mount(target) and (not os.path.exists(target) or os.listdir(target) == [])
    assert StateStore(node.kubelet.state_dir).load(target) is None


def test_with_entra_id_down_the_publish_succeeds_and_the_first_read_works_once_it_is_back(node: Node) -> None:
    ns = f"down-{uuid.uuid4().hex[:8]}"
    params = context(node, ns, clientID=federated_app(node.emu, ns))
    target = node.kubelet.target(node.base / "kubelet", ns)
    volume = f"csi-{uuid.uuid4().hex[:12]}"
    node.emu.faults.entra_outage(True)
    try:
        node.emu.reset_counts()
        node.kubelet.publish(volume, target, params, token=None)
        assert node.emu.count(route="token") >= 1  # tried, was told to come back later, and mounted
    finally:
        node.emu.faults.entra_outage(False)
    try:
        assert Path(target, "demo-secret").read_text() == VALUE  # the first read after the outage
    finally:
        node.kubelet.unpublish(volume, target)
    wait_for(lambda: not os.path.exists(target), 10, "the target to go")


# ---- metrics ---------------------------------------------------------------------------------------


def publish_pod(node: Node, *names: str, ns: str = "") -> tuple[str, str]:
    """A pod volume of its own namespace and identity with `names` as objects; (volume id, target)."""
    ns = ns or f"m-{uuid.uuid4().hex[:8]}"
    params = context(node, ns, clientID=federated_app(node.emu, ns), objects=objects(*names))
    target = node.kubelet.target(node.base / "kubelet", ns)
    volume = f"csi-{uuid.uuid4().hex[:12]}"
    node.kubelet.publish(volume, target, params, token=None)
    return volume, target


def test_a_scrape_sums_the_daemons_and_moves_by_exactly_what_readers_did(node: Node) -> None:
    node.emu.set_secret("demo", "db-password", "hunter2")
    before = scrape(node.metrics_url)
    pods = [publish_pod(node, "db-password", "missing") for _ in range(2)]
    published = scrape(node.metrics_url)
    assert moved(before, published) == {
        'kvfs_volumes{state="healthy"}': 2,
        'kvfs_publish_total{result="ok"}': 2,
        "kvfs_publish_duration_seconds_count{}": 2,
        'kvfs_token_requests_total{result="ok"}': 2,  # each daemon's preflight, kept for its first read
        'kvfs_keyvault_requests_total{code="4xx",kind="other"}': 2,  # the preflight's GET / (emulator: 404)
        "kvfs_keyvault_request_duration_seconds_count{}": 2,
    }
    for _, target in pods:
        assert Path(target, "db-password").read_text() == "hunter2"  # cold: one GET
        assert Path(target, "db-password").read_text() == "hunter2"  # cached: no request
        with pytest.raises(FileNotFoundError):
            Path(target, "missing").read_text()  # Key Vault says 404
    after = scrape(node.metrics_url)
    assert moved(published, after) == {
        'kvfs_reads_total{result="ok"}': 4,
        'kvfs_reads_total{result="enoent"}': 2,
        "kvfs_cache_hits_total{}": 2,
        'kvfs_keyvault_requests_total{code="2xx",kind="secret"}': 2,
        'kvfs_keyvault_requests_total{code="4xx",kind="secret"}': 2,
        "kvfs_keyvault_request_duration_seconds_count{}": 4,
    }
    assert set(REQUIRED) | {"kvfs_scrape_errors_total"} <= families(node.metrics_url)
    values = label_values(after)
    assert values <= ALLOWED_LABEL_VALUES | {code.lower() for code in grpc.StatusCode.__members__}
    assert not any(word in value for value in values for word in ("db-password", "missing", "m-", "web", "csi-"))

    # a daemon that does not answer counts with its last answer; one that goes away too
    stopped = StateStore(node.kubelet.state_dir).load(pods[0][1])
    assert stopped is not None
    os.kill(stopped.pid, signal.SIGSTOP)
    try:
        frozen = scrape(node.metrics_url)
    finally:
        os.kill(stopped.pid, signal.SIGCONT)
    assert moved(after, frozen) == {"kvfs_scrape_errors_total{}": 1}
    for volume, target in pods:
        node.kubelet.unpublish(volume, target)
    gone = scrape(node.metrics_url)
    assert moved(frozen, gone) == {'kvfs_volumes{state="healthy"}': -2}


# ---- pod events ------------------------------------------------------------------------------------


def test_a_missing_object_posts_one_pod_event_and_a_hundred_more_reads_post_no_more(node: Node) -> None:
    ns = f"ev-{uuid.uuid4().hex[:8]}"
    node.emu.set_secret("demo", "off-secret", "never shown")
    node.emu.set_enabled("demo", "secret", "off-secret", None, False)
    volume, target = publish_pod(node, "missing", "off-secret", ns=ns)
    try:

        def reasons() -> list[str]:
            return [e["reason"] for e in node.kube.events_for(ns, "web-0")]

        with pytest.raises(FileNotFoundError):
            Path(target, "missing").read_text()
        wait_for(lambda: reasons() == ["KeyVaultObjectNotFound"], 30, "the pod event")
        for _ in range(100):
            with pytest.raises(FileNotFoundError):
                Path(target, "missing").read_text()
        # a failure of another object: once its event is there, the watcher has seen all before it
        with pytest.raises(PermissionError):
            Path(target, "off-secret").read_text()
        wait_for(lambda: "KeyVaultForbidden" in reasons(), 30, "the second pod event")
        assert sorted(reasons()) == ["KeyVaultForbidden", "KeyVaultObjectNotFound"]
        [missing] = [e for e in node.kube.events_for(ns, "web-0") if e["reason"] == "KeyVaultObjectNotFound"]
        assert missing["type"] == "Warning" and missing["involvedObject"]["namespace"] == ns
        assert "reading missing (Key Vault secret/missing) failed with ENOENT (SecretNotFound)" in missing["message"]
        assert "Fix: create the object in the vault" in missing["message"]
        texts = json.dumps(node.kube.events_for(ns, "web-0"))
        assert "never shown" not in texts and "eyJ" not in texts
    finally:
        node.kubelet.unpublish(volume, target)


# ---- kvfs status -------------------------------------------------------------------------------------


def test_kvfs_status_on_a_target_path_shows_the_pod_the_versions_and_the_last_errors(node: Node) -> None:
    version = node.emu.set_secret("demo", "db-password", "hunter2")
    volume, target = publish_pod(node, "db-password", "missing")
    try:
        assert Path(target, "db-password").read_text() == "hunter2"
        with pytest.raises(FileNotFoundError):
            Path(target, "missing").read_text()

        def status(*args: str) -> str:
            shown = subprocess.run(
                [sys.executable, "-m", "kvfs", "status", "--state-dir", node.kubelet.state_dir, *args, target],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert shown.returncode == 0, shown.stderr
            return shown.stdout

        human = status()
        state = StateStore(node.kubelet.state_dir).load(target)
        assert state is not None
        assert human.startswith(f"CSI volume {volume}: served by pid {state.pid} from {node.emu.vault_url('demo')}")
        assert f"pod:      {state.pod_namespace}/web-0" in human
        assert f"db-password  secret/db-password  {version}" in human
        assert "  missing: " in human and "ENOENT SecretNotFound" in human
        answer = json.loads(status("--json"))
        assert answer["volume_id"] == volume and answer["pod"] == {"namespace": state.pod_namespace, "name": "web-0"}
        assert [o["version"] for o in answer["objects"]] == [version, None]
        assert "hunter2" not in human + json.dumps(answer)
    finally:
        node.kubelet.unpublish(volume, target)
