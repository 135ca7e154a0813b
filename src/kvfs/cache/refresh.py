"""RefreshScheduler: re-fetches what was read, every refresh interval, each object on its own.

Each due object gets its own task, so one object stuck behind throttling or a slow answer
never delays another's refresh. A failed refresh is retried with jittered exponential backoff
up to the interval, or after the server's `Retry-After`, clamped to the interval: a
`Retry-After: 999999999` must not stop an object's refresh for decades.

Refresh times are spread: the pods of a rollout read their objects at the same moment, and
without jitter their volumes would refresh in step, every interval, as one burst against the
vault. An object's first refresh comes after a random 50-100 % of the interval, each later one
after 90-100 %: never later than the interval, so a new version still shows within one.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import trio

from kvfs.errors import KvfsError, error_code

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

FIRST_REFRESH = (0.5, 1.0)  # fractions of the interval: the first refresh after a read's load
NEXT_REFRESH = (0.9, 1.0)  # each later one


class RefreshScheduler(Generic[K]):
    """Calls `refresh(key)` for every loaded key when it is due; `loaded(key)` (re)arms a key."""

    def __init__(
        self,
        interval: float,
        refresh: Callable[[K], Awaitable[None]],
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.interval = interval
        self._refresh = refresh
        self._rng = rng or random.Random()
        self._due: dict[K, float] = {}  # trio time of each key's next refresh
        self._failures: dict[K, int] = {}  # consecutive failed refreshes
        self._running: set[K] = set()
        self._wake = trio.Event()

    def loaded(self, key: K) -> None:
        """`key` was just fetched: refresh it within one interval from now (jittered, see above)."""
        if self.interval <= 0:
            return
        low, high = NEXT_REFRESH if key in self._due else FIRST_REFRESH
        self._due[key] = trio.current_time() + self.interval * self._rng.uniform(low, high)
        self._failures.pop(key, None)
        self._wake.set()  # the loop may be sleeping past this new due time

    def forget(self, key: K) -> None:
        """Stop refreshing `key` (until it is `loaded` again)."""
        self._due.pop(key, None)
        self._failures.pop(key, None)

    def _backoff(self, failures: int, exc: BaseException) -> float:
        """Delay before retrying a failed refresh: Retry-After, else jittered exponential; ≤ interval."""
        asked = getattr(exc, "retry_after", None)
        if isinstance(asked, (int, float)) and asked > 0:
            return min(float(asked), self.interval)
        ceiling = min(self.interval, min(2.0, self.interval) * 2.0 ** (failures - 1))
        return ceiling * self._rng.uniform(0.5, 1.0)

    async def _one(self, key: K) -> None:
        try:
            await self._refresh(key)  # on success the loader calls `loaded(key)`
        except KvfsError as exc:
            # Keep serving the last good bytes; the loader logged the failure.
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            delay = self._backoff(failures, exc)
            self._due[key] = trio.current_time() + delay
            log.debug("%s refresh failed (%s), next try in %.1fs", key, error_code(exc), delay)
        except Exception:
            self._due[key] = trio.current_time() + self.interval
            log.exception("%s refresh failed unexpectedly", key)
        finally:
            self._running.discard(key)
            self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forever: start the refresh of every due key that is not already being refreshed."""
        task_status.started()
        if self.interval <= 0:
            return
        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                for key, at in self._due.items():
                    if at <= now and key not in self._running:
                        self._running.add(key)
                        nursery.start_soon(self._one, key)
                waiting = (at for key, at in self._due.items() if key not in self._running)
                self._wake = trio.Event()
                with trio.move_on_at(min(waiting, default=math.inf)):
                    await self._wake.wait()
