"""metrics.py: the API's arithmetic, and the exposition checked by Prometheus's own text parser
(prometheus_client is a test-only dependency, used for nothing else)."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from blobmount.daemon import metrics


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    metrics.reset()
    yield
    metrics.reset()


def families() -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(metrics.render())}


def test_every_metric_is_prefixed_and_parses_with_help_and_type() -> None:
    metrics.FUSE_REQUESTS.labels(op="read").inc()
    text = metrics.render()
    parsed = list(text_string_to_metric_families(text))
    assert len(parsed) == len(metrics.REGISTRY)
    for metric in metrics.REGISTRY:
        assert metric.name.startswith("blobmount_")
        assert f"# HELP {metric.name} " in text
        assert f"# TYPE {metric.name} {metric.kind}\n" in text
    kinds = {f.name: f.type for f in parsed}
    assert kinds["blobmount_fuse_requests"] == "counter"  # the parser drops _total from the family name
    assert kinds["blobmount_fuse_request_duration_seconds"] == "histogram"
    assert kinds["blobmount_cache_bytes"] == "gauge"


def test_counter_labels_and_values() -> None:
    metrics.FUSE_REQUESTS.labels(op="read").inc()
    metrics.FUSE_REQUESTS.labels(op="read").inc(2)
    metrics.FUSE_REQUESTS.labels(op="lookup").inc()
    metrics.FETCH_BYTES.inc(4096)
    assert metrics.FUSE_REQUESTS.value(op="read") == 3
    assert metrics.FUSE_REQUESTS.total() == 4
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(metrics.render())
        for s in f.samples
    }
    assert samples[("blobmount_fuse_requests_total", (("op", "read"),))] == 3
    assert samples[("blobmount_fetch_bytes_total", ())] == 4096
    assert samples[("blobmount_http_retries_total", ())] == 0  # unlabelled: exported from the start
    with pytest.raises(ValueError, match="cannot go down"):
        metrics.FETCH_BYTES.inc(-1)
    with pytest.raises(ValueError, match="takes labels"):
        metrics.FUSE_REQUESTS.labels(operation="read")
    with pytest.raises(ValueError, match=r"use \.labels"):
        metrics.FUSE_REQUESTS.inc()


def test_label_values_are_escaped() -> None:
    nasty = 'reg.example/a"b\\c\nd'
    metrics.INFO.labels(version="1", source=nasty, digest="sha256:00").set(1)
    text = metrics.render()
    [sample] = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "blobmount_info"]
    assert sample.labels["source"] == nasty


def test_gauge_function_is_read_at_export() -> None:
    used = [10]
    metrics.CACHE_BYTES.set_function(lambda: used[0], store="content")
    metrics.HTTP_IN_FLIGHT.inc()
    metrics.HTTP_IN_FLIGHT.inc()
    metrics.HTTP_IN_FLIGHT.dec()
    assert metrics.CACHE_BYTES.value(store="content") == 10
    used[0] = 99
    assert 'blobmount_cache_bytes{store="content"} 99\n' in metrics.render()
    assert metrics.HTTP_IN_FLIGHT.value() == 1


def test_histogram_buckets_sum_count() -> None:
    h = metrics.FUSE_LATENCY.labels(op="read")
    for v in (0.00001, 0.0003, 0.0003, 2.0, 100.0):
        h.observe(v)
    [fam] = [f for f in text_string_to_metric_families(metrics.render()) if f.name == metrics.FUSE_LATENCY.name]
    buckets = {s.labels["le"]: s.value for s in fam.samples if s.name.endswith("_bucket")}
    assert buckets["5e-05"] == 1
    assert buckets["0.0005"] == 3
    assert buckets["2.5"] == 4
    assert buckets["30"] == 4
    assert buckets["+Inf"] == 5
    values = list(buckets.values())
    assert values == sorted(values)  # cumulative
    by_name = {s.name: s.value for s in fam.samples if not s.name.endswith("_bucket")}
    assert by_name[f"{fam.name}_count"] == 5
    assert math.isclose(by_name[f"{fam.name}_sum"], 102.00061)
    assert metrics.FUSE_LATENCY.count(op="read") == 5


def test_counts_are_exact_across_threads() -> None:
    child = metrics.FUSE_REQUESTS.labels(op="read")

    def work() -> None:
        for _ in range(20_000):
            child.inc()
            metrics.FUSE_LATENCY.labels(op="read").observe(0.001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert metrics.FUSE_REQUESTS.value(op="read") == 80_000
    assert metrics.FUSE_LATENCY.count(op="read") == 80_000
