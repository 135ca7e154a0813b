"""A daemon's counters: what each hook counts, and how snapshots become bounded Prometheus series.

Real mounts and the CSI plugin's sums over real daemons: tests/e2e/test_metrics.py and
tests/csi/test_operability.py.
"""

from __future__ import annotations

import errno
import math
import os

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from cache.fakevault import FakeVault, fake_render
from fs.test_core import make_config
from kvfs.auth.base import AccessToken
from kvfs.cache.base import CacheStats
from kvfs.cache.resolver import Resolver
from kvfs.config.model import ObjectSpec
from kvfs.daemon.metrics import (
    COUNTERS,
    HISTOGRAMS,
    CountedCredential,
    CountingTransport,
    DaemonMetrics,
    MeteredCore,
    MountCollector,
    Totals,
    parse_addr,
)
from kvfs.errors import AuthError, ConfigError, VaultError
from kvfs.fs.core import FsError
from kvfs.fs.tree import ROOT_INODE
from scrape import parse

VAULT = "https://kv-demo.vault.azure.net/"


def series(collector: object) -> dict[str, float]:
    """`name{labels}` → value, as a scrape shows them."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    return parse(generate_latest(registry).decode())


class Families:
    def __init__(self, totals: Totals) -> None:
        self.totals = totals

    def collect(self) -> list:
        return self.totals.families()


async def test_the_transport_counts_each_vault_request_by_kind_and_status_class() -> None:
    answers = iter([200, 404, 429, 503])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/boom"):
            raise httpx.ConnectError("refused")
        return httpx.Response(next(answers) if request.url.host.startswith("kv-demo") else 200)

    metrics = DaemonMetrics()
    async with httpx.AsyncClient(transport=CountingTransport(httpx.MockTransport(handler), VAULT, metrics)) as http:
        await http.get(VAULT + "secrets/a?api-version=7.4")
        await http.get(VAULT + "keys/b/versions")
        await http.get(VAULT + "certificates/c")
        await http.get(VAULT)
        with pytest.raises(httpx.ConnectError):
            await http.get(VAULT + "boom")
        await http.post("https://login.microsoftonline.com/t/oauth2/v2.0/token")  # not Key Vault
    assert dict(metrics.requests) == {
        ("secret", "2xx"): 1, ("key", "4xx"): 1, ("cert", "4xx"): 1, ("other", "5xx"): 1, ("other", "error"): 1,
    }  # fmt: skip
    assert sum(metrics.durations.counts) == 5


async def test_the_credential_counts_each_exchange_by_result() -> None:
    class Flow:
        def __init__(self) -> None:
            self.answers: list[object] = ["ok", AuthError("no FIC", code="AADSTS70021"),
                                          AuthError("timeout", code="entra_timeout", errno=errno.EIO)]  # fmt: skip

        async def get_token(self, scope: str) -> AccessToken:
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return AccessToken("t", 1e9)

        async def aclose(self) -> None:
            pass

    metrics = DaemonMetrics()
    credential = CountedCredential(Flow(), metrics)
    await credential.get_token("s")
    for _ in range(2):
        with pytest.raises(AuthError):
            await credential.get_token("s")
    assert dict(metrics.tokens) == {"ok": 1, "refused": 1, "error": 1}


async def test_the_core_counts_opens_hits_and_failed_loads_not_unknown_names() -> None:
    app, gone, off = ObjectSpec("app", "secret"), ObjectSpec("gone", "secret"), ObjectSpec("off", "secret")
    vault = FakeVault()
    vault.add("secret", "app", "v1")
    vault.fail_only["gone"] = VaultError("not found", status=404, code="SecretNotFound")
    vault.fail_only["off"] = VaultError("forbidden", status=403, code="Forbidden")
    config = make_config(app, gone, off)
    metrics = DaemonMetrics()
    core = MeteredCore(config, Resolver(vault, config, render=fake_render), metrics=metrics)

    attr = await core.lookup(ROOT_INODE, "app")  # cold: fetched here
    core.release(await core.open(attr.inode, os.O_RDONLY))
    cached = core.open_cached(attr.inode, os.O_RDONLY)  # the adapter's first try: a hit, no await
    assert cached is not None
    core.release(cached)
    core.release(await core.open(attr.inode, os.O_RDONLY))  # a hit too
    for name, err in (("gone", errno.ENOENT), ("off", errno.EACCES), ("nothing-by-that-name", errno.ENOENT)):
        with pytest.raises(FsError) as info:
            await core.lookup(ROOT_INODE, name)
        assert info.value.errno == err
    assert dict(metrics.reads) == {"ok": 3, "enoent": 1, "eacces": 1}
    assert metrics.cache_hits == 2
    assert vault.calls["get"] == 3  # one per object: the second open cost no request


def test_a_snapshot_is_read_through_the_spec_only() -> None:
    """What a daemon sends that the spec does not know adds no series: no pod or object names."""
    totals = Totals()
    metrics = DaemonMetrics()
    metrics.keyvault_request("secret", "2xx", 0.02)
    metrics.reads["ok"] += 3
    stats = CacheStats(refreshes=4, refresh_failures=1)
    good = metrics.snapshot(stats, rotations=2)
    totals.add(good)
    totals.add(good)
    totals.add({
        "counters": {
            "kvfs_reads_total": [[{"result": "team-a/web-0"}, 5], [{"result": "ok", "pod": "web-0"}, 5],
                                 [{"result": "ok"}, -1], [{"result": "ok"}, math.nan], [{"result": "ok"}, True],
                                 [{"result": "ok"}, "7"], "junk"],
            "kvfs_secret_db_password": [[{}, 1]],
            "kvfs_cache_hits_total": "x",
        },
        "histograms": {"kvfs_keyvault_request_duration_seconds": {"counts": [1, 2], "sum": 1.0}},
    })  # fmt: skip
    for junk in (None, [], "x", {"counters": []}):
        totals.add(junk)
    shown = series(Families(totals))
    assert shown['kvfs_reads_total{result="ok"}'] == 6
    assert shown['kvfs_keyvault_requests_total{code="2xx",kind="secret"}'] == 2
    assert shown['kvfs_refresh_total{result="ok"}'] == 8 and shown['kvfs_refresh_total{result="error"}'] == 2
    assert shown["kvfs_rotations_total{}"] == 4
    assert shown['kvfs_keyvault_request_duration_seconds_bucket{le="0.025"}'] == 2
    assert shown["kvfs_keyvault_request_duration_seconds_count{}"] == 2
    # every series is one of the spec's, with one of its values; zeros included
    for key in shown:
        assert "web-0" not in key and "db_password" not in key
    assert shown['kvfs_reads_total{result="eio"}'] == 0
    names = {key.split("{")[0].removesuffix("_created") for key in shown}
    assert {n.removesuffix("_total") for n in COUNTERS} <= {n.removesuffix("_total") for n in names}
    assert {f"{n}_count" for n in HISTOGRAMS} <= names


def test_a_mount_is_one_volume_and_one_publish_once_ready() -> None:
    ready: list[float] = []
    collector = MountCollector(lambda: DaemonMetrics().snapshot(CacheStats(), 0), lambda: ready[0] if ready else None)
    shown = series(collector)
    assert shown['kvfs_volumes{state="starting"}'] == 1 and shown['kvfs_publish_total{result="ok"}'] == 0
    ready.append(0.3)
    shown = series(collector)
    assert shown['kvfs_volumes{state="healthy"}'] == 1 and shown['kvfs_volumes{state="starting"}'] == 0
    assert shown['kvfs_publish_total{result="ok"}'] == 1
    assert shown['kvfs_publish_duration_seconds_bucket{le="0.5"}'] == 1
    assert shown['kvfs_publish_duration_seconds_bucket{le="0.25"}'] == 0


@pytest.mark.parametrize("addr", ["8095", "host:", "host:http", "host:0", "host:70000", ""])
def test_a_bad_metrics_address_is_named_with_the_fix(addr: str) -> None:
    with pytest.raises(ConfigError, match="--metrics-addr .*expected HOST:PORT.*127.0.0.1:8095"):
        parse_addr(addr)
    assert parse_addr(":8095") == ("0.0.0.0", 8095) and parse_addr("[::1]:9") == ("::1", 9)



def test_every_volume_state_the_plugin_knows_is_a_label_value() -> None:
    """kvfs_volumes{state} shows a publish under way and each verdict of the plugin's health probe."""
    from kvfs.csi.mountinfo import Health
    from kvfs.daemon.metrics import VOLUME_STATES

    assert set(VOLUME_STATES) == {"starting"} | {health.value for health in Health}
