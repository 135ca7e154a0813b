"""Reading Prometheus metrics as a scrape shows them: `name{label="value",...}` → value."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

# The names issue 11 says tests rely on; docs/METRICS.md documents them and more.
REQUIRED = (
    "kvfs_volumes",
    "kvfs_publish_total",
    "kvfs_publish_duration_seconds",
    "kvfs_keyvault_requests_total",
    "kvfs_keyvault_request_duration_seconds",
    "kvfs_token_requests_total",
    "kvfs_reads_total",
    "kvfs_cache_hits_total",
    "kvfs_refresh_total",
    "kvfs_rotations_total",
)


def parse(text: str) -> dict[str, float]:
    shown: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            shown[f"{sample.name}{{{labels}}}"] = sample.value
    return shown


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return parse(answer.read().decode())


def families(url: str) -> set[str]:
    """The metric family names a scrape shows (counters with their `_total`)."""
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def label_values(shown: dict[str, float]) -> set[str]:
    """Every label value of the series (histogram bucket bounds, `le`, left out)."""
    pairs = (pair.split("=", 1) for key in shown for pair in key.split("{", 1)[1].rstrip("}").split(",") if pair)
    return {value.strip('"') for name, value in pairs if name != "le"}


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The series that changed, by how much (histogram buckets and sums left out)."""
    return {
        key: after[key] - before.get(key, 0.0)
        for key in after
        if after[key] != before.get(key, 0.0) and "_bucket{" not in key and "_sum{" not in key and "_created{" not in key
    }
