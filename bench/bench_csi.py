"""CSI benchmark: a node's worth of volumes — publish latency, memory, first reads, Key Vault load.

Acts as kubelet against a real `kvfs csi node` process (which starts its mounter and zygote),
publishing N inline volumes one after the other. Needs root and /dev/fuse. Default daemon: the
stand-in (no Key Vault); `--real` runs the real daemon (kvfs.daemon.entry:run_volume) against an
emulator started in this process: every volume has its own service account, federated app and
token, and reads its K objects through FUSE (the identity preflight exchanged the token during
the publish, so a first read is a Key Vault GET).

Reported: publish latency p50/p99/max; first and cached reads; memory of every kvfs process on
the node (plugin, mounter, zygote, daemons: the sum of PSS is the honest total, USS what each
process alone holds) and of one volume's daemon; with `--real`, the Key Vault request rate,
measured over a window at a short refresh interval and compared with the formula
(N·K / (0.95 · interval) GETs per second: refreshes are jittered to 90-100 % of the interval;
plus N / (token lifetime - refresh margin) token exchanges), then scaled to the default
interval. `--smaps` adds where one daemon's private pages are, per mapping, before and after
its first reads.

    python bench/bench_csi.py --real [--volumes 50] [--objects 10] [--smaps]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import grpc

from kvfs.auth.cache import refresh_margin_for
from kvfs.cache.refresh import NEXT_REFRESH
from kvfs.config.model import DEFAULT_REFRESH_INTERVAL
from kvfs.csi.mounter import MounterClient
from kvfs.csi.mounters import MounterRegistry
from kvfs.csi.proto import load
from kvfs.csi.state import StateStore

pb2, pb2_grpc = load()

REAL_DAEMON = "kvfs.daemon.entry:run_volume"
KEY_VAULT_LIMIT = 4000  # GET transactions per 10 s per vault (secrets, keys, certificates): README
TOKEN_AUDIENCE = "api://AzureADTokenExchange"

DEFAULT_PARAMS = {
    "keyvaultName": "kvfs-bench",
    "tenantID": "72f988bf-86f1-41af-91ab-2d7cd011db47",
    "clientID": "00000000-0000-0000-0000-0000000000c1",
    "objects": "array:\n  - |\n    objectName: demo-secret\n    objectType: secret\n",
    "csi.storage.k8s.io/pod.name": "bench",
    "csi.storage.k8s.io/pod.namespace": "default",
    "csi.storage.k8s.io/serviceAccount.tokens": json.dumps(
        {TOKEN_AUDIENCE: {"token": "eyJ.bench.token", "expirationTimestamp": "2030-01-01T00:00:00Z"}}
    ),
}


# ----- memory ------------------------------------------------------------------------------


def smaps_rollup(pid: int) -> dict[str, int]:
    """kB values of /proc/PID/smaps_rollup (Rss, Pss, Private_Clean, Private_Dirty, ...)."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0])
    return values


def uss(m: dict[str, int]) -> int:
    return m["Private_Clean"] + m["Private_Dirty"]


def private_by_mapping(pid: int) -> Counter[str]:
    """Private kB per mapping of /proc/PID/smaps: a file's base name, [heap], [stack] or [anon]."""
    out: Counter[str] = Counter()
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            name = os.path.basename(head[5]) if len(head) == 6 else "[anon]"
        elif head and head[0] in ("Private_Clean:", "Private_Dirty:"):
            out[name] += int(head[1])
    return out


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# ----- volumes -----------------------------------------------------------------------------


def object_names(count: int) -> list[str]:
    return [f"bench-{i:02d}" for i in range(count)]


def objects_param(names: list[str]) -> str:
    return "array:\n" + "".join(f"  - |\n    objectName: {n}\n    objectType: secret\n" for n in names)


class RealVolumes:
    """An in-process emulator and one identity per volume, for the real daemon.

    Daemons read the CA (SSL_CERT_FILE) and the cloud env file before they drop to their own
    uids; the plugin reads cloud env files only from the emulator's folder (--cloud-env-dir).
    """

    def __init__(self, stack: ExitStack, objects: int, refresh_interval: float, token_lifetime: int) -> None:
        from kvfs.emulator.server import EmulatorThread

        self.dir = tempfile.mkdtemp(prefix="kvfsbench-emu-", dir="/tmp")
        stack.callback(shutil.rmtree, self.dir, True)
        self.emu = stack.enter_context(
            EmulatorThread(Path(self.dir), vaults=("bench",), token_lifetime=token_lifetime)
        )
        self.names = object_names(objects)
        self.values = {}
        for name in self.names:
            self.values[name] = (f"{name}-value-" + os.urandom(8).hex()).encode()
            self.emu.set_secret("bench", name, self.values[name].decode())
        self.refresh_interval = refresh_interval

    def env(self) -> dict[str, str]:
        return {**os.environ, "SSL_CERT_FILE": str(self.emu.ca_file)}

    def params(self, i: int) -> dict[str, str]:
        """Inline parameters and a fresh token for pod i, whose service account has its own app."""
        ns, sa = f"bench-{i}", "workload"
        identity = self.emu.identity
        app = identity.add_app()
        identity.add_federated_credential(
            app.client_id, issuer=self.emu.oidc_issuer, subject=f"system:serviceaccount:{ns}:{sa}"
        )
        self.emu.grant("bench", app.client_id)
        token = identity.mint_sa_token(ns, sa, pod=f"pod-{i}")
        return {
            "keyvaultName": "bench",
            "tenantId": self.emu.tenant_id,
            "clientID": app.client_id,
            "cloudName": "AzureStackCloud",
            "cloudEnvFileName": str(self.emu.cloud_env_file),
            "objects": objects_param(self.names),
            "refreshInterval": f"{self.refresh_interval:g}s",
            "csi.storage.k8s.io/pod.name": f"pod-{i}",
            "csi.storage.k8s.io/pod.namespace": ns,
            "csi.storage.k8s.io/serviceAccount.name": sa,
            "csi.storage.k8s.io/serviceAccount.tokens": json.dumps(
                {TOKEN_AUDIENCE: {"token": token, "expirationTimestamp": "2030-01-01T00:00:00Z"}}
            ),
        }

    def requests(self) -> tuple[int, int]:
        """(Key Vault GETs of secrets, token exchanges) counted by the emulator since the last reset."""
        return self.emu.count(route="get_secret"), self.emu.count(route="token")


def timed_read(path: str) -> tuple[float, bytes]:
    start = time.perf_counter()
    data = Path(path).read_bytes()
    return (time.perf_counter() - start) * 1000, data


class Node:
    """A `kvfs csi node` process (with its mounter and zygote), driven as kubelet drives it."""

    def __init__(self, stack: ExitStack, daemon_entry: str, real: RealVolumes | None) -> None:
        self.state_dir = tempfile.mkdtemp(prefix="kvfsbench-", dir="/tmp")
        stack.callback(shutil.rmtree, self.state_dir, True)
        endpoint = f"unix://{self.state_dir}/csi.sock"
        log = open(os.path.join(self.state_dir, "plugin.log"), "ab")
        stack.callback(log.close)
        self.plugin = subprocess.Popen(
            [sys.executable, "-m", "kvfs.csi.cli", "node", "--endpoint", endpoint, "--node-id", "bench",
             "--state-dir", self.state_dir, "--daemon-entry", daemon_entry, "--log-level", "WARNING",
             "--mounter-log", os.path.join(self.state_dir, "mounter.log"), "--kubelet-dir", self.state_dir,
             "--allow-inline-parameters", *(("--cloud-env-dir", real.dir) if real else ())],
            stdout=log, stderr=log, env=real.env() if real else None,
        )  # fmt: skip
        stack.callback(self._stop)
        self.channel = grpc.insecure_channel(endpoint)
        self.stub = pb2_grpc.NodeStub(self.channel)
        self.cap = pb2.VolumeCapability(mount=pb2.VolumeCapability.MountVolume())
        self.targets: list[str] = []
        grpc.channel_ready_future(self.channel).result(timeout=60)
        registry = MounterRegistry(self.state_dir)
        info = MounterClient(registry.socket_path(registry.live()[0].id)).ping() or {}  # the one the plugin started
        self.mounter_pid, self.zygote_pid = int(info.get("pid") or 0), int(info.get("zygote") or 0)
        stack.callback(self._unpublish_all)

    def publish(self, i: int, params: dict[str, str]) -> float:
        """NodePublishVolume of volume i; its latency in ms."""
        target = os.path.join(self.state_dir, "pods", f"pod-{i}", "mount")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        request = pb2.NodePublishVolumeRequest(
            volume_id=f"bench-{i}", target_path=target, readonly=True, volume_capability=self.cap,
            volume_context=params,
        )  # fmt: skip
        start = time.perf_counter()
        self.stub.NodePublishVolume(request, timeout=120)
        elapsed = (time.perf_counter() - start) * 1000
        if target not in self.targets:
            self.targets.append(target)
        return elapsed

    def daemon_pids(self) -> list[int]:
        store = StateStore(self.state_dir)
        return [store.load(t).pid for t in self.targets]  # type: ignore[union-attr]

    def _unpublish_all(self) -> None:
        for i, target in enumerate(self.targets):
            try:
                self.stub.NodeUnpublishVolume(
                    pb2.NodeUnpublishVolumeRequest(volume_id=f"bench-{i}", target_path=target), timeout=30
                )
            except grpc.RpcError as exc:
                print(f"unpublish {target}: {exc}", file=sys.stderr)

    def _stop(self) -> None:
        self.plugin.terminate()
        self.plugin.wait(30)
        for mounter in MounterRegistry(self.state_dir).live():
            os.kill(mounter.pid, 15)


# ----- the run -----------------------------------------------------------------------------


@contextmanager
def more_open_files() -> Iterator[None]:
    """Every volume keeps a few fds open here (grpc) and in the plugin; raise the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=50)
    parser.add_argument("--objects", type=int, default=10, help="objects per volume, each read once (--real)")
    parser.add_argument("--daemon-entry", default="kvfs.daemon.standin:run")
    parser.add_argument("--param", action="append", default=[], help="KEY=VALUE overriding a volume attribute")
    parser.add_argument(
        "--real", action="store_true", help=f"the real daemon ({REAL_DAEMON}) against an in-process emulator"
    )
    parser.add_argument(
        "--refresh-interval", type=float, default=20.0,
        help="the volumes' refreshInterval (s) while Key Vault requests are counted (--real)",
    )  # fmt: skip
    parser.add_argument(
        "--token-lifetime", type=int, default=60, help="the emulator's access token lifetime (s) (--real)"
    )
    parser.add_argument("--window", type=float, default=60.0, help="how long requests are counted (s) (--real; 0: not counted)")
    parser.add_argument("--smaps", action="store_true", help="one daemon's private memory per mapping")
    args = parser.parse_args()
    if args.real:
        args.daemon_entry = REAL_DAEMON
    overrides = dict(item.partition("=")[::2] for item in args.param)
    with ExitStack() as stack:
        stack.enter_context(more_open_files())
        real = RealVolumes(stack, args.objects, args.refresh_interval, args.token_lifetime) if args.real else None
        node = Node(stack, args.daemon_entry, real)
        rows, extra = run(args, overrides, node, real)
    print_table(rows)
    for line in extra:
        print(line)
    return 0


def run(
    args: argparse.Namespace, overrides: dict[str, str], node: Node, real: RealVolumes | None
) -> tuple[list[tuple[str, str]], list[str]]:
    extra: list[str] = []
    zygote_before = smaps_rollup(node.zygote_pid)
    latencies: list[float] = []
    params: dict[str, str] = {}
    for i in range(args.volumes):
        params = {**(real.params(i) if real else DEFAULT_PARAMS), **overrides}
        latencies.append(node.publish(i, params))
    pids = node.daemon_pids()
    probe = pids[len(pids) // 2]
    before_reads = private_by_mapping(probe) if args.smaps else Counter()
    first_reads: list[float] = []
    cached_reads: list[float] = []
    if real is not None:
        real.emu.reset_counts()
        for target in node.targets:
            for n, name in enumerate(real.names):
                elapsed, data = timed_read(os.path.join(target, name))
                if data != real.values[name]:
                    raise SystemExit(f"{target}/{name}: read {len(data)} unexpected bytes")
                if n == 0:
                    first_reads.append(elapsed)
        for target in node.targets:
            cached_reads.append(timed_read(os.path.join(target, real.names[0]))[0])
    daemons = [smaps_rollup(pid) for pid in pids]
    plugin, mounter, zygote = (smaps_rollup(p) for p in (node.plugin.pid, node.mounter_pid, node.zygote_pid))
    after_reads = private_by_mapping(probe) if args.smaps else Counter()

    start = time.perf_counter()
    for _ in range(20):
        node.publish(len(node.targets) - 1, params)
    republish_ms = (time.perf_counter() - start) * 1000 / 20

    mean = statistics.mean
    everything = [plugin, mounter, zygote, *daemons]
    rows = [
        ("volumes published", f"{len(latencies)}"),
        ("daemon", args.daemon_entry),
        ("publish latency p50", f"{statistics.median(latencies):.1f} ms"),
        ("publish latency p99", f"{percentile(latencies, 0.99):.1f} ms"),
        ("publish latency max", f"{max(latencies):.1f} ms"),
        ("republish (token push) mean", f"{republish_ms:.1f} ms"),
    ]
    if real is not None:
        rows += [
            ("objects read per volume", f"{len(real.names)}"),
            ("first read (GET; the token came with the publish) p50", f"{statistics.median(first_reads):.1f} ms"),
            ("first read max", f"{max(first_reads):.1f} ms"),
            ("cached re-read p50", f"{statistics.median(cached_reads):.2f} ms"),
        ]
    rows += [
        ("node total Pss (plugin+mounter+zygote+daemons)", mib(sum(m["Pss"] for m in everything))),
        ("node total USS", mib(sum(uss(m) for m in everything))),
        ("plugin / mounter / zygote Pss", " / ".join(mib(m["Pss"]) for m in (plugin, mounter, zygote))),
        ("zygote USS before / after the forks", f"{mib(uss(zygote_before))} / {mib(uss(zygote))}"),
        ("per volume: daemon Rss (mean)", mib(mean(d["Rss"] for d in daemons))),
        ("per volume: daemon Pss (mean)", mib(mean(d["Pss"] for d in daemons))),
        ("per volume: daemon USS (mean)", mib(mean(uss(d) for d in daemons))),
        ("per volume: daemon USS (max)", mib(max(uss(d) for d in daemons))),
    ]
    if real is not None and args.window > 0:
        rows += request_rates(args, real, len(node.targets))
    if args.smaps:
        extra += smaps_table(before_reads, after_reads)
    return rows, extra


def refresh_period(interval: float) -> float:
    """An object's mean time between refreshes once past its first (kvfs.cache.refresh jitter)."""
    return interval * sum(NEXT_REFRESH) / 2


def token_period(lifetime: float) -> float:
    """How often a daemon exchanges its token: when the first GET after its refresh-ahead point
    needs it (kvfs.auth.cache); with K objects refreshing at spread times, soon after that point."""
    return lifetime - refresh_margin_for(lifetime)


def request_rates(args: argparse.Namespace, real: RealVolumes, volumes: int) -> list[tuple[str, str]]:
    """Count the requests of a window at the short interval; the formula, checked, then scaled."""
    k, interval, window = len(real.names), args.refresh_interval, args.window
    time.sleep(interval)  # every object past its first refresh: the steady state the formula describes
    real.emu.reset_counts()
    time.sleep(window)
    gets, tokens = real.requests()
    want_gets = volumes * k * window / refresh_period(interval)
    want_tokens = volumes * window / token_period(args.token_lifetime)
    default = DEFAULT_REFRESH_INTERVAL
    rate = volumes * k / refresh_period(default)
    az_lifetime = 3600  # a Key Vault access token from Entra ID lives 60-90 minutes: the worst case
    return [
        (f"Key Vault GETs in {window:.0f} s at refreshInterval {interval:g}s",
         f"{gets} measured, {want_gets:.0f} by N*K*t/(0.95*interval) ({gets / want_gets:.2f}x)"),
        (f"token exchanges in {window:.0f} s (token lifetime {args.token_lifetime} s)",
         f"{tokens} measured, {want_tokens:.0f} by N*t/(lifetime - margin) ({tokens / want_tokens:.2f}x)"),
        (f"GETs per vault at the default refreshInterval ({default:g} s)",
         f"{rate:.1f}/s = {rate * 10:.0f} per 10 s (limit {KEY_VAULT_LIMIT})"),
        ("token exchanges at 1 h tokens", f"{volumes / token_period(az_lifetime) * 3600:.0f} per hour"),
    ]  # fmt: skip


def smaps_table(before: Counter[str], after: Counter[str]) -> list[str]:
    names = sorted(set(before) | set(after), key=lambda n: -after[n])
    lines = ["", "one daemon's private memory per mapping (kB)", f"{'mapping':40}  before reads  after reads"]
    for name in names[:20]:
        lines.append(f"{name[:40]:40}  {before[name]:12}  {after[name]:11}")
    lines.append(f"{'total':40}  {sum(before.values()):12}  {sum(after.values()):11}")
    return lines


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"{'metric'.ljust(width)}  value")
    print(f"{'-' * width}  {'-' * 24}")
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")


if __name__ == "__main__":
    raise SystemExit(main())
