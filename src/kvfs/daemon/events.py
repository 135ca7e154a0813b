"""The daemon's event log: what happened to its objects, read through the control socket's `events`.

A bounded ring of small records, each numbered by a sequence that only grows, so a reader polls
with the `next` it was last given and learns how many it missed when it fell behind. Events
carry object ids, file names, versions and error codes: never a value or a token. They are what
later work turns into pod events (a read failed, a rotation) and into
SecretProviderClassPodStatus versions and Secret syncs.
"""

from __future__ import annotations

import collections
import datetime
import enum
import time
from dataclasses import dataclass, field
from typing import Any

EVENT_RING = 512  # events kept; an older `since` learns how many it missed
MESSAGE_LIMIT = 300  # characters of an error message kept in an event or a status


class EventKind(str, enum.Enum):
    READ_FAILED = "read_failed"  # a read of the object failed: first failure, or its code changed
    SERVED = "served"  # the object's first successful load
    ROTATED = "rotated"  # the object shows a new version


def wall_time(at: float | None) -> str | None:
    """Seconds since the epoch as RFC 3339 UTC (`2025-05-01T10:04:31.123Z`); None stays None."""
    if at is None:
        return None
    stamp = datetime.datetime.fromtimestamp(at, datetime.timezone.utc)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def clipped(message: str) -> str:
    """An error message short enough for an event or a status line."""
    message = " ".join(message.split())
    return message if len(message) <= MESSAGE_LIMIT else message[: MESSAGE_LIMIT - 3] + "..."


@dataclass(frozen=True)
class Event:
    seq: int
    at: float  # wall clock
    kind: EventKind
    fields: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "at": wall_time(self.at), "kind": self.kind.value, **self.fields}


class EventRing:
    """The last `size` events; `read(since)` answers the control socket's `events` request."""

    def __init__(self, size: int = EVENT_RING) -> None:
        self._events: collections.deque[Event] = collections.deque(maxlen=size)
        self._next = 1  # the sequence number of the next event

    def add(self, kind: EventKind, **fields: Any) -> Event:
        event = Event(self._next, time.time(), kind, fields)
        self._next += 1
        self._events.append(event)
        return event

    def read(self, since: int) -> dict[str, Any]:
        """Events numbered `since` and later; `next` for the following poll; `dropped`: how many of
        those the ring no longer holds (the reader fell more than a ring behind)."""
        since = max(1, since)
        oldest = self._events[0].seq if self._events else self._next
        return {
            "next": self._next,
            "dropped": max(0, min(oldest, self._next) - since),
            "events": [event.to_json() for event in self._events if event.seq >= since],
        }
