"""The redaction filter every kvfs process logs through (issue 9: one logging setup)."""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvfs import logsafe


@pytest.fixture
def log_text() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logsafe.setup_logging("DEBUG", stream=stream, pid=True)
    try:
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_registered_secrets_are_masked_in_messages_and_tracebacks(log_text: io.StringIO) -> None:
    secret = "Zx8Q~registered-secret-value"
    logsafe.register_secret(secret)
    logsafe.register_secret("short")  # too short to mask safely: ignored
    log = logging.getLogger("kvfs.test")
    log.warning("client secret is %s", secret)
    try:
        raise ValueError(f"bad {secret}")
    except ValueError:
        log.exception("failed")
    log.info("a short word stays")
    text = log_text.getvalue()
    assert secret not in text and text.count("<redacted>") == 2
    assert "a short word stays" in text


def test_tokens_are_masked_without_registration(log_text: io.StringIO) -> None:
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    logging.getLogger("kvfs.test").info("Authorization: Bearer abcdefgh12345678 and %s", jwt)
    text = log_text.getvalue()
    assert "abcdefgh12345678" not in text and jwt not in text


def test_pid_in_every_line_when_asked(log_text: io.StringIO) -> None:
    logging.getLogger("kvfs.test").info("hello")
    assert f" {os.getpid()} INFO kvfs.test: hello" in log_text.getvalue()


# ---- --log-format json ---------------------------------------------------------------------

RFC3339_MS_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def local_time_ahead_of_utc() -> Iterator[None]:
    """TZ=UTC+05:30 for the test: a time stamp in local time would show."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Kolkata"
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TZ")
        else:
            os.environ["TZ"] = before
        time.tzset()


@pytest.fixture
def json_lines(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """Logs as JSON into a buffer; returns a function parsing every line (each must parse)."""
    monkeypatch.setattr(logsafe, "_context", {})
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logsafe.setup_logging("DEBUG", stream=stream, fmt="json")
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.usefixtures("local_time_ahead_of_utc")
def test_json_lines_carry_the_schema_and_structured_fields(json_lines: Callable[[], list[dict[str, Any]]]) -> None:
    log = logging.getLogger("kvfs.cache.loader")
    log.warning("object=%s code=%s:\nsecond line", "secret/db", "SecretNotFound",
                extra={"object": "secret/db", "code": "SecretNotFound", "status": 404})
    logsafe.set_log_context(volume="csi-0123", pod="team-a/web-0")
    logging.getLogger("kvfs.daemon.volume").info("mounted", extra={"volume": "given-wins"})
    first, second = json_lines()
    assert list(first)[:5] == ["time", "level", "logger", "message", "pid"]
    assert RFC3339_MS_UTC.match(first["time"]), first["time"]
    stamp = datetime.datetime.strptime(first["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
    assert abs(stamp.timestamp() - time.time()) < 1800  # UTC, not local time 5.5 hours ahead
    assert first | {"time": ""} == {
        "time": "", "level": "WARNING", "logger": "kvfs.cache.loader", "pid": os.getpid(),
        "message": "object=secret/db code=SecretNotFound:\nsecond line",
        "object": "secret/db", "code": "SecretNotFound", "status": 404,
    }  # fmt: skip
    assert second["pod"] == "team-a/web-0" and second["volume"] == "given-wins"  # a call's own field wins


def test_json_exceptions_are_one_line_with_the_traceback_beside(json_lines: Callable[[], list[dict[str, Any]]]) -> None:
    try:
        raise ValueError("bad\ninput")
    except ValueError:
        logging.getLogger("kvfs.test").exception("failed")
    (entry,) = json_lines()
    assert entry["exc"] == "ValueError: bad input"
    assert entry["traceback"].startswith("Traceback") and "raise ValueError" in entry["traceback"]


def test_json_fields_are_redacted_everywhere(json_lines: Callable[[], list[dict[str, Any]]]) -> None:
    secret = "Zx8Q~planted-client-secret"
    sa_token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2lnbmF0dXJlLXBsYW50ZWQ"
    logsafe.register_secret(secret)
    logsafe.set_log_context(pod=f"ns/{secret}")
    log = logging.getLogger("kvfs.test")
    log.info("secret %s token %s", secret, sa_token, extra={"object": secret, "detail": {"token": sa_token}})
    try:
        raise RuntimeError(f"with {secret} and Bearer {sa_token}")
    except RuntimeError:
        log.error("failed", exc_info=True, extra={"code": f"client_secret={secret}"})
    entries = json_lines()
    text = json.dumps(entries)
    assert secret not in text and "eyJ" not in text and "c2lnbmF0dXJlLXBsYW50ZWQ" not in text
    assert entries[0]["object"] == "<redacted>" and entries[0]["pod"] == "ns/<redacted>"
    assert entries[1]["exc"].startswith("RuntimeError: with <redacted>")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_setup_logging_takes_the_format(fmt: str) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        logsafe.setup_logging("INFO", stream=stream, fmt=fmt)
        logging.getLogger("kvfs.test").info("hello")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    line = stream.getvalue().strip()
    assert (json.loads(line)["message"] == "hello") if fmt == "json" else line.endswith("INFO kvfs.test: hello")


def test_no_module_sets_up_logging_but_logsafe_and_every_process_entry_calls_it() -> None:
    """One logging setup (issue 13): `kvfs` (mount, emulator), `kvfs csi node|mounter`, the zygote
    (whose forks are the daemons) all call setup_logging; nothing calls basicConfig or adds handlers."""
    import ast
    from pathlib import Path

    src = Path(logsafe.__file__).parent
    starters = []
    for path in sorted(src.rglob("*.py")):
        tree = ast.parse(path.read_text())
        calls = {
            node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
        }
        if path.name != "logsafe.py":
            assert not calls & {"basicConfig", "addHandler", "StreamHandler", "FileHandler"}, path
        if "__main__" in path.read_text() or path.relative_to(src).as_posix() in ("cli.py", "emulator/cli.py"):
            starters.append(path.relative_to(src).as_posix())
            assert "setup_logging" in calls, f"{path} starts a process without kvfs.logsafe.setup_logging"
    assert {"cli.py", "csi/cli.py", "csi/zygote.py", "emulator/cli.py"} <= set(starters)
