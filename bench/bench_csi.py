"""CSI benchmark: NodePublishVolume latency for N volumes and the private memory each volume adds.

Acts as kubelet against a real `kvfs csi node` process (which starts its mounter), publishing N
inline volumes one after the other, then reads /proc/PID/smaps_rollup of every daemon.
Needs root and /dev/fuse. Default daemon: the stand-in (no Key Vault); with
`--daemon-entry kvfs.daemon.entry:run_volume` pass real parameters with `--param KEY=VALUE`.
`--real` runs the real daemon against an emulator started in this process: every volume gets
its own service account, federated app and token, and the first read of every volume (the Key
Vault GET through FUSE; the identity preflight made the token exchange during the publish) and
a cached re-read are timed too.

    python bench/bench_csi.py [--volumes 50] [--real]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc

from kvfs.csi.mounter import MounterClient
from kvfs.csi.mounters import MounterRegistry
from kvfs.csi.proto import load
from kvfs.csi.state import StateStore

pb2, pb2_grpc = load()

DEFAULT_PARAMS = {
    "keyvaultName": "kvfs-bench",
    "tenantID": "72f988bf-86f1-41af-91ab-2d7cd011db47",
    "clientID": "00000000-0000-0000-0000-0000000000c1",
    "objects": "array:\n  - |\n    objectName: demo-secret\n    objectType: secret\n",
    "csi.storage.k8s.io/pod.name": "bench",
    "csi.storage.k8s.io/pod.namespace": "default",
    "csi.storage.k8s.io/serviceAccount.tokens": json.dumps(
        {"api://AzureADTokenExchange": {"token": "eyJ.bench.token", "expirationTimestamp": "2030-01-01T00:00:00Z"}}
    ),
}


def smaps_rollup(pid: int) -> dict[str, int]:
    """kB values of /proc/PID/smaps_rollup (Rss, Pss, Private_Clean, Private_Dirty, ...)."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0])
    return values


def uss(m: dict[str, int]) -> int:
    return m["Private_Clean"] + m["Private_Dirty"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


REAL_DAEMON = "kvfs.daemon.entry:run_volume"
SECRET_NAME = "demo-secret"


class RealVolumes:
    """An in-process emulator and one identity per volume, for the real daemon.

    Daemons read the CA (SSL_CERT_FILE) and the cloud env file before they drop to their own
    uids; the plugin reads cloud env files only from the emulator's folder (--cloud-env-dir).
    """

    def __init__(self, stack: ExitStack) -> None:
        from kvfs.emulator.server import EmulatorThread

        self.dir = tempfile.mkdtemp(prefix="kvfsbench-emu-", dir="/tmp")
        stack.callback(shutil.rmtree, self.dir, True)
        self.emu = stack.enter_context(EmulatorThread(Path(self.dir), vaults=("bench",)))
        self.value = "bench-value-" + os.urandom(8).hex()
        self.emu.set_secret("bench", SECRET_NAME, self.value)

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
            "objects": f"array:\n  - |\n    objectName: {SECRET_NAME}\n    objectType: secret\n",
            "csi.storage.k8s.io/pod.name": f"pod-{i}",
            "csi.storage.k8s.io/pod.namespace": ns,
            "csi.storage.k8s.io/serviceAccount.name": sa,
            "csi.storage.k8s.io/serviceAccount.tokens": json.dumps(
                {"api://AzureADTokenExchange": {"token": token, "expirationTimestamp": "2030-01-01T00:00:00Z"}}
            ),
        }


def timed_read(path: str) -> tuple[float, bytes]:
    start = time.perf_counter()
    data = Path(path).read_bytes()
    return (time.perf_counter() - start) * 1000, data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=50)
    parser.add_argument("--daemon-entry", default="kvfs.daemon.standin:run")
    parser.add_argument("--param", action="append", default=[], help="KEY=VALUE overriding a volume attribute")
    parser.add_argument(
        "--real", action="store_true", help=f"the real daemon ({REAL_DAEMON}) against an in-process emulator"
    )
    args = parser.parse_args()
    if args.real:
        args.daemon_entry = REAL_DAEMON
    overrides = dict(item.partition("=")[::2] for item in args.param)
    with ExitStack() as stack:
        real = RealVolumes(stack) if args.real else None
        return run(args, overrides, real)


def run(args: argparse.Namespace, overrides: dict[str, str], real: RealVolumes | None) -> int:
    def volume_params(i: int) -> dict[str, str]:
        return {**(real.params(i) if real else DEFAULT_PARAMS), **overrides}

    first_reads: list[float] = []
    cached_reads: list[float] = []
    state_dir = tempfile.mkdtemp(prefix="kvfsbench-", dir="/tmp")
    endpoint = f"unix://{state_dir}/csi.sock"
    log = open(os.path.join(state_dir, "plugin.log"), "ab")
    plugin = subprocess.Popen(
        [sys.executable, "-m", "kvfs.csi.cli", "node", "--endpoint", endpoint, "--node-id", "bench",
         "--state-dir", state_dir, "--daemon-entry", args.daemon_entry, "--log-level", "WARNING",
         "--mounter-log", os.path.join(state_dir, "mounter.log"), "--kubelet-dir", state_dir,
         "--allow-inline-parameters", *(("--cloud-env-dir", real.dir) if real else ())],
        stdout=log, stderr=log, env=real.env() if real else None,
    )  # fmt: skip
    channel = grpc.insecure_channel(endpoint)
    node = pb2_grpc.NodeStub(channel)
    targets: list[str] = []
    latencies: list[float] = []
    params: dict[str, Any] = {}
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        # daemons fork from the mounter's zygote: its pages are the ones they share
        registry = MounterRegistry(state_dir)
        mounter = MounterClient(registry.socket_path(registry.live()[0].id))  # the one the plugin started
        zygote_pid = int((mounter.ping() or {"zygote": 0})["zygote"])
        zygote_before = smaps_rollup(zygote_pid)
        cap = pb2.VolumeCapability(mount=pb2.VolumeCapability.MountVolume())
        for i in range(args.volumes):
            target = os.path.join(state_dir, "pods", f"pod-{i}", "mount")
            os.makedirs(os.path.dirname(target))
            params = volume_params(i)
            req = pb2.NodePublishVolumeRequest(
                volume_id=f"bench-{i}", target_path=target, readonly=True, volume_capability=cap,
                volume_context=params,
            )  # fmt: skip
            start = time.perf_counter()
            node.NodePublishVolume(req, timeout=120)
            latencies.append((time.perf_counter() - start) * 1000)
            targets.append(target)
        if real is not None:
            for target in targets:
                elapsed, data = timed_read(os.path.join(target, SECRET_NAME))
                if data != real.value.encode():
                    raise SystemExit(f"{target}: read {len(data)} unexpected bytes")
                first_reads.append(elapsed)
            for target in targets:
                cached_reads.append(timed_read(os.path.join(target, SECRET_NAME))[0])
        store = StateStore(state_dir)
        daemons = [smaps_rollup(store.load(t).pid) for t in targets]  # type: ignore[union-attr]
        zygote_after = smaps_rollup(zygote_pid)
        start = time.perf_counter()
        req_re = pb2.NodePublishVolumeRequest(
            volume_id=f"bench-{len(targets) - 1}", target_path=targets[-1], readonly=True, volume_capability=cap,
            volume_context=params,
        )  # fmt: skip
        for _ in range(20):
            node.NodePublishVolume(req_re, timeout=30)
        republish_ms = (time.perf_counter() - start) * 1000 / 20
    finally:
        for i, target in enumerate(targets):
            try:
                node.NodeUnpublishVolume(
                    pb2.NodeUnpublishVolumeRequest(volume_id=f"bench-{i}", target_path=target), timeout=30
                )
            except grpc.RpcError as exc:
                print(f"unpublish {target}: {exc}", file=sys.stderr)
        plugin.terminate()
        plugin.wait(10)
        for mounter in MounterRegistry(state_dir).live():
            os.kill(mounter.pid, 15)
        log.close()
        shutil.rmtree(state_dir, ignore_errors=True)

    mean = statistics.mean
    rows = [
        ("volumes published", f"{len(latencies)}"),
        ("daemon", args.daemon_entry),
        ("publish latency median", f"{statistics.median(latencies):.1f} ms"),
        ("publish latency p99", f"{percentile(latencies, 0.99):.1f} ms"),
        ("publish latency max", f"{max(latencies):.1f} ms"),
        ("republish (token push) mean", f"{republish_ms:.1f} ms"),
    ]
    if first_reads:
        rows += [
            ("first read (GET; the token came with the publish) median", f"{statistics.median(first_reads):.1f} ms"),
            ("first read max", f"{max(first_reads):.1f} ms"),
            ("cached re-read median", f"{statistics.median(cached_reads):.2f} ms"),
        ]
    rows += [
        ("zygote Pss / USS", f"{zygote_before['Pss'] / 1024:.1f} / {uss(zygote_before) / 1024:.1f} MiB"),
        ("zygote USS change (pages now shared)", f"{(uss(zygote_after) - uss(zygote_before)) / 1024:.1f} MiB"),
        ("per volume: daemon Rss (mean)", f"{mean(d['Rss'] for d in daemons) / 1024:.1f} MiB"),
        ("per volume: daemon Pss (mean)", f"{mean(d['Pss'] for d in daemons) / 1024:.1f} MiB"),
        ("per volume: daemon USS (mean)", f"{mean(uss(d) for d in daemons) / 1024:.1f} MiB"),
        ("USS / Rss (shared by fork)", f"{mean(uss(d) for d in daemons) / mean(d['Rss'] for d in daemons):.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'metric'.ljust(width)}  value")
    print(f"{'-' * width}  {'-' * 24}")
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
