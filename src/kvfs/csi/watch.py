"""What daemons report reaches the plugin: one thread polls each ready volume's `events`.

Daemons hold no Kubernetes credentials. What the plugin turns into pod events, status objects or
synced Secrets is what the daemon recorded itself (kvfs.daemon.events: `served`, `rotated`,
`read_failed`), fetched over the volume's control socket. One request per ready volume per round;
a daemon that does not answer is skipped until the next round (the health sweep reports dead
volumes). After a plugin restart the first round reads each daemon's whole ring again, so
subscribers must be idempotent (pod events are rate-limited; status objects and Secrets are
written to a state, not appended to).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from kvfs.csi.state import StateStore, VolumeState
from kvfs.daemon import jsonline
from kvfs.daemon.control import ControlClient, ControlError

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 5.0  # seconds between rounds: how late a pod event or status update may be


class EventSubscriber(Protocol):
    """Gets each volume's new events, oldest first; must not block for long, must not raise."""

    def on_events(self, volume: VolumeState, events: Sequence[Mapping[str, Any]]) -> None: ...


class VolumeWatcher:
    """Polls every ready volume's daemon for events it has not seen and hands them on."""

    def __init__(
        self, store: StateStore, subscribers: Sequence[EventSubscriber] = (), *, timeout: float = 2.0
    ) -> None:
        self.store = store
        self.subscribers = list(subscribers)
        self.timeout = timeout
        self._next: dict[str, int] = {}  # target → the `since` of its next poll

    def poll(self) -> int:
        """One round over the ready volumes; the number of events handed on."""
        ready = [s for s in self.store.all() if s.phase == "ready"]
        for gone in set(self._next) - {s.target_path for s in ready}:
            del self._next[gone]
        return sum(self._poll_one(state) for state in ready)

    def _poll_one(self, state: VolumeState) -> int:
        since = self._next.get(state.target_path, 0)
        try:
            reply = ControlClient(str(self.store.control_socket(state.target_path)), timeout=self.timeout).events(since)
            events = [e for e in reply["events"] if isinstance(e, dict)]
            following = int(reply["next"])
        except (jsonline.ProtocolError, ControlError, KeyError, TypeError, ValueError) as exc:
            log.debug("volume %s: no events this round: %s", state.volume_id, exc)
            return 0
        if since and reply.get("dropped"):
            log.warning(
                "volume %s: missed %s daemon events (the plugin fell behind)", state.volume_id, reply["dropped"]
            )
        self._next[state.target_path] = following
        if events:
            for subscriber in self.subscribers:
                try:
                    subscriber.on_events(state, events)
                except Exception:  # noqa: BLE001 - one subscriber's bug must not starve the others
                    log.exception("volume %s: %s failed on daemon events", state.volume_id, type(subscriber).__name__)
        return len(events)

    def run(self, stopping: threading.Event, interval: float = DEFAULT_INTERVAL) -> None:
        """Rounds every `interval` seconds until `stopping` is set (the plugin's watcher thread)."""
        while not stopping.wait(interval):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the next round may fare better
                log.exception("watching volumes failed")

    def start(self, interval: float = DEFAULT_INTERVAL) -> threading.Event:
        """Run in a daemon thread; set the returned event to stop it."""
        stopping = threading.Event()
        threading.Thread(target=self.run, args=(stopping, interval), name="volume-watcher", daemon=True).start()
        return stopping
