"""Warning events on pods: failures that happen after a volume is mounted, shown where operators look.

A read that fails because Key Vault or Entra ID said no (issue 11), or a Secret sync the plugin
refuses (issue 12), becomes a core/v1 Event on the pod (`kubectl describe pod`, `kubectl get
events`), posted with the plugin's own credentials; daemons report to the plugin and hold none.

- At most one event per (pod, object, reason) per interval (10 minutes): a hundred failing reads
  post one event. The table that remembers what was posted expires its entries and holds at most
  `max_keys` of them; while it is full, new keys are dropped (logged once), which also bounds the
  events per interval.
- `record()` never waits on the API and never raises: events go to one worker thread through a
  bounded queue (a full queue drops the event). A failed post is logged once per reason (again
  after one got through) and not retried; the next record after the interval tries again.
- Each event is created, never patched: with the rate limit, count-up patches would save nothing.
- Messages are redacted (no token, no registered secret) and cut to the API's 1024-byte limit by
  kvfs.csi.kube.event_body.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from typing import NamedTuple

from cachetools import TTLCache

from kvfs.csi.kube import KubeClient, KubeError, PodRef

log = logging.getLogger(__name__)

INTERVAL = 600.0  # seconds between two events with the same pod, object and reason


class Reason(StrEnum):
    """Stable event reasons: alerts and runbooks match on them."""

    OBJECT_NOT_FOUND = "KeyVaultObjectNotFound"
    FORBIDDEN = "KeyVaultForbidden"
    THROTTLED = "KeyVaultThrottled"
    UNREACHABLE = "KeyVaultUnreachable"
    TOKEN_EXCHANGE_FAILED = "IdentityTokenExchangeFailed"
    VOLUME_FAILED = "VolumeFailed"
    SECRET_SYNC_REFUSED = "SecretSyncRefused"  # a Secret kvfs did not create is in the way
    SECRET_SYNC_FAILED = "SecretSyncFailed"


class _Event(NamedTuple):
    pod: PodRef
    reason: str
    message: str


class EventRecorder:
    """Posts rate-limited Warning events on pods from a worker thread (see the module docstring).

    `kube_factory` is called on the worker thread when the first event is posted (and again after
    it failed), so a plugin without API configuration only logs.
    """

    def __init__(
        self,
        kube_factory: Callable[[], KubeClient],
        node_id: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        interval: float = INTERVAL,
        max_keys: int = 10_000,
        max_queued: int = 1_000,
    ) -> None:
        self.node_id = node_id
        self._kube_factory = kube_factory
        self._kube: KubeClient | None = None
        self._sent: TTLCache[tuple[str, str, str], bool] = TTLCache(maxsize=max_keys, ttl=interval, timer=clock)
        self._queue: queue.Queue[_Event | None] = queue.Queue(maxsize=max_queued)
        self._cond = threading.Condition()
        self._pending = 0
        self._failing: set[str] = set()  # reasons whose last post failed (logged once)
        self._dropping: set[str] = set()  # "full" / "queue" while records are dropped (logged once)
        self._thread: threading.Thread | None = None
        self._closed = False

    def record(self, pod: PodRef, reason: str, message: str, *, object_key: str = "") -> bool:
        """Queue a Warning event on `pod` unless one with this object and reason went out within the
        interval. True when queued. Returns at once; never raises."""
        key = (pod.uid or f"{pod.namespace}/{pod.name}", object_key, reason)
        with self._cond:
            if self._closed or key in self._sent:
                return False
            self._sent.expire()
            if len(self._sent) >= self._sent.maxsize:
                self._warn_once(
                    "full",
                    "more than %d pod events within %.0f s: dropping new ones until older ones expire",
                    self._sent.maxsize,
                    self._sent.ttl,
                )
                return False
            try:
                self._queue.put_nowait(_Event(pod, reason, message))
            except queue.Full:
                self._warn_once("queue", "the Kubernetes API is not keeping up with pod events: dropping new ones")
                return False
            self._dropping.clear()
            self._sent[key] = True
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvfs-events", daemon=True)
                self._thread.start()
        return True

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued event was posted or given up; False if `timeout` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking events; the worker posts what is queued, then ends (waited for up to `timeout`)."""
        with self._cond:
            self._closed = True
            thread = self._thread
        if thread is not None:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                return  # the worker is stuck on the API; it is a daemon thread
            thread.join(timeout)

    def _warn_once(self, what: str, text: str, *args: object) -> None:
        if what not in self._dropping:
            self._dropping.add(what)
            log.warning(text, *args)

    def _run(self) -> None:
        while (event := self._queue.get()) is not None:
            self._post(event)
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()

    def _post(self, event: _Event) -> None:
        pod = event.pod
        try:
            if self._kube is None:
                self._kube = self._kube_factory()
            self._kube.create_event(pod, event.reason, event.message, node_id=self.node_id)
        except Exception as exc:  # noqa: BLE001 — a lost event must never hurt a volume
            hint = " (grant the plugin's service account create on events)" if getattr(exc, "status", 0) == 403 else ""
            with self._cond:
                first = event.reason not in self._failing
                self._failing.add(event.reason)
            summary = str(exc) if isinstance(exc, KubeError) else f"{type(exc).__name__}: {exc}"
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "cannot post a %s event on pod %s/%s: %s%s",
                event.reason,
                pod.namespace,
                pod.name,
                summary,
                hint,
            )
        else:
            with self._cond:
                self._failing.discard(event.reason)
