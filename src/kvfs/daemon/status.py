"""What one daemon knows about its objects, live: the `objects` of its status, and its events.

`ObjectWatch` is the cache's listener (kvfs.cache.base.CacheListener): every load of an object
lands here, so the control socket's `status` is read from the daemon's own state, never from its
logs, and the event ring (kvfs.daemon.events) records the first load of an object, each new
version and each failed read.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvfs.cache.base import Version
from kvfs.config.model import ObjectSpec
from kvfs.daemon.events import EventKind, EventRing, clipped, wall_time
from kvfs.errors import KvfsError, error_code
from kvfs.logsafe import redact


@dataclass(frozen=True)
class Failure:
    code: str  # Key Vault's or Entra ID's error code, else the error's type
    errno: str  # what the read failed with, e.g. "EACCES"
    message: str  # safe by contract (KvfsError), redacted again, clipped
    at: float  # wall clock

    @classmethod
    def of(cls, error: KvfsError) -> Failure:
        return cls(
            code=error_code(error),
            errno=errno.errorcode.get(error.errno, str(error.errno)),
            message=clipped(redact(str(error))),
            at=time.time(),
        )

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "errno": self.errno, "message": self.message, "at": wall_time(self.at)}


@dataclass
class _ObjectState:
    spec: ObjectSpec
    version: str | None = None  # the version served (the newest one of a history folder)
    fetched_at: float | None = None  # wall clock: when that version was first fetched
    refreshed_at: float | None = None  # wall clock: Key Vault's last successful answer
    error: Failure | None = None  # the last load's failure; None once a load succeeds
    served: bool = False
    history: list[str] = field(default_factory=list)  # a history folder's versions, newest first
    read_failure: str = ""  # the code of the read failure last reported as an event


class ObjectWatch:
    """Per configured object: the version it serves, when it was fetched, its last error."""

    def __init__(self, objects: Sequence[ObjectSpec], events: EventRing) -> None:
        self._states = {spec: _ObjectState(spec) for spec in objects}
        self._events = events
        self.rotations = 0  # objects that started showing another version (kvfs_rotations_total)

    # -- kvfs.cache.base.CacheListener ------------------------------------------------------

    def fetched(self, spec: ObjectSpec, version: Version | None, history: Sequence[Version] = ()) -> None:
        state = self._state(spec)
        now = time.time()
        shown = version.version if version is not None else None
        where: dict[str, Any] = {"object": spec.object_id, "file": spec.file_name}
        versions = [v.version for v in history]
        if spec.version_history >= 2:
            where["versions"] = versions  # a history folder's entries 0, 1, ...: newest first
        if not state.served:
            state.served = True
            self._events.add(EventKind.SERVED, **where, version=shown)
        elif shown != state.version or versions != state.history:
            self._events.add(EventKind.ROTATED, **where, old_version=state.version, new_version=shown)
            self.rotations += 1
        if shown != state.version or state.fetched_at is None:
            state.fetched_at = now
        state.version = shown
        state.history = versions
        state.refreshed_at = now
        state.error = None
        state.read_failure = ""

    def failed(self, spec: ObjectSpec, error: KvfsError, *, background: bool) -> None:
        state = self._state(spec)
        failure = Failure.of(error)
        state.error = failure
        if not background and failure.code != state.read_failure:
            state.read_failure = failure.code
            self._events.add(
                EventKind.READ_FAILED,
                object=spec.object_id,
                file=spec.file_name,
                code=failure.code,
                errno=failure.errno,
                message=failure.message,
            )

    # -- status ------------------------------------------------------------------------------

    def to_json(self) -> list[dict[str, Any]]:
        """The `objects` of a status reply, in the order of the configuration."""
        return [
            {
                "file": state.spec.file_name,
                "object": state.spec.object_id,
                "type": state.spec.type,
                "history": state.spec.version_history,
                "version": state.version,
                "fetched_at": wall_time(state.fetched_at),
                "refreshed_at": wall_time(state.refreshed_at),
                "error": state.error.to_json() if state.error is not None else None,
            }
            for state in self._states.values()
        ]

    def _state(self, spec: ObjectSpec) -> _ObjectState:
        return self._states.setdefault(spec, _ObjectState(spec))
