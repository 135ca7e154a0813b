"""`kvfs mount`'s control socket: found through the mount, answering status and events from the
daemon's live state, and surviving every bad client (tests/control_fuzz.py) while the mount serves."""

from __future__ import annotations

import os
import stat

import pytest

import certgen
from control_fuzz import answers_status, attack
from e2e.conftest import Mounter, errno_of, is_mounted, needs_fuse, read, wait_until, workload_parameters
from kvfs.daemon.control import CONTROL_XATTR, ControlClient, socket_path_for
from kvfs.emulator.server import Emulator

pytestmark = [needs_fuse, pytest.mark.mount]


def test_status_and_events_tell_what_the_mount_serves(emu: Emulator, mounter: Mounter) -> None:
    first = emu.set_secret("demo", "app", "one")
    mount = mounter.start(
        workload_parameters(
            emu, {"objectName": "app", "objectType": "secret"}, {"objectName": "missing", "objectType": "secret"}
        ),
        "--refresh-interval", "1s",
    )  # fmt: skip
    path = os.getxattr(mount.path, CONTROL_XATTR).decode()
    assert path == socket_path_for(str(mount.path))
    info = os.stat(path)
    assert stat.S_ISSOCK(info.st_mode) and info.st_mode & 0o777 == 0o600 and info.st_uid == os.geteuid()
    client = ControlClient(path)
    status = client.status()
    assert status["pid"] == mount.process.pid and status["volume_id"] is None
    assert status["mountpoint"] == str(mount.path) and status["vault_url"].startswith("https://demo.vault.localhost")
    assert status["identity"]["mode"] == "workload_identity"
    assert status["identity"]["client_id"] == emu.identity.default_app.client_id
    assert status["identity"]["token_expires_at"]  # the preflight's token, kept for the first read
    assert [(o["file"], o["version"]) for o in status["objects"]] == [("app", None), ("missing", None)]

    assert read(mount.path / "app") == b"one"
    assert errno_of(mount.path / "missing") == 2
    second = emu.set_secret("demo", "app", "two")
    wait_until(lambda: read(mount.path / "app") == b"two")
    status = client.status()
    app, missing = status["objects"]
    assert app["version"] == second and app["error"] is None
    assert app["fetched_at"] and app["refreshed_at"] and status["identity"]["token_expires_at"]
    assert missing["version"] is None and missing["error"]["errno"] == "ENOENT"
    events = client.events(0)
    shown = [(e["kind"], e["file"]) for e in events["events"]]
    assert shown == [("served", "app"), ("read_failed", "missing"), ("rotated", "app")]
    rotated = events["events"][2]
    assert (rotated["old_version"], rotated["new_version"]) == (first, second)
    assert client.events(events["next"])["events"] == []
    assert mount.stop() == 0
    assert not os.path.exists(path)  # removed at unmount


def test_fetch_hands_over_the_bytes_a_read_gets_and_each_files_error(emu: Emulator, mounter: Mounter) -> None:
    emu.set_secret("demo", "app", "fetched-" + os.urandom(4).hex())
    for value in ("old", "new"):
        emu.set_secret("demo", "hist", value)
    chain = certgen.make_chain(2)
    emu.import_certificate("demo", "web", pem=certgen.pem_bundle(chain.leaf_key, chain.certs))
    mount = mounter.start(
        workload_parameters(
            emu,
            {"objectName": "app", "objectType": "secret", "objectAlias": "conf/app"},
            {"objectName": "web", "objectType": "secret"},
            {"objectName": "hist", "objectType": "secret", "objectVersionHistory": 2},
            {"objectName": "missing", "objectType": "secret"},
            writeCertAndKeyInSeparateFiles="true",
        )
    )
    client = ControlClient(os.getxattr(mount.path, CONTROL_XATTR).decode(), timeout=40)
    wanted = ["conf/app", "web", "web.crt", "web.key", "hist/1", "missing", "app", "hist/2", "conf/app.crt"]
    files, errors = client.fetch(wanted)
    assert sorted(files) == ["conf/app", "hist/1", "web", "web.crt", "web.key"]
    for name, data in files.items():
        assert data == read(mount.path / name), name
    assert files["hist/1"] == b"old"
    assert {name: (e["code"], e["errno"]) for name, e in errors.items()} == {
        "missing": ("SecretNotFound", "ENOENT"),  # Key Vault's answer, as a read gets it
        "app": ("NoSuchFile", "ENOENT"),  # the file is named by its alias
        "hist/2": ("NoSuchFile", "ENOENT"),  # a history of 2 has entries 0 and 1
        "conf/app.crt": ("NoSuchFile", "ENOENT"),  # not a certificate-backed secret
    }
    served = {e["file"] for e in client.events(0)["events"] if e["kind"] == "served"}
    assert served == {"conf/app", "web", "hist"}  # a fetch is a read: what it fetched is served and refreshed
    assert mount.stop() == 0


def test_no_client_can_stop_a_mount(emu: Emulator, mounter: Mounter) -> None:
    emu.set_secret("demo", "app", "still here")
    mount = mounter.start(workload_parameters(emu, {"objectName": "app", "objectType": "secret"}))
    path = socket_path_for(str(mount.path))
    assert read(mount.path / "app") == b"still here"
    attack(path)
    assert mount.process.poll() is None and is_mounted(mount.path)
    assert read(mount.path / "app") == b"still here"
    assert answers_status(path)["pid"] == mount.process.pid
    assert "Traceback" not in mount.log() and "internal error" not in mount.log()
