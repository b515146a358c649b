"""The daemon's metrics: every series blobmount exports, defined in one place.

Code elsewhere only calls the tiny API on the objects below
(``metrics.FUSE_REQUESTS.labels(op="read").inc()``, ``metrics.FETCH_BYTES.inc(n)``,
``metrics.FUSE_LATENCY.labels(op="read").observe(seconds)``); the types and the text format are
exposition.py's. Names and labels are an interface (dashboards, alerts): a test diffs them
against a golden list.

Metrics are process-wide: one daemon serves one mount, so there is no per-mount registry. Tests
that need a clean slate call :func:`reset`.
"""

from __future__ import annotations

from blobmount.daemon.exposition import LATENCY_BUCKETS_S, PREFIX, REGISTRY, Counter, Gauge, Histogram, render, reset

__all__ = [
    "CACHE_BYTES",
    "CACHE_EVICTED_BYTES",
    "CACHE_EVICTIONS",
    "CACHE_HITS",
    "CACHE_LIMIT_BYTES",
    "CACHE_MISSES",
    "FETCH_BYTES",
    "FETCH_CHUNKS",
    "FETCH_IN_FLIGHT",
    "FETCH_REQUESTS",
    "FOLLOW_ARCHIVES",
    "FOLLOW_CHECKS",
    "FOLLOW_INDEX_BYTES",
    "FUSE_ERRORS",
    "FUSE_LATENCY",
    "FUSE_READ_BYTES",
    "FUSE_REQUESTS",
    "HTTP_BYTES",
    "HTTP_IN_FLIGHT",
    "HTTP_REQUESTS",
    "HTTP_RETRIES",
    "INFO",
    "LATENCY_BUCKETS_S",
    "PREFIX",
    "READY",
    "REGISTRY",
    "VERIFY_FAILURES",
    "VERIFY_FILES",
    "Counter",
    "Gauge",
    "Histogram",
    "render",
    "reset",
]

# -- the daemon's metrics ------------------------------------------------------------------------
# Labels stay low-cardinality: an operation name, a request kind, a store name; never a path.

INFO = Gauge(
    "blobmount_info",
    "Always 1; the labels say what this daemon serves (version, source, manifest or index digest).",
    ("version", "source", "digest"),
)
READY = Gauge("blobmount_ready", "1 once the mount answers through the kernel, 0 before and while stopping.")

# follow.py and fs.py: --follow (a tag followed, archives switched)
FOLLOW_CHECKS = Counter(
    "blobmount_follow_checks_total",
    "--follow: checks of the tag, by result (unchanged, switched, refused: the new archive failed its"
    " checks, waiting: too many archives in use, error: the registry did not answer).",
    ("result",),
)
FOLLOW_ARCHIVES = Gauge("blobmount_follow_archives", "--follow: archives kept (the one served and older ones in use).")
FOLLOW_INDEX_BYTES = Gauge("blobmount_follow_index_bytes", "--follow: index bytes in memory for the archives kept.")

# handler.py, in its fuse_errors wrapper: every handler (fs.py) goes through it.
FUSE_REQUESTS = Counter("blobmount_fuse_requests_total", "FUSE requests answered, by operation.", ("op",))
FUSE_ERRORS = Counter(
    "blobmount_fuse_errors_total",
    "FUSE requests answered with an error, by operation and errno name (ENOENT is normal lookup traffic).",
    ("op", "errno"),
)
FUSE_LATENCY = Histogram(
    "blobmount_fuse_request_duration_seconds",
    "Time from a FUSE request entering its handler to its answer, by operation.",
    ("op",),
)
FUSE_READ_BYTES = Counter(
    "blobmount_fuse_read_bytes_total",
    "Bytes returned to the kernel by read() (bytes served; the kernel's page cache serves repeats itself).",
)

# registry/transport.py: Transport.send (requests, bytes, in flight); registry/retry.py: Retry.pause (retries).
HTTP_REQUESTS = Counter(
    "blobmount_http_requests_total",
    "HTTP requests sent to registries, mirrors and storage, by kind (range, blob, manifest, token, ...) "
    "and status code ('error' when no answer came).",
    ("kind", "code"),
)
HTTP_BYTES = Counter(
    "blobmount_http_response_bytes_total",
    "Response body bytes read from registries, mirrors and storage, by request kind.",
    ("kind",),
)
HTTP_IN_FLIGHT = Gauge(
    "blobmount_http_in_flight_requests",
    "HTTP requests sent whose response body is not yet fully read or closed.",
)
HTTP_RETRIES = Counter(
    "blobmount_http_retries_total",
    "Retries after a transient failure (reset, timeout, 429, 5xx, short body).",
)

# cache.py (the lead's layer): call these where the store decides. `store` is "chunk" for the chunk
# store of remote data-blob bytes, "content" for decoded zstd contents, "memory" for the in-memory
# small-file cache.
CACHE_HITS = Counter(
    "blobmount_cache_hits_total",
    "Lookups answered from a cache store without fetching, by store (chunk, content, memory). "
    "Call CACHE_HITS.labels(store=...).inc() once per chunk or file found.",
    ("store",),
)
CACHE_MISSES = Counter(
    "blobmount_cache_misses_total",
    "Lookups that had to fetch or decode, by store. Call once per chunk or file not found "
    "(a waiter that joins an in-flight fill counts as a hit of that fill: count it in FETCH_CHUNKS only once).",
    ("store",),
)
CACHE_EVICTIONS = Counter(
    "blobmount_cache_evictions_total",
    "Entries removed to stay under --cache-size, by store.",
    ("store",),
)
CACHE_EVICTED_BYTES = Counter(
    "blobmount_cache_evicted_bytes_total",
    "Bytes removed to stay under --cache-size, by store.",
    ("store",),
)
CACHE_BYTES = Gauge(
    "blobmount_cache_bytes",
    "Bytes a cache store holds now, by store. Prefer CACHE_BYTES.set_function(lambda: store.used_bytes, "
    "store=...) at start-up over pushing values.",
    ("store",),
)
CACHE_LIMIT_BYTES = Gauge(
    "blobmount_cache_limit_bytes",
    "The byte limit of a cache store (--cache-size for the disk stores), by store.",
    ("store",),
)

# fetch.py (the lead's layer): coalescing ratio = FETCH_CHUNKS / FETCH_REQUESTS.
FETCH_CHUNKS = Counter(
    "blobmount_fetch_chunks_total",
    "Chunks handed to the fetcher (cache misses plus read-ahead), by reason (miss, readahead). "
    "Divided by blobmount_fetch_requests_total this is the coalescing ratio.",
    ("reason",),
)
FETCH_REQUESTS = Counter(
    "blobmount_fetch_requests_total",
    "Range reads the fetcher issued to the data-blob source after coalescing adjacent chunks.",
)
FETCH_BYTES = Counter(
    "blobmount_fetch_bytes_total",
    "Data-blob bytes fetched from the source (registry or mirror) by the fetcher; compare with "
    "blobmount_fuse_read_bytes_total (served).",
)
FETCH_IN_FLIGHT = Gauge(
    "blobmount_fetch_in_flight_requests",
    "Range reads the fetcher has started and not finished (bounded by its concurrency budget).",
)

# integrity/ (and streaming.py's verdicts): sha256 verification outcomes.
VERIFY_FILES = Counter(
    "blobmount_verify_files_total",
    "Files whose sha256 was checked, by result (ok, mismatch, poisoned).",
    ("result",),
)
VERIFY_FAILURES = Counter(
    "blobmount_verify_failures_total",
    "sha256 or chunk-checksum mismatches, by what failed (file, chunk). Each one is also logged.",
    ("what",),
)
