"""`kvfs mount --log-format json` for real (issue 11): every line of a mount's output parses, the
structured fields name the object and the request, and no credential appears in any field.

One mount per identity that carries a credential of its own: workload identity (a service
account token) and a service principal (a client secret), each read through a rotation and a
failing object at DEBUG, so every kind of line a mount writes is there.
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.conftest import Mounter, errno_of, needs_fuse, read, wait_until, workload_parameters
from kvfs.emulator.server import Emulator

pytestmark = [needs_fuse, pytest.mark.mount]

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def records(text: str) -> list[dict[str, Any]]:
    """Every line as JSON with the fields every record has; a line that is not fails the test."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"line {number} is not JSON: {line!r}") from None
        assert list(entry)[:5] == ["time", "level", "logger", "message", "pid"], line
        assert TIME.match(entry["time"]) and isinstance(entry["pid"], int), line
        entries.append(entry)
    return entries


@pytest.mark.parametrize("identity", ["workload", "service-principal"])
def test_json_logs_of_a_mount_through_a_rotation_and_a_failing_object(
    emu: Emulator, mounter: Mounter, tmp_path: Path, identity: str
) -> None:
    emu.set_secret("demo", "rotating", "VALUE-one-do-not-log")
    objects = ({"objectName": "rotating", "objectType": "secret"}, {"objectName": "missing", "objectType": "secret"})
    params = workload_parameters(emu, *objects)
    args = ["--refresh-interval", "0.2s", "--log-format", "json"]
    app = emu.identity.default_app
    if identity == "service-principal":
        del params["clientID"]
        secrets = tmp_path / "sp.yaml"
        secrets.write_text(yaml.safe_dump({"clientid": app.client_id, "clientsecret": app.client_secret}))
        secrets.chmod(0o600)
        args += ["--secrets", str(secrets)]
    mount = mounter.start(params, *args)  # KVFS_LOG_LEVEL=DEBUG
    assert read(mount.path / "rotating") == b"VALUE-one-do-not-log"
    assert errno_of(mount.path / "missing") == errno.ENOENT
    emu.set_secret("demo", "rotating", "VALUE-two-do-not-log")
    wait_until(lambda: read(mount.path / "rotating") == b"VALUE-two-do-not-log")
    assert mount.stop() == 0

    text = mount.log()
    entries = records(text)
    assert any(e["message"].startswith("mount config:") and f"auth={identity.replace('-', '_')}" in e["message"]
               for e in entries)  # fmt: skip
    failed = [e for e in entries if e["level"] == "WARNING" and e.get("object") == "secret/missing"]
    assert len(failed) == 1 and failed[0]["code"] == "SecretNotFound", failed
    assert any(e.get("object") == "secret/rotating" and "new version" in e["message"] for e in entries)
    requests = [e for e in entries if e["logger"] == "kvfs.vault.client" and "method" in e]
    assert {(e["method"], e["path"], e.get("status")) for e in requests} >= {
        ("GET", "/secrets/rotating", 200),
        ("GET", "/secrets/missing", 404),
    }
    assert all(isinstance(e["duration_ms"], (int, float)) and "?" not in e["path"] for e in requests)

    sa_token = Path(emu.sa_token_file).read_text().strip()
    for forbidden in ("VALUE-one-do-not-log", "VALUE-two-do-not-log", app.client_secret, sa_token, sa_token[-40:]):
        assert forbidden and forbidden not in text
    assert "eyJ" not in text  # no JWT of any kind, whole or escaped
