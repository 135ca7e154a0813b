"""`kvfs` as a user runs it: bad input gives one `kvfs: error:` line naming the field, the value
and the fix, exit status 2, never a traceback; help and docs list every option.

Each test starts `python -m kvfs` for real (the help-width test formats every parser in-process,
at two terminal widths). Refusals happen before any network call, so no
emulator is needed; the mount tests use VM managed identity, which needs no network to mount.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from guards import LogCheck
import kvfs
from kvfs.cli import build_parser

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
    ("key", "meant", "where"),
    [
        ("keyVaultName", "keyvaultName", "the manifest sets"),  # the manifest's own key, wrong case
        ("TenantID", "tenantID or tenantId", "kvfs reads"),  # a parameter the manifest leaves out
    ],
)
def test_param_in_the_wrong_case_is_refused_not_ignored(spc: Path, mnt: Path, key: str, meant: str, where: str) -> None:
    line = refused(kvfs_run("mount", "--spc", str(spc), "--param", f"{key}=other-vault", str(mnt)),
                   "--param", f"'{key}=...'", "case-sensitive", where, f"did you mean {meant}?")
    assert "other-vault" not in line  # the key is named, not the value


def test_param_naming_an_objects_field_is_taken_with_a_warning(spc: Path, mnt: Path) -> None:
    result = kvfs_run("mount", "--spc", str(spc), "--param", "objectVersionHistory=other-vault",
                      "--param", "keyvaultName=not.a.vault", str(mnt))
    refused(result, 'Invalid vault name: "not.a.vault"')  # the rest was parsed: the field did not stop it
    assert "--param objectVersionHistory=...: neither a parameter" in result.stderr
    assert "objectVersionHistory is a field of one object, not a parameter" in result.stderr
    assert "other-vault" not in result.stderr


def test_param_in_the_right_case_overlays_the_manifest(spc: Path, mnt: Path) -> None:
    # the overlaid name reaches validation (and the manifest's valid "demo" is not used)
    refused(kvfs_run("mount", "--spc", str(spc), "--param", "keyvaultName=not.a.vault", str(mnt)),
            'Invalid vault name: "not.a.vault"')


def test_object_key_in_the_wrong_case_is_named(tmp_path: Path, mnt: Path) -> None:
    manifest = tmp_path / "typo.yaml"
    manifest.write_text(SPC.replace("objectName: demo-secret", "objectname: demo-secret"))
    line = refused(kvfs_run("mount", "--spc", str(manifest), str(mnt)),
                   "index 0", "unknown field objectname", "did you mean objectName?")
    assert "must not be empty" not in line


@pytest.mark.parametrize(
    "args",
    [
        ["--refresh-interval", "5", "minutes", "MNT"],  # "minutes" is taken for MOUNTPOINT, MNT left over
        ["MNT", "--refresh-interval", "5", "minutes"],
        ["--max-staleness=2", "h", "MNT"],
        ["--max-staleness", "500", "ms", "MNT"],
    ],
)
def test_duration_written_as_two_words_shows_the_mount_usage_and_the_fix(spc: Path, mnt: Path, args: list[str]) -> None:
    args = [str(mnt) if arg == "MNT" else arg for arg in args]
    result = kvfs_run("mount", "--spc", str(spc), *args)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: kvfs mount "), result.stderr
    unit = {"minutes": "m", "h": "h", "ms": "ms"}[next(arg for arg in args if arg in ("minutes", "h", "ms"))]
    assert re.search(rf"kvfs mount: error: --\S+ \d+ \w+: a duration is one word: --\S+ \d+{unit} ", result.stderr)
    assert not mounted(mnt)


def test_leftover_arguments_show_the_command_usage(spc: Path, mnt: Path) -> None:
    result = kvfs_run("mount", "--spc", str(spc), str(mnt), "extra")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: kvfs mount ")
    assert "kvfs mount: error: unrecognized arguments: extra" in result.stderr


@pytest.mark.parametrize(
    ("env", "args", "fragment"),
    [
        ({"KVFS_LOG_FORMAT": "xml"}, [], "'xml' (from $KVFS_LOG_FORMAT) is not a log format: use one of text, json"),
        ({}, ["--log-format", "yaml"], "'yaml' is not a log format"),
        ({"KVFS_LOG_LEVEL": "loud"}, [], "'loud' (from $KVFS_LOG_LEVEL) is not a log level"),
    ],
)
def test_bad_log_settings_are_named(spc: Path, mnt: Path, env: dict[str, str], args: list[str], fragment: str) -> None:
    result = kvfs_run("mount", *args, "--spc", str(spc), str(mnt), env=env)
    assert result.returncode == 2 and fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


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
    # VM managed identity without the identity preflight mounts without any network call; nothing is read here.
    process = subprocess.Popen(
        [sys.executable, "-m", "kvfs", "mount", "--spc", str(spc), "--param", "useVMManagedIdentity=true",
         "--no-preflight", str(mnt)],  # fmt: skip
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
def test_dead_mount_left_by_a_killed_process_is_named_with_the_fix(spc: Path, mnt: Path, tmp_path: Path) -> None:
    """`kvfs mount` and `kvfs status` on it both name the command that cleans it up."""
    process = start_mount(spc, mnt, tmp_path)
    try:
        process.kill()
        process.wait()
        assert mounted(mnt)  # the kernel keeps the mount; its files answer ENOTCONN
        refused(kvfs_run("mount", "--spc", str(spc), str(mnt)), "MOUNTPOINT", "dead FUSE mount",
                f"fusermount3 -u {mnt}")
        status = kvfs_run("status", "mnt", cwd=tmp_path)  # as the user typed it
        assert status.returncode == 1 and "Traceback" not in status.stderr, status.stderr
        assert ("kvfs status: mnt: a dead mount: the process that served it is gone"
                " (statfs: Transport endpoint is not connected); unmount it with fusermount3 -u mnt"
                " (as root, umount mnt works too), then mount again") in status.stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)
    assert not mounted(mnt)


# ---- version, help and docs ------------------------------------------------------------------


def test_version_names_python_pyfuse3_and_libfuse() -> None:
    result = kvfs_run("--version")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[:3] == [f"kvfs {kvfs.__version__}", f"Python {platform.python_version()}",
                         f"pyfuse3 {metadata.version('pyfuse3')}"]
    assert re.fullmatch(r"libfuse 3\.\d+(\.\d+)?", lines[3]), lines
    if shutil.which("pkg-config"):  # the headers pyfuse3 was built against name the same release
        built = subprocess.run(["pkg-config", "--modversion", "fuse3"], capture_output=True, text=True)
        if built.returncode == 0:
            assert lines[3] == f"libfuse {built.stdout.strip()}"


def test_commands_start_without_importing_pyfuse3(spc: Path, mnt: Path) -> None:
    """Only a mount needs pyfuse3; `--version`, help and refusals stay quick."""
    probe = (
        "import sys\nfrom kvfs.cli import main\n"
        "for argv in (['--version'], ['csi', 'node', '--help'], ['mount', '--spc', sys.argv[1], '--param', 'x=1',"
        " '--param', 'keyvaultName=a.b', sys.argv[2]]):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('pyfuse3' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(spc), str(mnt)], capture_output=True, text=True, timeout=30)
    assert result.stdout.strip().splitlines()[-1] == "False", result.stdout + result.stderr


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


def help_of(*command: str) -> str:
    result = kvfs_run(*command, "--help")
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("command", [["csi"], ["csi", "node"], ["csi", "mounter"]])
def test_csi_help_has_a_description_readable_metavars_and_log_choices(command: list[str]) -> None:
    text = help_of(*command)
    description = text.split("\n\n")[1]
    assert not description.startswith(("options:", "positional arguments:")) and len(description) > 60, text
    if command == ["csi"]:
        assert "node" in text and "mounter" in text
        return
    # argparse's raw metavars are the option's name upper-cased: STATE_DIR, NODE_ID, ...
    metavars = re.findall(r"(?m)^  (--[a-z-]+) ([^\s,]+)", text)
    assert metavars, text
    raw = [(option, metavar) for option, metavar in metavars if metavar == option[2:].upper().replace("-", "_")]
    assert not raw, raw
    assert "--state-dir DIR" in text and "--daemon-entry MODULE:FUNCTION" in text
    assert "--log-level {DEBUG,INFO,WARNING,ERROR}" in text and "--log-format {text,json}" in text
    if command == ["csi", "node"]:
        for shown in ("--metrics-addr HOST:PORT", "--daemon-uid-range START-END", "--publish-timeout SECONDS",
                      "--kubeconfig FILE", "--node-id NAME"):
            assert shown in text


def every_command(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """`kvfs` and each of its subcommands, however deep, with its parser."""
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from every_command(sub, (*words, name))


@pytest.mark.parametrize("columns", ["80", "200"])
def test_every_help_line_fits_in_100_columns(monkeypatch: pytest.MonkeyPatch, columns: str) -> None:
    """Descriptions are refilled to the terminal (at most 100 columns); epilogs' examples and
    tables, kept as written, must fit too."""
    monkeypatch.setenv("COLUMNS", columns)
    commands = dict(every_command(build_parser()))
    assert {("mount",), ("status",), ("emulator",), ("csi", "node"), ("csi", "mounter"), ("csi", "status")} <= set(commands)
    too_long = [
        (" ".join(("kvfs", *words)), line)
        for words, parser in commands.items()
        for line in parser.format_help().splitlines()
        if len(line) > 100
    ]
    assert not too_long, too_long


def test_fusermount_for_a_killed_mount_is_in_mount_help_and_readme() -> None:
    assert "fusermount3 -u MOUNTPOINT" in help_of("mount")
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"fusermount3 -u \S+", readme) and "killed" in readme


def test_emulator_logs_json_lines_too(tmp_path: Path) -> None:
    folder = tmp_path / "emu"
    with open(tmp_path / "emu.log", "wb") as log:  # stdout holds the human banner, stderr the log
        process = subprocess.Popen([sys.executable, "-m", "kvfs", "emulator", "--dir", str(folder), "--log-format", "json"],
                                   stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while not (folder / "emulator.json").exists():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "emu.log").read_text()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    entries = [json.loads(line) for line in (tmp_path / "emu.log").read_text().splitlines()]
    assert any(e["logger"].startswith("kvfs.emulator") and "serving" in e["message"] for e in entries), entries
