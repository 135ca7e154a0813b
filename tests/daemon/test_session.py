"""`guarded`: what runs beside the FUSE loop fails alone, is logged, and runs again."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import trio
import trio.testing

from kvfs.daemon.session import guarded


async def test_a_failing_task_is_logged_and_restarted_until_it_ends(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, expect_logs: Callable[..., None]
) -> None:
    runs: list[float] = []
    expect_logs(r"the flaky task", level=logging.ERROR)

    async def flaky() -> None:
        runs.append(trio.current_time())
        if len(runs) < 4:
            raise RuntimeError(f"failure {len(runs)}")

    with caplog.at_level(logging.INFO, logger="kvfs.daemon.session"):
        await guarded("the flaky task", flaky)
    assert len(runs) == 4  # ran again after each failure, then ended normally
    assert [later - earlier for earlier, later in zip(runs, runs[1:])] == [1.0, 2.0, 4.0]  # MockClock: pauses grow
    records = [r for r in caplog.records if r.name == "kvfs.daemon.session"]
    assert len(records) == 3 and all("the flaky task" in r.getMessage() for r in records)
    assert records[0].exc_info is not None and all(r.exc_info is None for r in records[1:])  # one traceback
    assert "failed again (3 times): RuntimeError: failure 3" in records[2].getMessage()


async def test_cancellation_is_not_a_failure(autojump_clock: trio.testing.MockClock) -> None:
    runs = 0

    async def forever() -> None:
        nonlocal runs
        runs += 1
        await trio.sleep_forever()

    with trio.move_on_after(5):
        await guarded("forever", forever)
    assert runs == 1
