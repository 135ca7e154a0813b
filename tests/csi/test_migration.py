"""Issue 12 end to end: what a team moving from the upstream driver + Azure provider relies on.

kubelet's calls over the plugin's socket, the REAL per-volume daemon against the emulator over
HTTPS, and the fake Kubernetes API: upstream's node-wide provider flags on `kvfs csi node`.
One in-process plugin (so tests can run its watcher rounds themselves) with its own mounter serves
the module.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

import certgen
from csi_harness import FUSE_OK, Kubelet, _kill_leftover_daemons, _stop_mounter, short_tmpdir, tokens_json, wait_for
from fakekube import FakeKube
from kvfs.config.model import RenderDefaults
from kvfs.emulator.server import Emulator, EmulatorThread

pytestmark = [pytest.mark.mount, pytest.mark.skipif(not FUSE_OK, reason="needs root and /dev/fuse")]

REAL_DAEMON = "kvfs.daemon.entry:run_volume"
VAULT = "migrate-vault"
# the node's flags in this module: upstream's AKS add-on split, and no chain construction
NODE_DEFAULTS = RenderDefaults(split_cert_key=True, construct_pem_chain=False)


def objects_yaml(*objects: dict[str, str]) -> str:
    """The upstream `objects` shape: a mapping with `array`, each item a YAML string."""
    return yaml.safe_dump({"array": [yaml.safe_dump(o, sort_keys=False) for o in objects]}, sort_keys=False)


@dataclass
class Pod:
    """One pod mounting one SecretProviderClass: who it is and what kubelet sends for it."""

    name: str
    namespace: str
    spc: str
    token: str = field(repr=False)
    uid: str = ""
    target: str = ""
    volume_id: str = ""

    def volume_context(self) -> dict[str, str]:
        return {
            "secretProviderClass": self.spc,
            "csi.storage.k8s.io/pod.name": self.name,
            "csi.storage.k8s.io/pod.namespace": self.namespace,
            "csi.storage.k8s.io/pod.uid": self.uid,
            "csi.storage.k8s.io/serviceAccount.name": "app",
            "csi.storage.k8s.io/ephemeral": "true",
            "csi.storage.k8s.io/serviceAccount.tokens": tokens_json(self.token),
        }


class World:
    """The emulator (one vault, one app federated to `app` in every namespace) and the fake API."""

    def __init__(self, emu: Emulator, kube: FakeKube, base: Path) -> None:
        self.emu = emu
        self.kube = kube
        self.base = base
        emu.add_vault(VAULT)
        self.app = emu.identity.add_app()
        emu.grant(VAULT, self.app.client_id)
        self.federated: set[str] = set()

    def parameters(self, *objects: dict[str, str], **extra: str) -> dict[str, str]:
        return {
            "tenantId": self.emu.tenant_id,
            "clientID": self.app.client_id,
            "keyvaultName": VAULT,
            "cloudName": "AzureStackCloud",
            "cloudEnvFileName": str(self.emu.cloud_env_file),
            "objects": objects_yaml(*objects),
            **extra,
        }

    def pod(self, namespace: str, name: str, spc: str) -> Pod:
        """A pod of `namespace` (its service account federated to the app) mounting `spc`."""
        if namespace not in self.federated:
            self.federated.add(namespace)
            self.emu.identity.add_federated_credential(
                self.app.client_id, issuer=self.emu.oidc_issuer, subject=f"system:serviceaccount:{namespace}:app"
            )
        token = self.emu.identity.mint_sa_token(namespace, "app", pod=name)
        pod = Pod(name, namespace, spc, token, uid=f"0c0ffee0-0000-4000-8000-{os.urandom(6).hex()}")
        pod.volume_id = f"csi-{os.urandom(8).hex()}"
        pod.target = str(Path(self.base, "kubelet", "pods", pod.uid, "volumes", "kubernetes.io~csi", "vol", "mount"))
        Path(pod.target).parent.mkdir(parents=True, exist_ok=True)
        return pod


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    if not FUSE_OK:
        pytest.skip("needs root and /dev/fuse")
    base = Path(tempfile.mkdtemp(prefix="kvfsmig-", dir="/tmp"))
    base.chmod(0o700)  # daemons read the CA and cloud env files before they drop privileges
    kube = FakeKube(base / "kube")
    try:
        with EmulatorThread(base / "emulator", vaults=()) as emu, pytest.MonkeyPatch.context() as mp:
            mp.setenv("SSL_CERT_FILE", str(emu.ca_file))  # passed on to the mounter and every daemon
            yield World(emu, kube, base)
    finally:
        kube.close()
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Node:
    """The in-process plugin (`volumes`), kubelet's side of its socket, and the world."""

    world: World
    volumes: Any
    kubelet: Kubelet

    def publish(self, pod: Pod) -> None:
        self.kubelet.publish(pod.volume_id, pod.target, pod.volume_context(), token=None, timeout=60)

    def unpublish(self, pod: Pod) -> None:
        self.kubelet.unpublish(pod.volume_id, pod.target)


@pytest.fixture(scope="module")
def node(world: World) -> Iterator[Node]:
    from kvfs.csi.node import serve
    from kvfs.csi.volumes import NodeConfig, Volumes

    state_dir = short_tmpdir()
    config = NodeConfig(
        node_id="node-1",
        state_dir=state_dir,
        daemon_entry=REAL_DAEMON,
        mounter_log=os.path.join(state_dir, "mounter.log"),
        kubelet_dir=str(world.base / "kubelet"),
        kubeconfig=str(world.kube.kubeconfig(world.base / "kubeconfig")),
        cloud_env_dir=str(world.emu.cloud_env_file.parent),
        publish_timeout=30.0,
        render_defaults=NODE_DEFAULTS,
    )
    volumes = Volumes(config)
    endpoint = f"unix://{state_dir}/csi.sock"
    server = serve(volumes, endpoint, workers=4)
    kubelet = Kubelet(endpoint, state_dir)
    try:
        yield Node(world, volumes, kubelet)
    finally:
        kubelet.cleanup()
        server.stop(grace=1).wait()
        _kill_leftover_daemons(state_dir)
        _stop_mounter(config.mounter_socket)
        shutil.rmtree(state_dir, ignore_errors=True)


def subjects(pem: bytes) -> list[str]:
    """The common names of the CERTIFICATE blocks of a PEM file, in file order."""
    return [c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value for c in x509.load_pem_x509_certificates(pem)]


# ---- node-wide provider flags ----------------------------------------------------------------


def test_node_wide_flags_set_the_files_of_volumes_whose_class_does_not(node: Node) -> None:
    world = node.world
    chain = certgen.make_chain(3, key_type="rsa")  # leaf, int1, root
    shuffled = [chain.leaf, chain.root, chain.certs[1]]  # a PFX whose bags are not in chain order
    world.emu.import_certificate(VAULT, "web", pfx=certgen.pfx(chain.leaf_key, shuffled), keep_value=True)
    web = {"objectName": "web", "objectType": "secret"}
    world.kube.add_spc("team-a", "follows-node", world.parameters(web))
    world.kube.add_spc(
        "team-a",
        "says-own",
        world.parameters(web, writeCertAndKeyInSeparateFiles="false", constructPEMChain="true"),
    )
    follows = world.pod("team-a", "follows", "follows-node")
    own = world.pod("team-a", "own", "says-own")
    node.publish(follows)
    node.publish(own)

    # the node's flags: .crt and .key beside the file, the PFX's certificates in bag order
    assert sorted(os.listdir(follows.target)) == ["..data", "web", "web.crt", "web.key"]
    combined = Path(follows.target, "web").read_bytes()
    assert subjects(combined) == ["leaf", "root", "int1"]
    assert Path(follows.target, "web.crt").read_bytes() == certgen.certs_pem(shuffled)
    assert Path(follows.target, "web.key").read_bytes() == certgen.key_pem(chain.leaf_key)
    # the class's own parameters win over the node's
    assert sorted(os.listdir(own.target)) == ["..data", "web"]
    assert subjects(Path(own.target, "web").read_bytes()) == ["leaf", "int1", "root"]
    node.unpublish(follows)
    node.unpublish(own)
