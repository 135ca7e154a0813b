"""`kvfs` as a user runs it: bad input gives one `kvfs: error:` line naming the field, the value
and the fix, exit status 2, never a traceback; help and docs list every option.

Each test starts `python -m kvfs` for real. Refusals happen before any network call, so no
emulator is needed; the mount tests use VM managed identity, which needs no network to mount.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guards import LogCheck
import kvfs

ROOT = Path(__file__).resolve().parent.parent
TENANT = "11111111-2222-3333-4444-555555555555"
CLIENT_SECRET = "S3cr3t-value-never-shown"
SPC = """\
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: demo
spec:
  provider: azure
  parameters:
    keyvaultName: demo
    objects: |
      array:
        - |
          objectName: demo-secret
          objectType: secret
"""


def kvfs_run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "KVFS_"))}
    base.pop("SSL_CERT_FILE", None)
    return subprocess.run(
        [sys.executable, "-m", "kvfs", *args],
        capture_output=True, text=True, timeout=30, env=base | (env or {}), cwd=cwd,
    )


def refused(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """The one error line of a refused command, after checking status, format and content."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "kvfs" in line and "error" in line]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def spc(tmp_path: Path) -> Path:
    path = tmp_path / "spc.yaml"
    path.write_text(SPC)
    return path


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


# ---- the mountpoint ------------------------------------------------------------------------


def test_missing_mountpoint_names_it_and_says_mkdir(spc: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "secrets"
    refused(kvfs_run("mount", "--spc", str(spc), str(missing)), "MOUNTPOINT", str(missing),
            "does not exist", f"mkdir -p {missing}")


def test_mountpoint_that_is_a_file(spc: Path) -> None:
    refused(kvfs_run("mount", "--spc", str(spc), str(spc)), "MOUNTPOINT", str(spc), "is not a directory")


def test_non_empty_mountpoint_is_refused(spc: Path, mnt: Path) -> None:
    (mnt / "keep-me.txt").write_text("x")
    try:
        refused(kvfs_run("mount", "--spc", str(spc), "--param", "useVMManagedIdentity=true", str(mnt)),
                "MOUNTPOINT", "is not empty", "keep-me.txt", "empty directory")
    finally:
        if mounted(mnt):  # a regression mounted over the file; leave no mount behind
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    assert (mnt / "keep-me.txt").read_text() == "x"


# ---- parameters and flags ------------------------------------------------------------------


def test_param_without_equals(spc: Path, mnt: Path) -> None:
    refused(kvfs_run("mount", "--spc", str(spc), "--param", "keyvaultName", str(mnt)),
            "--param", "'keyvaultName'", "KEY=VALUE")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--refresh-interval", "2 minutes"], ["--refresh-interval", "'2 minutes'", "is not a duration", "30s"]),
        # a separate "-5s" would otherwise be taken by argparse for an option
        (["--refresh-interval", "-5s"], ["--refresh-interval", "'-5s'", "must not be negative"]),
        (["--max-staleness", "-1"], ["--max-staleness", "'-1'", "must not be negative"]),
        (["--max-staleness=1x"], ["--max-staleness", "'1x'", "is not a duration"]),
    ],
)
def test_bad_durations(spc: Path, mnt: Path, args: list[str], fragments: list[str]) -> None:
    refused(kvfs_run("mount", "--spc", str(spc), *args, str(mnt)), *fragments)


def test_yaml_that_is_not_a_secretproviderclass(tmp_path: Path, mnt: Path) -> None:
    other = tmp_path / "cm.yaml"
    other.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    refused(kvfs_run("mount", "--spc", str(other), str(mnt)), str(other), "no SecretProviderClass",
            "ConfigMap", "kind: SecretProviderClass")


def test_secrets_file_with_a_misspelt_key_says_which_to_rename(spc: Path, mnt: Path, tmp_path: Path) -> None:
    secrets = tmp_path / "sp.yaml"
    secrets.write_text(f"clientid: app\nclient_secret: {CLIENT_SECRET}\n")
    secrets.chmod(0o600)
    line = refused(
        kvfs_run("mount", "--spc", str(spc), "--param", f"tenantID={TENANT}", "--secrets", str(secrets), str(mnt)),
        "could not find clientsecret", "--secrets file", "rename client_secret to clientsecret",
    )
    assert CLIENT_SECRET not in line


def test_unknown_cloud_name(spc: Path, mnt: Path) -> None:
    refused(kvfs_run("mount", "--spc", str(spc), "--param", "cloudName=Mars", str(mnt)),
            "cloudName", "Mars", "AzurePublicCloud", "AzureStackCloud")


def test_missing_cloud_env_file(spc: Path, mnt: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-env.json"
    refused(
        kvfs_run("mount", "--spc", str(spc), "--param", "cloudName=AzureStackCloud",
                 "--param", f"cloudEnvFileName={missing}", str(mnt)),
        "cloudName AzureStackCloud", str(missing), "no such file", "keyVaultDNSSuffix",
    )


def test_ssl_cert_file_pointing_nowhere(spc: Path, mnt: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-ca.pem"
    result = kvfs_run("mount", "--spc", str(spc), "--param", "useVMManagedIdentity=true", str(mnt),
                      env={"SSL_CERT_FILE": str(missing)})
    refused(result, "SSL_CERT_FILE", str(missing), "PEM file")


def test_workload_identity_without_the_token_file(spc: Path, mnt: Path, tmp_path: Path) -> None:
    missing = tmp_path / "sa-token"
    refused(
        kvfs_run("mount", "--spc", str(spc), "--param", f"tenantID={TENANT}", "--param", "clientID=00000000-0000-0000-0000-0000000000a1", str(mnt),
                 env={"AZURE_FEDERATED_TOKEN_FILE": str(missing)}),
        "AZURE_FEDERATED_TOKEN_FILE", str(missing), "no such file", "export AZURE_FEDERATED_TOKEN_FILE=",
    )


def test_log_level_is_accepted_after_mount_too(tmp_path: Path, mnt: Path) -> None:
    missing = tmp_path / "missing.yaml"
    for args in (["mount", "--log-level", "debug"], ["--log-level", "debug", "mount"]):
        refused(kvfs_run(*args, "--spc", str(missing), str(mnt)), str(missing), "not found", "--spc")


# ---- real mounts: signals and a dead mount ---------------------------------------------------

needs_fuse = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="needs root, /dev/fuse and fusermount3",
)


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as mounts:
        return any(line.split()[4] == str(path) for line in mounts)


def start_mount(spc: Path, mnt: Path, tmp_path: Path) -> subprocess.Popen[bytes]:
    # VM managed identity mounts without any network call; nothing is read here.
    process = subprocess.Popen(
        [sys.executable, "-m", "kvfs", "mount", "--spc", str(spc), "--param", "useVMManagedIdentity=true", str(mnt)],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "mount.log", "wb"),
    )
    deadline = time.monotonic() + 20
    while not mounted(mnt):
        assert process.poll() is None, (tmp_path / "mount.log").read_text()
        if time.monotonic() > deadline:
            pytest.fail("mount did not appear")
        time.sleep(0.05)
    return process


@needs_fuse
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_unmounts_cleanly(
    spc: Path, mnt: Path, tmp_path: Path, signum: signal.Signals, checklogs: LogCheck
) -> None:
    process = start_mount(spc, mnt, tmp_path)
    try:
        with open("/proc/self/mountinfo") as mounts:
            assert any(line.split()[4] == str(mnt) and " fuse.kvfs " in line for line in mounts)
        assert sorted(os.listdir(mnt)) == ["..data", "demo-secret"]
        process.send_signal(signum)
        assert process.wait(timeout=20) == 0
        assert not mounted(mnt)
        checklogs.check_output((tmp_path / "mount.log").read_text(), "kvfs mount")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


@needs_fuse
def test_dead_mount_left_by_a_killed_process_is_named(spc: Path, mnt: Path, tmp_path: Path) -> None:
    process = start_mount(spc, mnt, tmp_path)
    try:
        process.kill()
        process.wait()
        assert mounted(mnt)  # the kernel keeps the mount; its files answer ENOTCONN
        refused(kvfs_run("mount", "--spc", str(spc), str(mnt)), "MOUNTPOINT", "dead FUSE mount",
                f"fusermount3 -u {mnt}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)
    assert not mounted(mnt)


# ---- version, help and docs ------------------------------------------------------------------


def test_version() -> None:
    result = kvfs_run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"kvfs {kvfs.__version__}"


def options_of(*command: str) -> set[str]:
    result = kvfs_run(*command, "--help")
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", result.stdout)) - {"--help"}


def test_every_mount_option_is_in_the_readme() -> None:
    options = options_of("mount")
    assert {"--spc", "--param", "--secrets", "--refresh-interval"} <= options
    readme = (ROOT / "README.md").read_text()
    assert not [option for option in options if f"`{option}" not in readme]


def test_every_emulator_option_is_in_emulator_md() -> None:
    options = options_of("emulator")
    assert "--dir" in options
    doc = (ROOT / "docs" / "EMULATOR.md").read_text()
    assert not [option for option in options if f"`{option}" not in doc]


def test_readme_mount_options_exist() -> None:
    """The README's `kvfs mount` lines use only options `kvfs mount --help` knows."""
    readme = (ROOT / "README.md").read_text()
    used = set()
    for line in re.findall(r"^kvfs mount .*(?:\n  .*)*", readme, flags=re.MULTILINE):
        used |= set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", line))
    assert used and used <= options_of("mount")
