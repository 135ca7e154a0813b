"""The identity preflight through the real plugin and the real daemon (issue 11): a definitive
identity or endpoint mistake fails NodePublishVolume with the service's code and the fix in the
gRPC status (kubelet shows it as the pod event `MountVolume.SetUp failed ...`) and leaves nothing
behind; an outage does not fail it, and the first read works once the service is back.

PERMISSION_DENIED: the identity was refused. FAILED_PRECONDITION: a host name that does not exist,
a certificate that is not trusted. Both are final for kubelet, which retries the publish later.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from csi_harness import FUSE_OK, Kubelet, PluginProcess, tokens_json, wait_for
from kvfs.csi.mountinfo import is_kvfs_mount
from kvfs.csi.state import StateStore
from kvfs.emulator.server import Emulator, EmulatorThread
from loopback import UntrustedTLS

pytestmark = [pytest.mark.mount, pytest.mark.skipif(not FUSE_OK, reason="needs root and /dev/fuse")]

REAL_DAEMON = "kvfs.daemon.entry:run_volume"
VALUE = "preflight through CSI"


@dataclass
class Node:
    emu: Emulator
    plugin: PluginProcess
    base: Path
    clouds: Path  # the plugin's --cloud-env-dir
    untrusted: UntrustedTLS

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
    try:
        with EmulatorThread(base / "emulator") as emu:
            emu.set_secret("demo", "demo-secret", VALUE)
            # inherited by the plugin, passed on to every daemon (kvfs.daemon.entry.DAEMON_ENV)
            env = dict(os.environ, SSL_CERT_FILE=str(emu.ca_file), AZURE_POD_IDENTITY_AUTHORITY_HOST=emu.imds_url)
            plugin = PluginProcess(
                daemon_entry=REAL_DAEMON,
                extra_args=("--cloud-env-dir", str(clouds), "--allow-node-identity", "--health-interval", "0"),
                env=env,
                kubelet_dir=str(base / "kubelet"),
                allow_inline_parameters=True,
            )
            plugin.start()
            try:
                yield Node(emu, plugin, base, clouds, untrusted)
            finally:
                plugin.close()
    finally:
        untrusted.close()
        shutil.rmtree(base, ignore_errors=True)


def objects() -> str:
    return yaml.safe_dump({"array": [yaml.safe_dump({"objectName": "demo-secret", "objectType": "secret"})]})


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
