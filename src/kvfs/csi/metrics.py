"""The node plugin's Prometheus metrics (`kvfs csi node --metrics-addr`).

Its own: volumes by state, publishes and their duration, scrapes of daemons that failed. Its
daemons': at each scrape the plugin asks every ready volume's daemon for its counters (the
control socket's `metrics`, kvfs.daemon.metrics), all at once with a short timeout, and serves
their sum. Daemons hold no HTTP listener and no credentials for this. Sums stay monotonic: a
daemon that does not answer counts with its last answer (and `kvfs_scrape_errors_total` grows),
and the last answer of a volume that went away stays in the sum. Labels are bounded: values a
daemon sends that the spec does not know are dropped, so no pod or object name becomes one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric

from kvfs.csi.request import RequestError
from kvfs.daemon import jsonline
from kvfs.daemon.control import ControlClient, ControlError
from kvfs.daemon.metrics import PUBLISH_BUCKETS, Snapshot, Totals, parse_addr, volume_family

if TYPE_CHECKING:
    from kvfs.csi.volumes import Volumes

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT = 1.0  # seconds a daemon has to answer `metrics`
SCRAPE_WORKERS = 16
T = TypeVar("T")


class NodeMetrics:
    """Collects at scrape time; `observe_publish` wraps Volumes.publish for the publish metrics."""

    def __init__(self, volumes: Volumes, *, timeout: float = SCRAPE_TIMEOUT) -> None:
        self.volumes = volumes
        self.timeout = timeout
        self.registry = CollectorRegistry(auto_describe=False)
        self.publishes = Counter(
            "kvfs_publish_total",
            "NodePublishVolume calls by result: ok (mounted), republished (token handed on), or the gRPC code",
            ["result"],
            registry=self.registry,
        )
        self.publish_seconds = Histogram(
            "kvfs_publish_duration_seconds",
            "NodePublishVolume duration (preflight and daemon start included)",
            buckets=PUBLISH_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(self)
        self.scrape_errors = 0
        self._last: dict[tuple[str, int], Snapshot] = {}  # (target, daemon pid) → its last answer
        self._gone = Totals()  # the last answers of daemons no longer ready
        self._lock = threading.Lock()  # scrapes may overlap
        self._pool = ThreadPoolExecutor(SCRAPE_WORKERS, thread_name_prefix="metrics")

    def observe_publish(self, publish: Callable[[T], bool]) -> Callable[[T], bool]:
        """`publish` (True: mounted, False: republished), timed and counted by result."""

        def observed(request: T) -> bool:
            started = time.monotonic()
            result = "internal"
            try:
                mounted = publish(request)
                result = "ok" if mounted else "republished"
                return mounted
            except RequestError as exc:
                result = exc.code.lower()
                raise
            finally:
                self.publishes.labels(result=result).inc()
                self.publish_seconds.observe(time.monotonic() - started)

        return observed

    def serve(self, addr: str) -> None:
        """Serve on `addr` (HOST:PORT) from a thread: the metrics only, no debug endpoints."""
        host, port = parse_addr(addr)
        start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, port)

    # -- prometheus_client's Collector -------------------------------------------------------------

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            states = self.volumes.store.all()
            ready = [s for s in states if s.phase == "ready"]
            answers = self._ask({(s.target_path, s.pid): s for s in ready})
            totals = self._gone.copy()
            for snapshot in answers.values():
                totals.add(snapshot)
        health = dict(self.volumes.health)
        yield volume_family(
            "starting" if s.phase != "ready" else (health[s.target_path].health.value if s.target_path in health else "healthy")
            for s in states
        )
        errors = CounterMetricFamily("kvfs_scrape_errors", "Daemons that did not answer a scrape in time")
        errors.add_metric([], self.scrape_errors)
        yield errors
        yield from totals.families()

    def _ask(self, ready: dict[tuple[str, int], Any]) -> dict[tuple[str, int], Snapshot]:
        """Every ready daemon's answer (or its last one); forgets daemons that are gone."""
        for key in set(self._last) - set(ready):
            self._gone.add(self._last.pop(key))
        futures = {key: self._pool.submit(self._metrics_of, key[0]) for key in ready}
        wait(futures.values(), timeout=self.timeout + 1.0)
        for key, future in futures.items():
            answer = future.result() if future.done() else None
            if answer is None:
                self.scrape_errors += 1
                log.debug("volume %s: no metrics this scrape", ready[key].volume_id)
            else:
                self._last[key] = answer
        return {key: self._last[key] for key in ready if key in self._last}

    def _metrics_of(self, target: str) -> Snapshot | None:
        try:
            return ControlClient(str(self.volumes.store.control_socket(target)), timeout=self.timeout).metrics()
        except (jsonline.ProtocolError, ControlError, ValueError):
            return None

