"""SingleFlight: concurrent callers for one key share one load; failures are remembered briefly.

Used by the token cache (one token request per identity and scope) and the object cache (one
Key Vault request per object), so a hundred readers opening a cold file cost one request, and a
reader polling a failing object does not send a request per poll.

Every caller that receives a failure gets its own exception object: re-raising one object to
many callers would chain each caller's traceback onto it, growing without bound (and keeping
every caller's frames alive) while the failure is remembered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import cachetools
import trio

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
E = TypeVar("E", bound=BaseException)


def fresh_copy(exc: E) -> E:
    """A new exception object equal to `exc` in type, args and attributes, without a traceback.

    Built without calling `__init__`, whose signature differs per class.
    """
    clone = type(exc).__new__(type(exc))
    clone.args = exc.args
    clone.__dict__.update(exc.__dict__)
    clone.__suppress_context__ = True
    return clone


class _Flight:
    """One load in progress that other callers wait on."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: object = None
        self.error: Exception | None = None  # a copy; never the leader's raised object
        self.abandoned = False  # the leader was cancelled: waiters must try again


class SingleFlight(Generic[K, V]):
    """One load per key at a time; a failed load is answered from memory for `cooldown` seconds.

    Only exceptions of the `remember` types start a cooldown (expected failures such as
    `KvfsError`), unless their `cooldown` attribute is false; others (bugs) reach the callers
    of that flight only. A cancelled leader
    hands over: one of its waiters starts the load again.
    """

    def __init__(
        self,
        *,
        cooldown: float = 0.0,
        remember: tuple[type[Exception], ...] = (Exception,),
        max_remembered: int = 4096,
    ) -> None:
        self._flights: dict[K, _Flight] = {}
        self._remember = remember
        # Bounded and self-expiring: a key's failure is forgotten after `cooldown` seconds, and
        # the oldest are dropped first should ever more keys fail at once than `max_remembered`.
        self._failures: cachetools.TTLCache[K, Exception] | None = (
            cachetools.TTLCache(maxsize=max_remembered, ttl=cooldown, timer=trio.current_time)
            if cooldown > 0
            else None
        )

    def running(self, key: K) -> bool:
        """Whether a load for `key` is in progress."""
        return key in self._flights

    def remembered(self, key: K) -> Exception | None:
        """A fresh copy of the failure `key` is cooling down from, if any."""
        if self._failures is None:
            return None
        failure = self._failures.get(key)
        return fresh_copy(failure) if failure is not None else None

    async def run(self, key: K, load: Callable[[], Awaitable[V]], *, cooldown: bool = True) -> V:
        """`load()`'s result, shared with every concurrent caller for `key`.

        With `cooldown` (the default), a failure remembered for `key` is raised without loading,
        and this load's failure is remembered. Without it (a background refresh), neither.
        """
        if cooldown:
            failure = self.remembered(key)
            if failure is not None:
                raise failure
        while (flight := self._flights.get(key)) is not None:
            await flight.done.wait()
            if flight.abandoned:
                continue  # the leader was cancelled; become (or follow) a new leader
            if flight.error is not None:
                raise fresh_copy(flight.error)
            return flight.result  # type: ignore[return-value]
        flight = self._flights[key] = _Flight()
        try:
            result = await load()
            flight.result = result
        except Exception as exc:
            flight.error = fresh_copy(exc)
            if (
                cooldown
                and self._failures is not None
                and isinstance(exc, self._remember)
                and getattr(exc, "cooldown", True)
            ):
                self._failures[key] = flight.error
            raise
        except BaseException:  # trio.Cancelled, KeyboardInterrupt: not an answer to share
            flight.abandoned = True
            raise
        finally:
            del self._flights[key]
            flight.done.set()
        return result
