"""`kvfs mount` end to end: real FUSE mount, HTTPS to the emulator, workload identity."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from e2e.conftest import (
    Mounter,
    errno_of,
    is_mounted,
    needs_fuse,
    objects_yaml,
    read,
    read_during_rapid_rotations,
    rotation_content,
    spc_manifest,
    wait_until,
    workload_parameters,
)
from kvfs.emulator.server import Emulator

pytestmark = [needs_fuse, pytest.mark.mount]


def test_seed_example_reads_exact_bytes_with_workload_identity(emu: Emulator, mounter: Mounter) -> None:
    value = "s3cr3t ✓ with unicode\nand a trailing newline\n"
    emu.set_secret("demo", "demo-secret", value)
    mount = mounter.start(workload_parameters(emu, {"objectName": "demo-secret", "objectType": "secret"}))
    assert read(mount.path / "demo-secret") == value.encode()
    assert os.stat(mount.path / "demo-secret").st_size == len(value.encode())
    assert oct(os.stat(mount.path / "demo-secret").st_mode & 0o777) == oct(0o644)
    assert read(mount.path / "..data" / "demo-secret") == value.encode()
    with open("/proc/mounts") as mounts:
        assert any(f" {mount.path} fuse.kvfs " in line for line in mounts)
    assert mount.stop() == 0
    assert not is_mounted(mount.path)


def test_listing_twenty_and_reading_one_costs_one_get_and_one_exchange(emu: Emulator, mounter: Mounter) -> None:
    objects = []
    for i in range(20):
        emu.set_secret("demo", f"s{i}", f"value-{i}")
        objects.append({"objectName": f"s{i}", "objectType": "secret"})
    emu.reset_counts()
    mount = mounter.start(workload_parameters(emu, *objects))
    assert sorted(os.listdir(mount.path)) == sorted(["..data", *(f"s{i}" for i in range(20))])
    assert read(mount.path / "s7") == b"value-7"
    assert read(mount.path / "s7") == b"value-7"
    assert emu.count(route="get_secret") == 1
    assert emu.count(route="token") == 1
    # `stat` (as `ls -l` does) fetches the object it names, once.
    assert os.stat(mount.path / "s3").st_size == len(b"value-3")
    assert os.stat(mount.path / "..data" / "s3").st_size == len(b"value-3")
    assert emu.count(route="get_secret") == 2


def test_hundred_concurrent_cold_readers_cause_one_get(emu: Emulator, mounter: Mounter) -> None:
    emu.set_secret("demo", "cold", "x" * 5000)
    emu.faults.latency(0.3)  # keep the first request in flight while the others arrive
    mount = mounter.start(workload_parameters(emu, {"objectName": "cold", "objectType": "secret"}))
    emu.reset_counts()
    barrier = threading.Barrier(100)

    def reader(_: int) -> bytes:
        barrier.wait()
        return read(mount.path / "cold")

    with ThreadPoolExecutor(100) as pool:
        results = list(pool.map(reader, range(100)))
    assert results == [b"x" * 5000] * 100
    assert emu.count(route="get_secret") == 1


def test_rotation_pins_open_files_and_shows_new_version_to_new_opens(emu: Emulator, mounter: Mounter) -> None:
    emu.set_secret("demo", "rotating", "version one")
    mount = mounter.start(
        workload_parameters(emu, {"objectName": "rotating", "objectType": "secret"}), "--refresh-interval", "1s"
    )
    path = mount.path / "rotating"
    with open(path, "rb") as pinned:
        assert pinned.read(7) == b"version"
        emu.set_secret("demo", "rotating", "version two, longer than one")
        wait_until(lambda: read(path) == b"version two, longer than one", timeout=15)
        assert pinned.read() == b" one"  # the open file keeps its version
    assert read(mount.path / "..data" / "rotating") == b"version two, longer than one"
    assert os.stat(path).st_size == len(b"version two, longer than one")


def test_rapid_rotations_under_concurrent_readers_never_tear(emu: Emulator, mounter: Mounter) -> None:
    emu.set_secret("demo", "hot", rotation_content(0))
    mount = mounter.start(
        workload_parameters(emu, {"objectName": "hot", "objectType": "secret"}), "--refresh-interval", "0.05s"
    )
    seen, torn = read_during_rapid_rotations(emu, "hot", mount.path / "hot", readers=4)
    assert torn == []
    assert len({data[:7] for data in seen}) > 3, "the readers should have seen several versions"


def test_one_bad_object_does_not_fail_the_others(emu: Emulator, mounter: Mounter) -> None:
    emu.set_secret("demo", "good", "fine")
    emu.set_secret("demo", "off", "hidden")
    emu.set_enabled("demo", "secret", "off", None, False)
    mount = mounter.start(
        workload_parameters(
            emu,
            {"objectName": "good", "objectType": "secret"},
            {"objectName": "missing", "objectType": "secret"},
            {"objectName": "off", "objectType": "secret"},
        )
    )
    assert errno_of(mount.path / "missing") == errno.ENOENT
    assert errno_of(mount.path / "off") == errno.EACCES
    assert read(mount.path / "good") == b"fine"
    def warnings() -> list[str]:
        return [line for line in mount.log().splitlines() if " WARNING " in line and "SecretNotFound" in line]

    assert len(warnings()) == 1 and "missing" in warnings()[0]
    errno_of(mount.path / "missing")
    assert len(warnings()) == 1, "the first failure of an object is logged once"


def test_throttling_without_retry_after_is_retried(emu: Emulator, mounter: Mounter) -> None:
    emu.set_secret("demo", "busy", "eventually")
    mount = mounter.start(workload_parameters(emu, {"objectName": "busy", "objectType": "secret"}))
    emu.reset_counts()
    emu.faults.throttle(2)
    assert read(mount.path / "busy") == b"eventually"
    assert emu.count(route="get_secret") == 3


def test_federated_credential_mismatch_is_eacces_with_a_clear_log(emu: Emulator, mounter: Mounter, tmp_path: Path) -> None:
    emu.set_secret("demo", "demo-secret", "x")
    token_file = tmp_path / "wrong-sa-token"
    token_file.write_text(emu.identity.mint_sa_token("default", "someone-else") + "\n")
    mount = mounter.start(
        workload_parameters(emu, {"objectName": "demo-secret", "objectType": "secret"}),
        "--no-preflight",  # what a read answers when the identity breaks after mounting
        env=mounter.env(AZURE_FEDERATED_TOKEN_FILE=str(token_file)),
    )
    assert errno_of(mount.path / "demo-secret") == errno.EACCES
    log = mount.log()
    assert "AADSTS70021" in log
    assert "system:serviceaccount:default:someone-else" in log
    assert "api://AzureADTokenExchange" in log
    assert str(emu.info["oidc_issuer"]) in log


def test_version_pinning_and_history(emu: Emulator, mounter: Mounter) -> None:
    versions = [emu.set_secret("demo", "multi", f"value {i}") for i in range(5)]
    mount = mounter.start(
        workload_parameters(
            emu,
            {"objectName": "multi", "objectType": "secret", "objectVersion": versions[1], "objectAlias": "pinned"},
            {"objectName": "multi", "objectType": "secret", "objectVersionHistory": 3, "objectAlias": "hist"},
            {"objectName": "multi", "objectType": "secret", "objectVersionHistory": 3, "objectVersion": versions[2], "objectAlias": "older"},
        )
    )
    assert read(mount.path / "pinned") == b"value 1"
    assert sorted(os.listdir(mount.path / "hist")) == ["0", "1", "2"]  # exactly N, not N+1
    assert [read(mount.path / "hist" / str(i)) for i in range(3)] == [b"value 4", b"value 3", b"value 2"]
    assert [read(mount.path / "older" / str(i)) for i in range(3)] == [b"value 2", b"value 1", b"value 0"]
    emu.set_enabled("demo", "secret", "multi", versions[3], False)
    emu.set_secret("demo", "multi", "value 5")
    assert read(mount.path / "pinned") == b"value 1"


def test_a_class_without_objects_mounts_empty_and_says_so_once(emu: Emulator, mounter: Mounter) -> None:
    """Upstream mounts `objects: array: []` as an empty folder without a word; kvfs mounts it too, with one warning."""
    params = workload_parameters(emu)
    assert params["objects"] == "array: []\n"
    mount = mounter.start(params)
    assert os.listdir(mount.path) == ["..data"]  # upstream's layout: the files again, here none
    assert os.listdir(mount.path / "..data") == []
    assert mount.stop() == 0
    warnings = [line.split(" WARNING ", 1)[1] for line in mount.log().splitlines() if " WARNING " in line]
    assert warnings == [
        'kvfs.daemon.volume: SecretProviderClass "test": spec.parameters.objects lists no objects (its array is'
        " empty), so the volume is empty (upstream mounts it empty too); add an entry per object to objects.array"
    ]


@pytest.mark.parametrize(
    ("objects", "expected"),
    [
        ([{"objectName": "a", "objectType": "secret", "objectFormat": "pkcs"}], "invalid objectFormat: pkcs"),
        ([{"objectName": "a", "objectType": "secret", "objectEncoding": "utf-16"}], "invalid objectEncoding: utf-16"),
        ([{"objectName": "a", "objectType": "secret", "objectAlias": "../up"}], "must not contain '..'"),
        ([{"objectName": "a", "objectType": "secret", "filePermission": "0900"}], "filePermission"),
        ([{"objectName": "a", "objectType": "secret"}, {"objectName": "a", "objectType": "secret"}], "collides"),
        ([{"objectName": "a", "objectType": "Secret"}], "objectType"),
    ],
)
def test_bad_manifests_are_refused_before_any_network_call(
    emu: Emulator, tmp_path: Path, objects: list[dict], expected: str
) -> None:
    params = workload_parameters(emu)
    params["objects"] = objects_yaml(*objects)
    spc = tmp_path / "bad.yaml"
    spc.write_text(spc_manifest(params))
    (tmp_path / "m").mkdir()
    emu.reset_counts()
    result = subprocess.run(
        [sys.executable, "-m", "kvfs", "mount", "--spc", str(spc), str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, SSL_CERT_FILE=str(emu.ca_file), AZURE_FEDERATED_TOKEN_FILE=str(emu.sa_token_file)),
    )
    assert result.returncode == 2
    assert expected.lower() in result.stderr.lower()
    assert "Traceback" not in result.stderr
    assert emu.count() == 0


def test_logs_never_contain_tokens_or_secret_values(emu: Emulator, mounter: Mounter) -> None:
    values = {f"leak{i}": f"VALUE-{i}-do-not-log-{os.urandom(6).hex()}" for i in range(3)}
    for name, value in values.items():
        emu.set_secret("demo", name, value)
    mount = mounter.start(
        workload_parameters(emu, *({"objectName": n, "objectType": "secret"} for n in values),
                            {"objectName": "absent", "objectType": "secret"}),
        "--refresh-interval", "0.2s",
    )
    for name, value in values.items():
        assert read(mount.path / name) == value.encode()
    errno_of(mount.path / "absent")
    emu.set_secret("demo", "leak0", "VALUE-rotated-do-not-log")
    wait_until(lambda: read(mount.path / "leak0") == b"VALUE-rotated-do-not-log")
    mount.stop()
    log = mount.log()
    assert "mount config" in log  # the log was really captured
    sa_token = Path(emu.sa_token_file).read_text().strip()
    for forbidden in [*values.values(), "VALUE-rotated-do-not-log", sa_token, sa_token[:40], emu.identity.default_app.client_secret]:
        assert forbidden and forbidden not in log
    assert "eyJ" not in log  # no JWT of any kind
