"""The FUSE loop of one daemon and everything that runs beside it, none of which can end it.

`pyfuse3.main()` ends only when the kernel unmounts the filesystem or the daemon is told to
stop (SIGTERM, SIGINT, the control socket's `stop`). The control server, the refresh loop and
signal handling each run in `guarded`: a failure is caught, logged, and the task started again
after a pause, so nothing auxiliary takes the mount down. Used by the real daemon
(kvfs.daemon.volume) and the stand-in (kvfs.daemon.standin).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pyfuse3
import trio

from kvfs.daemon.control import ControlServer

log = logging.getLogger(__name__)

Task = tuple[str, Callable[[], Awaitable[None]]]  # (what it is, for the log; the coroutine function)
RESTART_PAUSE = (1.0, 60.0)  # the first pause before a failed task runs again, and the longest


async def guarded(what: str, run: Callable[[], Awaitable[None]]) -> None:
    """Run `run` until it returns; when it fails, log that and run it again after a growing pause.

    The first failure is logged with its traceback, later ones in one line each.
    """
    pause, longest = RESTART_PAUSE
    failures = 0
    while True:
        try:
            await run()
            return
        except Exception as exc:
            failures += 1
            if failures == 1:
                log.exception("%s failed; the mount keeps serving, it restarts in %g s", what, pause)
            else:
                log.error("%s failed again (%d times): %s: %s; restarting in %g s", what, failures,
                          type(exc).__name__, exc, pause)  # fmt: skip
        await trio.sleep(pause)
        pause = min(pause * 2, longest)


async def _watch_signals(signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        log.info("received %s; unmounting", signal.Signals(signum).name)
        pyfuse3.terminate()
        return


async def serve_session(control: ControlServer | None, tasks: Sequence[Task] = ()) -> None:
    """Serve the initialised FUSE session until unmount or stop, with `tasks` and the control server beside it."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guarded, "signal handling", lambda: _watch_signals(signals))
            if control is not None:
                nursery.start_soon(guarded, "the control socket", control.serve)
            for what, run in tasks:
                nursery.start_soon(guarded, what, run)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
