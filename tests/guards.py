"""The suite's guards: checklogs, and a loud line when real-mount tests did not run.

Checklogs (after s3ql's pytest_checklogs): a test fails if something logged a problem it did
not expect.

A problem is a record (reaching the root logger) at ERROR or above, or saying "internal error",
or a kvfs record carrying a traceback; in a kvfs process's output, an `ERROR`/`CRITICAL` log
line, a traceback or "internal error". A test that provokes one on purpose declares it:

    def test_x(expect_logs):
        expect_logs(r"object=secret/gone code=Forbidden", level=logging.ERROR)

A declaration must be used at least once, so it cannot outlive the behaviour it excuses.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

PROBLEM_TEXT = re.compile(r"internal error|Traceback \(most recent call last\)", re.IGNORECASE)
# kvfs's log lines (kvfs.logsafe) start "<date> <time> LEVEL logger: message".
_LINE_START = re.compile(r"^\d{4}-\d\d-\d\d[ T]\S+ (?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


@dataclass
class _Expected:
    pattern: re.Pattern[str]
    level: int
    used: int = 0


class LogCheck(logging.Handler):
    """Collects the problems logged during one test (in process, or by a subprocess's output)."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.expected: list[_Expected] = []
        self.problems: list[str] = []

    def expect(self, pattern: str, *, level: int = logging.ERROR) -> None:
        """Declare that this test logs, at `level`, a problem whose text matches `pattern`."""
        self.expected.append(_Expected(re.compile(pattern), level))

    def _judge(self, level: int, text: str, source: str) -> None:
        for expected in self.expected:
            if expected.level == level and expected.pattern.search(text):
                expected.used += 1
                return
        self.problems.append(f"[{source}] {text}")

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        traceback = record.exc_text or (logging.Formatter().formatException(record.exc_info) if record.exc_info else "")
        from_kvfs = record.name == "kvfs" or record.name.startswith("kvfs.")
        if record.levelno >= logging.ERROR or PROBLEM_TEXT.search(message) or (from_kvfs and traceback):
            text = f"{record.levelname} {record.name}: {message}"
            self._judge(record.levelno, text + ("\n" + traceback if traceback else ""), "log")

    def check_output(self, output: str, source: str) -> None:
        """Judge a kvfs process's output: each log line starts a record, other lines continue it."""
        records: list[list[str]] = []
        for line in output.splitlines():
            if _LINE_START.match(line) or not records:
                records.append([line])
            else:
                records[-1].append(line)
        for lines in records:
            text = "\n".join(lines)
            start = _LINE_START.match(lines[0])
            # Output before the first log line (a crash's traceback) is judged as an ERROR.
            level: int = logging.getLevelName(start["level"]) if start else logging.ERROR
            if (start and level >= logging.ERROR) or PROBLEM_TEXT.search(text):
                self._judge(level, text, source)

    def verdict(self) -> str:
        """What is wrong, or "" when every problem was expected and every declaration used."""
        lines = [f"unexpected log record: {problem}" for problem in self.problems]
        lines += [
            f"declared but never logged: {logging.getLevelName(e.level)} {e.pattern.pattern!r}"
            for e in self.expected
            if not e.used
        ]
        return "\n".join(lines)


@pytest.fixture(autouse=True)
def checklogs() -> Iterator[LogCheck]:
    """Every test: collect root-logger records; fail at teardown on an unexpected problem."""
    check = LogCheck()
    root = logging.getLogger()
    root.addHandler(check)
    try:
        yield check
    finally:
        root.removeHandler(check)
    verdict = check.verdict()
    if verdict:
        pytest.fail(f"checklogs:\n{verdict}", pytrace=False)


@pytest.fixture
def expect_logs(checklogs: LogCheck) -> Callable[..., None]:
    """`expect_logs(pattern, level=logging.ERROR)`: this test logs that problem on purpose."""
    return checklogs.expect


def _is_real_mount_skip(report: pytest.TestReport) -> bool:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return "mount" in report.keywords or "/dev/fuse" in reason


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Real mounts are the tests that matter most: say loudly when they did not run."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if _is_real_mount_skip(r)]
    if skipped:
        terminalreporter.write_sep(
            "!",
            f"{len(skipped)} REAL-MOUNT TESTS SKIPPED (run as root with /dev/fuse to test kvfs for real)",
            red=True,
            bold=True,
        )
