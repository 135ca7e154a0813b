"""The plugin's watcher hands each volume's new daemon events to subscribers, once, in order."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import pytest

from csi_harness import short_tmpdir
from kvfs.csi.state import StateStore, VolumeState, new_state
from kvfs.csi.watch import VolumeWatcher
from kvfs.daemon import jsonline
from kvfs.daemon.events import EventKind, EventRing


class FakeDaemon:
    """Answers `events` on a volume's control socket from a real EventRing, as a daemon does."""

    def __init__(self, path: str) -> None:
        self.ring = EventRing(size=4)
        self.asked: list[int] = []
        self.listener = jsonline.listen(path, backlog=4)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                request = jsonline.LineReader(conn).read(5.0)
                self.asked.append(int(request["since"]))
                jsonline.send(conn, {"ok": True, **self.ring.read(int(request["since"]))})

    def close(self) -> None:
        self.listener.close()


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, list[str]]] = []

    def on_events(self, volume: VolumeState, events: Sequence[Mapping[str, Any]]) -> None:
        self.seen.append((volume.volume_id, [f"{e['kind']}:{e['object']}" for e in events]))


@pytest.fixture
def store() -> Iterator[StateStore]:
    folder = short_tmpdir()
    yield StateStore(folder)
    shutil.rmtree(folder, ignore_errors=True)


def ready(store: StateStore, name: str) -> VolumeState:
    state = replace(new_state(name, f"/var/lib/kubelet/pods/{name}/mount", 1, 1, pod_name=name), phase="ready")
    store.save(state)
    return state


@pytest.fixture
def daemon_for(store: StateStore) -> Iterator[Callable[[VolumeState], FakeDaemon]]:
    made: list[FakeDaemon] = []

    def make(state: VolumeState) -> FakeDaemon:
        os.makedirs(store.volume_dir(state.target_path), exist_ok=True)
        made.append(FakeDaemon(str(store.control_socket(state.target_path))))
        return made[-1]

    yield make
    for daemon in made:
        daemon.close()


def test_each_event_reaches_every_subscriber_once_in_order(
    store: StateStore, daemon_for: Callable[[VolumeState], FakeDaemon]
) -> None:
    first, second = Recorder(), Recorder()
    a = daemon_for(ready(store, "a"))
    daemon_for(ready(store, "b"))
    watcher = VolumeWatcher(store, [first, second])
    a.ring.add(EventKind.SERVED, object="secret/x", file="x", version="v1")
    a.ring.add(EventKind.READ_FAILED, object="secret/gone", file="gone", code="SecretNotFound")
    assert watcher.poll() == 2
    a.ring.add(EventKind.ROTATED, object="secret/x", file="x", old_version="v1", new_version="v2")
    assert watcher.poll() == 1
    assert watcher.poll() == 0
    expected = [("a", ["served:secret/x", "read_failed:secret/gone"]), ("a", ["rotated:secret/x"])]
    assert first.seen == second.seen == expected
    assert a.asked == [0, 3, 4]  # each poll asks from where the last one ended


def test_a_failing_subscriber_or_a_silent_daemon_stops_nobody(
    store: StateStore,
    daemon_for: Callable[[VolumeState], FakeDaemon],
    expect_logs: Callable[..., None],
) -> None:
    expect_logs(r"Broken failed on daemon events", level=logging.ERROR)

    class Broken:
        def on_events(self, volume: VolumeState, events: Sequence[Mapping[str, Any]]) -> None:
            raise RuntimeError("subscriber bug")

    recorder = Recorder()
    ready(store, "dead")  # its daemon never answers: no socket at all
    b = daemon_for(ready(store, "b"))
    b.ring.add(EventKind.SERVED, object="secret/y", file="y", version="v1")
    assert VolumeWatcher(store, [Broken(), recorder], timeout=0.5).poll() == 1
    assert recorder.seen == [("b", ["served:secret/y"])]


def test_a_watcher_behind_the_ring_says_so_and_volumes_gone_are_forgotten(
    store: StateStore,
    daemon_for: Callable[[VolumeState], FakeDaemon],
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    state = ready(store, "a")
    a = daemon_for(state)
    watcher = VolumeWatcher(store, [recorder])
    a.ring.add(EventKind.SERVED, object="secret/0", file="0", version="v")
    watcher.poll()
    for i in range(1, 7):  # more than the ring holds (4) before the next poll
        a.ring.add(EventKind.SERVED, object=f"secret/{i}", file=str(i), version="v")
    with caplog.at_level(logging.WARNING, logger="kvfs.csi.watch"):
        assert watcher.poll() == 4
    assert "missed 2 daemon events" in caplog.text
    store.remove(state.target_path)
    watcher.poll()
    assert watcher._next == {}
