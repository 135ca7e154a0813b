"""The redaction filter every kvfs process logs through (issue 9: one logging setup)."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator

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
