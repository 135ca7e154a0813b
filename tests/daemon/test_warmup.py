"""The zygote's warm-up: a made-up volume read end to end, leaving nothing behind."""

from __future__ import annotations

import gc
import logging
import os
import threading

import pytest

from kvfs.daemon import warmup
from kvfs.logsafe import redact


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_the_warm_up_reads_its_made_up_object_and_leaves_nothing_behind(caplog: pytest.LogCaptureFixture) -> None:
    """A warm-up that silently stopped half-way would only cost memory: it says so instead."""
    gc.collect()  # fds of earlier tests' garbage close now, not during the warm-up
    fds, threads = _fds(), {t.ident for t in threading.enumerate()}
    with caplog.at_level(logging.DEBUG):
        warmup.warm_up()
    assert [r.getMessage() for r in caplog.records] == []  # quiet, and it read VALUE back
    assert _fds() <= fds, "a socket or the certificate's memfd is still open"
    assert {t.ident for t in threading.enumerate()} <= threads, "a thread outlived the warm-up"
    assert logging.root.manager.disable == logging.NOTSET
    assert "warm-up value" in redact("warm-up value")  # no made-up secret was registered for redaction


def test_a_failing_warm_up_is_one_warning_and_the_zygote_goes_on(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_answer = warmup._answer

    def no_secret(method: bytes, target: str) -> tuple[int, bytes]:
        if "/secrets/" in target:
            return 404, b'{"error": {"code": "SecretNotFound", "message": "gone"}}'
        return real_answer(method, target)

    monkeypatch.setattr(warmup, "_answer", no_secret)
    with caplog.at_level(logging.DEBUG):
        warmup.warm_up()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith("warm-up failed, daemons use more private memory: ")
    assert messages[0].endswith("FUSEError: No such file or directory"), messages  # the file answered ENOENT
