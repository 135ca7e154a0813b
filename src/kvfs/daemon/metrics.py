"""What one daemon counts, for Prometheus: Key Vault and token requests, reads, cache hits,
refreshes and rotations.

A daemon keeps plain counters (a CSI daemon serves no HTTP and holds no registry). They leave it
as a JSON snapshot: on the control socket's `metrics` op, which the CSI plugin asks of every
volume at scrape time and sums (kvfs.csi.metrics), or through `kvfs mount --metrics-addr`
(`serve_mount_metrics`). `COUNTERS` and `HISTOGRAMS` are the one list of names, label names and
the values each label may take: every snapshot is read through them (`merge`), so nothing a
daemon sends can add a series, and no label is ever a pod or an object name.

Where the counting happens: `CountingTransport` (every Key Vault request, whatever the layer that
sent it), `CountedCredential` (every token request of the volume's identity), `MeteredCore` (what
readers got); refreshes come from the cache's statistics, rotations from the daemon's ObjectWatch.
"""

from __future__ import annotations

import errno as _errno
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import cachetools
import httpx

if TYPE_CHECKING:  # prometheus_client loads where metrics are exposed, not in every daemon (start-up time)
    from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from kvfs.auth.base import AccessToken, Credential
from kvfs.cache.base import CacheStats
from kvfs.errors import ConfigError, KvfsError
from kvfs.fs.core import Attr, FilesystemCore, FsError
from kvfs.net.circuit import origin

log = logging.getLogger(__name__)

KINDS = ("secret", "key", "cert", "other")  # `other`: the preflight's GET / on the vault host
CODES = ("1xx", "2xx", "3xx", "4xx", "5xx", "error")  # HTTP status class, or no answer at all
READ_RESULTS = ("ok", "enoent", "eacces", "eio")
TOKEN_RESULTS = ("ok", "refused", "error")  # refused: the identity provider said no (EACCES)
REFRESH_RESULTS = ("ok", "error")
VOLUME_STATES = ("starting", "healthy", "dead", "hung", "unmounted")
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0)
PUBLISH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Labels = tuple[tuple[str, str], ...]  # ((label name, value), ...) in the order of the spec

# name → (help, ((label name, allowed values), ...)); docs/METRICS.md documents each
COUNTERS: dict[str, tuple[str, tuple[tuple[str, tuple[str, ...]], ...]]] = {
    "kvfs_keyvault_requests_total": (
        "Key Vault requests (each attempt), by object kind and HTTP status class (error: no answer)",
        (("kind", KINDS), ("code", CODES)),
    ),
    "kvfs_token_requests_total": (
        "Token requests at Entra ID, IMDS or NMI (each exchange), by result",
        (("result", TOKEN_RESULTS),),
    ),
    "kvfs_reads_total": (
        "Opens of object files (ok) and reads that failed because of Key Vault or Entra ID, by result",
        (("result", READ_RESULTS),),
    ),
    "kvfs_cache_hits_total": ("Opens served from memory: the version had been served to an earlier open", ()),
    "kvfs_refresh_total": ("Background refreshes of objects that were read, by result", (("result", REFRESH_RESULTS),)),
    "kvfs_rotations_total": ("Objects that started showing another version", ()),
}
HISTOGRAMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "kvfs_keyvault_request_duration_seconds": ("Key Vault request duration (each attempt)", REQUEST_BUCKETS),
}

Snapshot = dict[str, Any]  # {"counters": {name: [[labels, value], ...]}, "histograms": {name: {...}}}


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else "error"


def kind_of(path: str) -> str:
    """The object kind a Key Vault request path addresses (`/secrets/NAME/...` → secret)."""
    first = path.strip("/").split("/", 1)[0]
    return {"secrets": "secret", "keys": "key", "certificates": "cert"}.get(first, "other")


def read_result(err: int) -> str:
    return {_errno.ENOENT: "enoent", _errno.EACCES: "eacces", _errno.EPERM: "eacces"}.get(err, "eio")


class Histogram:
    """Counts per bucket (cumulative on output), their sum and count; fixed buckets."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one: +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))
        self.counts[index] += 1
        self.sum += value

    def to_json(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.sum}


class DaemonMetrics:
    """The counters one daemon keeps; `snapshot()` is its answer to the control socket's `metrics`."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()  # (kind, code)
        self.durations = Histogram(REQUEST_BUCKETS)
        self.tokens: Counter[str] = Counter()
        self.reads: Counter[str] = Counter()
        self.cache_hits = 0

    def keyvault_request(self, kind: str, code: str, seconds: float) -> None:
        self.requests[(kind, code)] += 1
        self.durations.observe(seconds)

    def snapshot(self, stats: CacheStats, rotations: int) -> Snapshot:
        """The counters as JSON; `stats` and `rotations` from the cache and the daemon's ObjectWatch."""
        refresh_failures = stats.refresh_failures
        counters: dict[str, list[list[Any]]] = {
            "kvfs_keyvault_requests_total": [[{"kind": k, "code": c}, n] for (k, c), n in self.requests.items()],
            "kvfs_token_requests_total": [[{"result": r}, n] for r, n in self.tokens.items()],
            "kvfs_reads_total": [[{"result": r}, n] for r, n in self.reads.items()],
            "kvfs_cache_hits_total": [[{}, self.cache_hits]],
            "kvfs_refresh_total": [[{"result": "ok"}, stats.refreshes], [{"result": "error"}, refresh_failures]],
            "kvfs_rotations_total": [[{}, rotations]],
        }
        return {"counters": counters, "histograms": {"kvfs_keyvault_request_duration_seconds": self.durations.to_json()}}


# ---- where the counting happens ----------------------------------------------------------------


class CountingTransport(httpx.AsyncBaseTransport):
    """Counts each request to the vault's host (status class or `error`, and its duration)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, vault_url: str, metrics: DaemonMetrics) -> None:
        self.inner = inner
        self.vault = origin(httpx.URL(vault_url))
        self.metrics = metrics

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if origin(request.url) != self.vault:
            return await self.inner.handle_async_request(request)
        started = time.perf_counter()
        code = "error"
        try:
            response = await self.inner.handle_async_request(request)
            code = status_class(response.status_code)
            return response
        finally:
            self.metrics.keyvault_request(kind_of(request.url.path), code, time.perf_counter() - started)

    async def aclose(self) -> None:
        await self.inner.aclose()


class CountedCredential:
    """A token flow whose every exchange is counted: ok, refused (EACCES) or error."""

    def __init__(self, inner: Credential, metrics: DaemonMetrics) -> None:
        self.inner = inner
        self.metrics = metrics

    def __repr__(self) -> str:
        return repr(self.inner)

    async def get_token(self, scope: str) -> AccessToken:
        try:
            token = await self.inner.get_token(scope)
        except KvfsError as exc:
            self.metrics.tokens["refused" if exc.errno == _errno.EACCES else "error"] += 1
            raise
        self.metrics.tokens["ok"] += 1
        return token

    async def aclose(self) -> None:
        await self.inner.aclose()


class MeteredCore(FilesystemCore):
    """The file tree, counting what readers got.

    A read is an open of an object file (`ok`), or a lookup, listing or open that failed because
    a load failed (its errno: `enoent`, `eacces`, else `eio`); a name that is not in the
    configuration is no read. A cache hit is an open of a version an earlier open already got:
    the first open of each version is what it cost to fetch.
    """

    SERVED = 65536  # versions remembered as served; an older one's next open counts as a miss

    def __init__(self, *args: Any, metrics: DaemonMetrics, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metrics = metrics
        self._served: cachetools.LRUCache[int, bool] = cachetools.LRUCache(self.SERVED)

    def _failed(self, exc: FsError) -> None:
        if isinstance(exc.__cause__, KvfsError):  # the cache's failure, not an unknown name
            self.metrics.reads[read_result(exc.errno)] += 1

    async def lookup(self, parent_inode: int, name: str) -> Attr:
        try:
            return await super().lookup(parent_inode, name)
        except FsError as exc:
            self._failed(exc)
            raise

    async def readdir(self, inode: int) -> list[tuple[str, Attr]]:
        try:
            return await super().readdir(inode)
        except FsError as exc:
            self._failed(exc)
            raise

    def open_cached(self, inode: int, flags: int) -> int | None:
        fh = super().open_cached(inode, flags)
        if fh is not None:
            self._opened(inode)
        return fh

    async def open(self, inode: int, flags: int) -> int:
        fh = self.open_cached(inode, flags)
        if fh is not None:
            return fh
        try:
            # its own first step, open_cached, finds nothing new: no await came in between
            fh = await super().open(inode, flags)
        except FsError as exc:
            self._failed(exc)
            raise
        self._opened(inode)
        return fh

    def _opened(self, inode: int) -> None:
        self.metrics.reads["ok"] += 1
        if self._served.get(inode):
            self.metrics.cache_hits += 1
        self._served[inode] = True


# ---- snapshots → Prometheus --------------------------------------------------------------------


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def _labels(spec: Sequence[tuple[str, tuple[str, ...]]], given: object) -> Labels | None:
    """The labels in spec order, if `given` has exactly the spec's names with allowed values."""
    if not isinstance(given, Mapping) or set(given) != {name for name, _ in spec}:
        return None
    labels = tuple((name, given[name]) for name, _ in spec)
    return labels if all(value in allowed for (_, value), (_, allowed) in zip(labels, spec)) else None


class Totals:
    """Snapshots summed, each read through COUNTERS and HISTOGRAMS (the rest is dropped)."""

    def __init__(self) -> None:
        self.counters: dict[str, Counter[Labels]] = {name: Counter() for name in COUNTERS}
        self.histograms: dict[str, Histogram] = {name: Histogram(b) for name, (_, b) in HISTOGRAMS.items()}

    def copy(self) -> Totals:
        other = Totals()
        for name, counter in self.counters.items():
            other.counters[name] = Counter(counter)
        for name, histogram in self.histograms.items():
            other.histograms[name].counts, other.histograms[name].sum = list(histogram.counts), histogram.sum
        return other

    def add(self, snapshot: object) -> None:
        if not isinstance(snapshot, Mapping):
            return
        counters, histograms = snapshot.get("counters"), snapshot.get("histograms")
        for name, rows in (counters.items() if isinstance(counters, Mapping) else ()):
            if name not in COUNTERS or not isinstance(rows, list):
                continue
            for row in rows:
                if isinstance(row, list) and len(row) == 2:
                    labels, value = _labels(COUNTERS[name][1], row[0]), _number(row[1])
                    if labels is not None and value is not None:
                        self.counters[name][labels] += int(value)
        for name, data in (histograms.items() if isinstance(histograms, Mapping) else ()):
            histogram = self.histograms.get(name)
            if histogram is None or not isinstance(data, Mapping) or not isinstance(data.get("counts"), list):
                continue
            counts = [_number(n) for n in data["counts"]]
            total = _number(data.get("sum"))
            if len(counts) == len(histogram.counts) and total is not None and None not in counts:
                histogram.counts = [a + int(b or 0) for a, b in zip(histogram.counts, counts)]
                histogram.sum += total

    def families(self) -> list[Metric]:
        """Every series of the spec, zeros included (dashboards and alerts see them from the start)."""
        from prometheus_client.core import CounterMetricFamily

        out: list[Metric] = []
        for name, (text, spec) in COUNTERS.items():
            family = CounterMetricFamily(name, text, labels=[label for label, _ in spec])
            for labels in _combinations(spec):
                family.add_metric([value for _, value in labels], self.counters[name][labels])
            out.append(family)
        for name, (text, buckets) in HISTOGRAMS.items():
            out.append(histogram_family(name, text, self.histograms[name]))
        return out


def _combinations(spec: Sequence[tuple[str, tuple[str, ...]]]) -> list[Labels]:
    combos: list[Labels] = [()]
    for name, values in spec:
        combos = [(*combo, (name, value)) for combo in combos for value in values]
    return combos


def histogram_family(name: str, text: str, histogram: Histogram) -> HistogramMetricFamily:
    from prometheus_client.core import HistogramMetricFamily

    cumulative, running = [], 0
    for bound, count in zip([*map(str, histogram.buckets), "+Inf"], histogram.counts):
        running += count
        cumulative.append((bound, float(running)))
    return HistogramMetricFamily(name, text, buckets=cumulative, sum_value=histogram.sum)


def volume_family(states: Iterable[str]) -> GaugeMetricFamily:
    """`kvfs_volumes{state}`: how many volumes are in each state (every state, zeros included)."""
    from prometheus_client.core import GaugeMetricFamily

    counted = Counter(states)
    family = GaugeMetricFamily("kvfs_volumes", "Volumes by state", labels=["state"])
    for state in VOLUME_STATES:
        family.add_metric([state], counted[state])
    return family


# ---- `kvfs mount --metrics-addr` -----------------------------------------------------------------


def parse_addr(addr: str, flag: str = "--metrics-addr") -> tuple[str, int]:
    """`HOST:PORT` (HOST may be empty: every address) → (host, port); a ConfigError names the fix."""
    host, sep, port_text = addr.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(flag, addr, "expected HOST:PORT", "e.g. 127.0.0.1:8095, or :8095 for every address")
    return host.strip("[]") or "0.0.0.0", int(port_text)


class MountCollector:
    """The metrics of one `kvfs mount`: its daemon's counters, and the mount itself as one volume."""

    def __init__(self, snapshot: Callable[[], Snapshot], ready: Callable[[], float | None]) -> None:
        self._snapshot = snapshot
        self._ready = ready  # seconds from start to FUSE_INIT, None before

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily

        totals = Totals()
        totals.add(self._snapshot())
        ready = self._ready()
        yield volume_family(["healthy"] if ready is not None else ["starting"])
        publishes = CounterMetricFamily("kvfs_publish_total", "Volumes mounted (this mount: one)", labels=["result"])
        publishes.add_metric(["ok"], 1 if ready is not None else 0)
        yield publishes
        took = Histogram(PUBLISH_BUCKETS)
        if ready is not None:
            took.observe(ready)
        yield histogram_family("kvfs_publish_duration_seconds", "Time to mount (preflight included)", took)
        yield from totals.families()


def serve_mount_metrics(addr: str, collector: MountCollector) -> Callable[[], None]:
    """Serve `collector` on `addr` (HOST:PORT) in a thread; the function that stops it.

    Only the metrics: the listener answers nothing else (no debug or profiling endpoints).
    """
    from prometheus_client import CollectorRegistry, start_http_server

    host, port = parse_addr(addr)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError("--metrics-addr", addr, f"cannot listen ({exc.strerror or exc})", "choose a free port") from None
    log.info("metrics on http://%s:%d/metrics", host, port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop
