"""`kvfs mount`'s identity preflight against the emulator: identity mistakes fail the mount with the
service's code and the fix; outages do not, and the volume reads once the service is back.

Each definitive class (issue 11): unknown app or tenant, no matching federated credential, wrong
client secret, IMDS identity not assigned, a vault host that does not resolve, a TLS certificate
that is not trusted (Entra ID's and the vault's). Transient: Entra ID answering 503, the whole
emulator stopped. The same refusals through the CSI plugin: tests/csi/test_operability.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from guards import LogCheck
from e2e.conftest import Mounter, is_mounted, needs_fuse, read, spc_manifest, wait_until, workload_parameters
from kvfs.emulator.server import Emulator, EmulatorThread
from loopback import UntrustedTLS

pytestmark = [needs_fuse, pytest.mark.mount]

SECRET = {"objectName": "demo-secret", "objectType": "secret"}
VALUE = "preflight value"


@dataclass
class Attempt:
    """One `kvfs mount` run to completion: its exit status and output."""

    returncode: int
    stderr: str
    mountpoint: Path


def mount_once(emu: Emulator, tmp_path: Path, params: dict[str, str], *args: str, env: dict[str, str]) -> Attempt:
    """`kvfs mount` that is expected to stop by itself (refused); a mount that stays is unmounted."""
    spc = tmp_path / f"spc-{uuid.uuid4().hex[:8]}.yaml"
    spc.write_text(spc_manifest(params))
    mountpoint = tmp_path / f"mnt-{uuid.uuid4().hex[:8]}"
    mountpoint.mkdir()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "kvfs", "mount", "--spc", str(spc), str(mountpoint), *args],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
    finally:
        if is_mounted(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    return Attempt(result.returncode, result.stderr, mountpoint)


def cloud_env(emu: Emulator, path: Path, **changes: str) -> str:
    values = json.loads(emu.cloud_env_file.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))
    return str(path)


@dataclass
class Case:
    """How to get one refusal: the mount's parameters, arguments and environment."""

    params: dict[str, str]
    code: str  # in the message
    fix: str  # in the message too
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)  # changes to the mount's environment ("" removes)
    presented: tuple[str, ...] = ()  # values the message names


def _unfederated(emu: Emulator, tmp_path: Path) -> Case:
    app = emu.identity.add_app()  # no federated credential for the emulator's service account
    emu.grant("demo", app.client_id)
    return Case(workload_parameters(emu, SECRET, clientID=app.client_id), "AADSTS70021",
                "az ad app federated-credential create", presented=(app.client_id, "system:serviceaccount:"))


def _unknown_app(emu: Emulator, tmp_path: Path) -> Case:
    unknown = str(uuid.uuid4())
    return Case(workload_parameters(emu, SECRET, clientID=unknown), "AADSTS700016",
                "set clientID to the identity's client (application) id", presented=(unknown,))


def _unknown_tenant(emu: Emulator, tmp_path: Path) -> Case:
    tenant = str(uuid.uuid4())
    return Case(workload_parameters(emu, SECRET, tenantId=tenant), "AADSTS90002",
                "set tenantID to the directory (tenant) id", presented=(tenant,))


def _wrong_secret(emu: Emulator, tmp_path: Path) -> Case:
    app = emu.identity.default_app
    secrets = tmp_path / "sp.yaml"
    secrets.write_text(yaml.safe_dump({"clientid": app.client_id, "clientsecret": "not-" + uuid.uuid4().hex}))
    params = workload_parameters(emu, SECRET)
    del params["clientID"]
    return Case(params, "AADSTS7000215", "must be the secret's Value, not its Secret ID",
                args=("--secrets", str(secrets)), env={"AZURE_FEDERATED_TOKEN_FILE": ""})


def _imds_not_assigned(emu: Emulator, tmp_path: Path) -> Case:
    unknown = str(uuid.uuid4())
    params = workload_parameters(emu, SECRET, useVMManagedIdentity="true", userAssignedIdentityID=unknown)
    del params["clientID"]
    return Case(params, "imds_identity_not_found", "set userAssignedIdentityID to the client id of an identity",
                env={"AZURE_POD_IDENTITY_AUTHORITY_HOST": emu.imds_url, "AZURE_FEDERATED_TOKEN_FILE": ""},
                presented=(unknown,))


def _vault_not_found(emu: Emulator, tmp_path: Path) -> Case:
    try:
        socket.getaddrinfo("demo.vault.invalid", 443)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:
            pytest.skip("this machine's resolver cannot say that a name does not exist (EAI_AGAIN)")
    env_file = cloud_env(emu, tmp_path / "cloud-invalid.json", keyVaultDNSSuffix="vault.invalid")
    return Case(workload_parameters(emu, SECRET, cloudEnvFileName=env_file), "DNSNotFound",
                "check keyvaultName", presented=("demo.vault.invalid",))


def _entra_untrusted(emu: Emulator, tmp_path: Path) -> Case:
    return Case(workload_parameters(emu, SECRET), "TLSVerifyFailed", "SSL_CERT_FILE",
                env={"SSL_CERT_FILE": ""}, presented=(emu.authority_host,))


CASES: dict[str, Callable[[Emulator, Path], Case]] = {
    "unfederated-client": _unfederated,
    "unknown-app": _unknown_app,
    "unknown-tenant": _unknown_tenant,
    "wrong-client-secret": _wrong_secret,
    "imds-identity-not-assigned": _imds_not_assigned,
    "vault-host-does-not-exist": _vault_not_found,
    "entra-certificate-untrusted": _entra_untrusted,
}


def environment(mounter: Mounter, changes: dict[str, str]) -> dict[str, str]:
    env = mounter.env()
    for name, value in changes.items():
        if value:
            env[name] = value
        else:
            env.pop(name, None)
    return env


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_a_definitive_failure_fails_the_mount_with_the_code_and_the_fix(
    emu: Emulator, mounter: Mounter, tmp_path: Path, case: str
) -> None:
    emu.set_secret("demo", "demo-secret", VALUE)
    c = CASES[case](emu, tmp_path)
    emu.reset_counts()
    attempt = mount_once(emu, tmp_path, c.params, *c.args, env=environment(mounter, c.env))
    assert attempt.returncode == 1, attempt.stderr
    [error] = [line for line in attempt.stderr.splitlines() if line.startswith("kvfs: error: ")]
    assert f"({c.code})" in error and c.fix in error, error
    for value in c.presented:
        assert value in error, f"{value!r} missing from {error}"
    assert "Traceback" not in attempt.stderr and "eyJ" not in attempt.stderr
    assert not is_mounted(attempt.mountpoint) and list(attempt.mountpoint.iterdir()) == []
    assert emu.count(route="get_secret") == 0  # no Key Vault object is fetched at mount
    # --no-preflight mounts anyway: the same mistake then shows on read
    mount = mounter.start(c.params, *c.args, "--no-preflight", env=environment(mounter, c.env))
    with pytest.raises(OSError):
        read(mount.path / "demo-secret")


def test_an_untrusted_vault_certificate_fails_the_mount(emu: Emulator, mounter: Mounter, tmp_path: Path) -> None:
    """Entra ID is the emulator (trusted); the vault host is a server whose certificate is not."""
    server = UntrustedTLS()
    try:
        env_file = cloud_env(emu, tmp_path / "cloud-untrusted.json", keyVaultDNSSuffix=f"vault.localhost:{server.port}")
        attempt = mount_once(emu, tmp_path, workload_parameters(emu, SECRET, cloudEnvFileName=env_file),
                             env=mounter.env())  # fmt: skip
    finally:
        server.close()
    assert attempt.returncode == 1, attempt.stderr
    assert "(TLSVerifyFailed): the TLS certificate of demo.vault.localhost is not trusted" in attempt.stderr
    assert server.handshakes >= 1  # a TLS handshake, no request: the certificate was refused first


def test_a_good_identity_exchanges_its_token_at_mount_and_not_again_at_the_first_read(
    emu: Emulator, mounter: Mounter
) -> None:
    emu.set_secret("demo", "demo-secret", VALUE)
    emu.reset_counts()
    mount = mounter.start(workload_parameters(emu, SECRET))
    assert emu.count(route="token") == 1 and emu.count(vault="demo") == 0  # the vault host got no object request
    assert read(mount.path / "demo-secret") == VALUE.encode()
    assert emu.count(route="token") == 1 and emu.count(route="get_secret") == 1


def test_no_preflight_makes_no_request_at_mount(emu: Emulator, mounter: Mounter) -> None:
    emu.set_secret("demo", "demo-secret", VALUE)
    emu.reset_counts()
    mount = mounter.start(workload_parameters(emu, SECRET), "--no-preflight")
    assert emu.count() == 0
    assert read(mount.path / "demo-secret") == VALUE.encode()
    assert emu.count(route="token") == 1


def test_with_entra_id_down_the_mount_succeeds_and_the_first_read_works_once_it_is_back(
    emu: Emulator, mounter: Mounter
) -> None:
    emu.set_secret("demo", "demo-secret", VALUE)
    emu.faults.entra_outage(True)  # 503 AADSTS90033 on every token request
    emu.reset_counts()
    mount = mounter.start(workload_parameters(emu, SECRET))
    assert emu.count(route="token") >= 1  # it tried, was told to come back later, and mounted
    assert "preflight could not finish" in mount.log()
    emu.faults.entra_outage(False)
    assert read(mount.path / "demo-secret") == VALUE.encode()  # the first read after the outage


def test_with_the_emulator_stopped_the_mount_succeeds_and_reads_once_it_is_back(
    tmp_path: Path, checklogs: LogCheck
) -> None:
    """Entra ID and Key Vault refusing connections (nothing listens): transient, the volume mounts.
    The emulator comes back on the same folder, so the same port, CA and identities."""
    folder = tmp_path / "emulator"
    with EmulatorThread(folder) as emu:
        emu.set_secret("demo", "demo-secret", VALUE)
        params = workload_parameters(emu, SECRET)
        mounter = Mounter(emu, tmp_path, checklogs)
    try:
        mount = mounter.start(params)
        assert "preflight could not finish" in mount.log()
        with EmulatorThread(folder):
            wait_until(lambda: readable(mount.path / "demo-secret") == VALUE.encode(), timeout=60, interval=0.2)
            mount.stop()
    finally:
        mounter.close()


def readable(path: Path) -> bytes | None:
    try:
        return read(path)
    except OSError:
        return None
