"""The suite's own guards (tests/guards.py), tried on planted tests in a separate pytest run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from guards import LogCheck

pytest_plugins = ["pytester"]

PLANTED = '''
import logging

import pytest


def test_unexpected_error():
    logging.getLogger("kvfs.x").error("boom")


def test_declared_error(expect_logs):
    expect_logs(r"kvfs\\.x: boom$")
    logging.getLogger("kvfs.x").error("boom")


def test_declaration_never_used(expect_logs):
    expect_logs("never logged")


def test_kvfs_traceback_at_warning():
    try:
        1 / 0
    except ZeroDivisionError:
        logging.getLogger("kvfs.y").warning("oops", exc_info=True)


def test_plain_warning():
    logging.getLogger("kvfs.z").warning("object=secret/a code=Forbidden")


@pytest.mark.skipif(True, reason="real mounts need /dev/fuse and root")
def test_skipped_for_want_of_fuse():
    pass


@pytest.mark.mount
def test_marked_mount_skipped():
    pytest.skip("not root")
'''


def test_planted_problems_fail_and_skipped_mounts_are_announced(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    pytester.makeconftest("from guards import checklogs, expect_logs, pytest_terminal_summary")
    pytester.makeini("[pytest]\nmarkers =\n    mount: real mount")
    pytester.makepyfile(PLANTED)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=5, skipped=2, errors=3)  # the three pass, then fail at teardown
    errors = {line.split("::")[1].split()[0] for line in result.outlines if line.startswith("ERROR test_")}
    assert errors == {"test_unexpected_error", "test_declaration_never_used", "test_kvfs_traceback_at_warning"}
    result.stdout.fnmatch_lines(["*2 REAL-MOUNT TESTS SKIPPED*"])


MOUNT_OUTPUT = """\
2026-01-02 03:04:05,678 INFO kvfs.daemon.volume: mount config: vault=https://demo.vault.localhost/
2026-01-02 03:04:06,001 ERROR kvfs.fs.adapter: internal error in lookup; answering EIO
Traceback (most recent call last):
  File "core.py", line 1, in lookup
KeyError: 3
2026-01-02 03:04:06,002 WARNING kvfs.cache.loader: object=secret/a code=Forbidden: denied
"""


def test_a_process_output_is_judged_record_by_record() -> None:
    check = LogCheck()
    check.check_output(MOUNT_OUTPUT, "mount")
    assert len(check.problems) == 1
    assert check.problems[0].startswith("[mount] 2026-01-02 03:04:06,001 ERROR kvfs.fs.adapter")
    assert check.problems[0].endswith("KeyError: 3")

    declared = LogCheck()
    declared.expect(r"internal error in lookup", level=logging.ERROR)
    declared.check_output(MOUNT_OUTPUT, "mount")
    assert declared.verdict() == ""


def test_a_crash_outside_any_log_line_is_a_problem() -> None:
    check = LogCheck()
    check.check_output('Traceback (most recent call last):\n  File "x.py"\nOSError: boom\n', "mount")
    assert "OSError: boom" in check.verdict()
