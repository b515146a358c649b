"""Counters, gauges and histograms, and their Prometheus text exposition (version 0.0.4).

No dependency: the text format (HELP/TYPE lines, ``_bucket``/``_sum``/``_count`` for histograms,
escaped label values) is small enough to write here, and tests check it with the reference parser.
Measured against prometheus_client doing the same work (``python -m bench.metrics_choice``,
bench/results/2026-12-07-metrics-choice.md): it would cost every mount ~46 ms more of imports
before it is ready, and it is no cheaper per request (0.83x) or per scrape (0.29x).

Concurrency: values are updated from the trio thread and from worker threads (zstd decoding,
hashing), so each metric guards its values with one lock; an update costs a lock round-trip and a
dict lookup, cheap next to a FUSE request. Nothing here awaits or does I/O. Every metric made
joins :data:`REGISTRY`, which :func:`render` exports in order.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence

__all__ = ["LATENCY_BUCKETS_S", "PREFIX", "REGISTRY", "Counter", "Gauge", "Histogram", "render", "reset"]

PREFIX = "blobmount_"
# FUSE requests answered from memory take ~20 us, a cold range read over a WAN 50-500 ms, a stalled
# one up to --timeout (30 s): buckets from 50 us to 30 s, about 2.5x apart.
LATENCY_BUCKETS_S = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

LabelValues = tuple[str, ...]


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1 << 53:
        return str(int(value))
    return repr(value)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> None:
        if not name.startswith(PREFIX):
            raise ValueError(f"metric {name} must start with {PREFIX}")
        self.name = name
        self.doc = doc
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()
        REGISTRY.append(self)

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def _samples(self) -> Iterator[str]:
        raise NotImplementedError

    def render(self) -> str:
        head = f"# HELP {self.name} {_escape_help(self.doc)}\n# TYPE {self.name} {self.kind}\n"
        return head + "".join(line + "\n" for line in self._samples())

    def clear(self) -> None:
        raise NotImplementedError


class _Child:
    """One label combination of a counter or gauge: what ``.labels(...)`` returns."""

    __slots__ = ("_key", "_metric")

    def __init__(self, metric: _Scalar, key: LabelValues) -> None:
        self._metric = metric
        self._key = key

    def inc(self, amount: float = 1.0) -> None:
        self._metric._add(self._key, amount)

    def dec(self, amount: float = 1.0) -> None:
        self._metric._add(self._key, -amount)

    def set(self, value: float) -> None:
        self._metric._set(self._key, value)


class _Scalar(_Metric):
    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, doc, labelnames)
        self._values: dict[LabelValues, float] = {}
        if not self.labelnames:
            self._values[()] = 0.0  # an unlabelled metric is exported from the start, as 0

    def labels(self, **labels: str) -> _Child:
        return _Child(self, self._key(labels))

    def _add(self, key: LabelValues, amount: float) -> None:
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def _set(self, key: LabelValues, value: float) -> None:
        with self._lock:
            self._values[key] = value

    def _unlabelled(self) -> LabelValues:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use .labels(...)")
        return ()

    def value(self, **labels: str) -> float:
        """One series' value (0 when never touched)."""
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def total(self) -> float:
        """The sum over every label combination (for `blobmount status`)."""
        with self._lock:
            return sum(self._values.values())

    def series(self) -> dict[LabelValues, float]:
        with self._lock:
            return dict(self._values)

    def _samples(self) -> Iterator[str]:
        for key, value in sorted(self.series().items()):
            yield f"{self.name}{_labels(self.labelnames, key)} {_number(value)}"

    def clear(self) -> None:
        with self._lock:
            self._values = {(): 0.0} if not self.labelnames else {}


class Counter(_Scalar):
    """Only goes up. Names end in ``_total`` (checked), as the exposition format expects."""

    kind = "counter"

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        super().__init__(name, doc, labelnames)

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot go down ({amount})")
        self._add(self._unlabelled(), amount)

    def _add(self, key: LabelValues, amount: float) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot go down ({amount})")
        super()._add(key, amount)


class Gauge(_Scalar):
    """Goes up and down; or reads its value from a function at scrape time (:meth:`set_function`)."""

    kind = "gauge"

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, doc, labelnames)
        self._functions: dict[LabelValues, Callable[[], float]] = {}

    def inc(self, amount: float = 1.0) -> None:
        self._add(self._unlabelled(), amount)

    def dec(self, amount: float = 1.0) -> None:
        self._add(self._unlabelled(), -amount)

    def set(self, value: float) -> None:
        self._set(self._unlabelled(), value)

    def set_function(self, func: Callable[[], float], **labels: str) -> None:
        """Read the value from `func` whenever it is exported (e.g. the cache's used bytes), so
        the owner of the number need not remember to push it."""
        with self._lock:
            self._functions[self._key(labels)] = func

    def series(self) -> dict[LabelValues, float]:
        with self._lock:
            values = dict(self._values)
            functions = dict(self._functions)
        for key, func in functions.items():
            values[key] = float(func())
        return values

    def value(self, **labels: str) -> float:
        return self.series().get(self._key(labels), 0.0)

    def total(self) -> float:
        return sum(self.series().values())

    def clear(self) -> None:
        super().clear()
        with self._lock:
            self._functions = {}


class _HistogramChild:
    __slots__ = ("_key", "_metric")

    def __init__(self, metric: Histogram, key: LabelValues) -> None:
        self._metric = metric
        self._key = key

    def observe(self, value: float) -> None:
        self._metric._observe(self._key, value)


class Histogram(_Metric):
    """Counts observations into cumulative ``le`` buckets, plus their sum and count."""

    kind = "histogram"

    def __init__(
        self, name: str, doc: str, labelnames: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS_S
    ) -> None:
        super().__init__(name, doc, labelnames)
        if list(buckets) != sorted(buckets) or not buckets:
            raise ValueError(f"{name}: buckets must be sorted and non-empty")
        self.buckets = tuple(float(b) for b in buckets)
        # per label set: [count per bucket (non-cumulative, last = above every bound)], sum
        self._counts: dict[LabelValues, list[int]] = {}
        self._sums: dict[LabelValues, float] = {}

    def labels(self, **labels: str) -> _HistogramChild:
        return _HistogramChild(self, self._key(labels))

    def observe(self, value: float) -> None:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use .labels(...)")
        self._observe((), value)

    def _observe(self, key: LabelValues, value: float) -> None:
        index = len(self.buckets)
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                index = i
                break
        with self._lock:
            counts = self._counts.get(key)
            if counts is None:
                counts = self._counts[key] = [0] * (len(self.buckets) + 1)
                self._sums[key] = 0.0
            counts[index] += 1
            self._sums[key] += value

    def count(self, **labels: str) -> int:
        with self._lock:
            return sum(self._counts.get(self._key(labels), ()))

    def _samples(self) -> Iterator[str]:
        with self._lock:
            snapshot = sorted((key, list(counts), self._sums[key]) for key, counts in self._counts.items())
        for key, counts, total in snapshot:
            running = 0
            for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
                running += n
                le = f'le="{_number(bound)}"'
                yield f"{self.name}_bucket{_labels(self.labelnames, key, le)} {running}"
            yield f"{self.name}_sum{_labels(self.labelnames, key)} {_number(total)}"
            yield f"{self.name}_count{_labels(self.labelnames, key)} {running}"

    def clear(self) -> None:
        with self._lock:
            self._counts = {}
            self._sums = {}


REGISTRY: list[_Metric] = []


def render() -> str:
    """Every metric in the Prometheus text format (version 0.0.4)."""
    return "".join(metric.render() for metric in REGISTRY)


def reset() -> None:
    """Zero every metric (tests; a daemon never needs it)."""
    for metric in REGISTRY:
        metric.clear()
