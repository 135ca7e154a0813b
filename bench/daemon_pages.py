"""Where a forked daemon's private memory comes from, stage by stage.

This process plays the zygote (the same preload, shared system CAs, warm-up and gc.freeze as
kvfs.csi.zygote), forks one daemon and measures the child's USS after each stage of its life:
the fork itself, its configuration (parameters + TLS trust), serving (trio, the layers, the
identity preflight, the FUSE mount), its first read and nine more, against an emulator run as
a separate process. Then every private page of the child is classified against this process's
page at the same address (/proc/PID/pagemap): copied and still byte-identical (only reference
counts went up and down), copied and changed, or fresh (new memory). `--no-warm-up` and
`--no-shared-trust` leave out one zygote step each, to show what it buys. Needs root and
/dev/fuse; this process must stay otherwise idle while it measures.

    python bench/daemon_pages.py [--no-warm-up] [--no-shared-trust]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from kvfs.config.parameters import parse_parameters
from kvfs.daemon.entry import DEFAULT_ENTRY, load_entry, preload
from kvfs.daemon.volume import serve_volume
from kvfs.net import http as kvfs_http
from kvfs.net.http import preload_ssl_context

OBJECTS = 10
PAGE = 4096


def uss_kib(pid: int) -> int:
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0])
    return values["Private_Clean"] + values["Private_Dirty"]


def _pagemap(pid: int, lo: int, hi: int) -> tuple[int, ...]:
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(lo // PAGE * 8)
        data = f.read((hi - lo) // PAGE * 8)
    return struct.unpack(f"{len(data) // 8}Q", data)


def classify(child: int, parent: int) -> Counter[str]:
    """kB of the child's private pages: copied-identical / copied-changed / fresh, by kind of mapping."""
    out: Counter[str] = Counter()
    with open(f"/proc/{child}/mem", "rb") as cmem, open(f"/proc/{parent}/mem", "rb") as pmem:
        for line in Path(f"/proc/{child}/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)
            name = fields[5] if len(fields) == 6 else "[anon]"
            if name in ("[vvar]", "[vsyscall]", "[vdso]"):
                continue
            kind = name if name.startswith("[") else ("libpython" if "libpython" in name else "other files")
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            try:
                pages = zip(_pagemap(child, lo, hi), _pagemap(parent, lo, hi), strict=True)
            except (OSError, ValueError):
                continue
            for i, (mine, theirs) in enumerate(pages):
                if not (mine >> 63) & 1 or not (mine >> 56) & 1:  # not present, or shared
                    continue
                if not (theirs >> 63) & 1:
                    out[f"fresh {kind}"] += 4
                    continue
                cmem.seek(lo + i * PAGE)
                pmem.seek(lo + i * PAGE)
                same = cmem.read(PAGE) == pmem.read(PAGE)
                out[f"{'identical' if same else 'changed'} {kind}"] += 4
    return out


def start_emulator(folder: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    emu = subprocess.Popen(
        [sys.executable, "-m", "kvfs", "emulator", "--dir", folder], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    info_file = Path(folder, "emulator.json")
    deadline = time.monotonic() + 60
    while not info_file.exists():
        if emu.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the emulator did not start")
        time.sleep(0.1)
    return emu, json.loads(info_file.read_text())


def put_secrets(info: dict[str, Any]) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {info['admin_token']}"}
    with httpx.Client(verify=info["ca_file"]) as client:
        for i in range(OBJECTS):
            client.post(f"{info['admin_url']}/secrets", json={"vault": "demo", "name": f"s{i}", "value": f"v{i}"},
                        headers=headers).raise_for_status()  # fmt: skip


def volume_params(info: dict[str, Any]) -> dict[str, str]:
    token = Path(info["sa_token_file"]).read_text().strip()
    objects = "".join(f"  - |\n    objectName: s{i}\n    objectType: secret\n" for i in range(OBJECTS))
    return {
        "keyvaultName": "demo", "tenantId": info["tenant_id"], "clientID": info["app"]["client_id"],
        "cloudName": "AzureStackCloud", "cloudEnvFileName": info["cloud_env_file"],
        "csi.storage.k8s.io/pod.name": "pages", "csi.storage.k8s.io/pod.namespace": "default",
        "objects": "array:\n" + objects,
        "csi.storage.k8s.io/serviceAccount.tokens": json.dumps(
            {"api://AzureADTokenExchange": {"token": token, "expirationTimestamp": "2099-01-01T00:00:00Z"}}
        ),
    }  # fmt: skip


def child(params: dict[str, str], cloud_env_dir: str, mountpoint: str, go_r: int, done_w: int) -> None:
    """The daemon: waits for a go before each stage, says when it is done with it."""
    os.read(go_r, 1)
    config = parse_parameters(params, {}, context="csi", cloud_env_dir=cloud_env_dir)
    preload_ssl_context()
    os.write(done_w, b".")
    os.read(go_r, 1)
    os._exit(serve_volume(config, mountpoint))


def is_mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as mounts:
        return any(line.split()[4] == path for line in mounts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-warm-up", action="store_true", help="the zygote skips its warm-up")
    parser.add_argument("--no-shared-trust", action="store_true", help="each daemon parses the system CAs itself")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="kvfspages-", dir="/tmp")
    emu, info = start_emulator(os.path.join(folder, "emu"))
    pid = 0
    mountpoint = os.path.join(folder, "mnt")
    try:
        put_secrets(info)
        os.environ["SSL_CERT_FILE"] = info["ca_file"]
        params = volume_params(info)
        # the zygote's steps (kvfs.csi.zygote.main)
        preload()
        entry = load_entry(DEFAULT_ENTRY)
        if args.no_shared_trust:
            kvfs_http._shared_system = None
        if entry.warm_up is not None and not args.no_warm_up:
            entry.warm_up()
        gc.freeze()
        os.mkdir(mountpoint)
        go_r, go_w = os.pipe()
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the daemon
            child(params, os.path.dirname(info["cloud_env_file"]), mountpoint, go_r, done_w)
        stages = [("fork (interpreter, libpython's data)", uss_kib(pid))]
        os.write(go_w, b".")
        os.read(done_r, 1)
        stages.append(("configuration: parameters, SSL_CERT_FILE", uss_kib(pid)))
        os.write(go_w, b".")
        while not is_mounted(mountpoint):
            time.sleep(0.01)
        stages.append(("serving: trio, layers, preflight, FUSE mount", uss_kib(pid)))
        Path(mountpoint, "s0").read_bytes()
        stages.append(("first read", uss_kib(pid)))
        for i in range(1, OBJECTS):
            Path(mountpoint, f"s{i}").read_bytes()
        stages.append((f"{OBJECTS - 1} more reads", uss_kib(pid)))
        pages = classify(pid, os.getpid())
    finally:
        if pid:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
        emu.terminate()
        emu.wait(30)
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{'stage':46}  {'USS after':>10}  {'added':>8}")
    before = 0
    for name, kib in stages:
        print(f"{name:46}  {kib / 1024:7.1f} MiB  {(kib - before) / 1024:+5.1f} MiB")
        before = kib
    print(f"\n{'private pages by origin':46}  {'MiB':>10}")
    for name, kib in sorted(pages.items(), key=lambda item: -item[1]):
        print(f"{name:46}  {kib / 1024:10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
