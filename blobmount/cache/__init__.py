"""On-disk stores, all under one cache directory shared by every process that names it.

- space.py: the directory itself: its shared byte budget (``--cache-size``, LRU eviction) and the
  cross-process claims that make each chunk fetched once per host.
- chunks.py: data-blob chunks of remote sources (self-checking, crash-safe, with a memory tier).
- content.py: decoded zstd contents keyed by file sha256 (every source).
- meta.py: manifests and index blobs by digest, tag resolutions, verified records.

This package never imports registry/ or fetch.py: it stores bytes and knows nothing of where they
come from (DESIGN §2).
"""

from blobmount.cache.chunks import DEFAULT_CHUNK_SIZE_BYTES, DEFAULT_MEMORY_BYTES, ChunkStore, WholeBlob, chunk_digest
from blobmount.cache.content import ContentStore, StoreUnavailable
from blobmount.cache.meta import MetaStore, TagRecord
from blobmount.cache.space import DEFAULT_CACHE_SIZE_BYTES, CacheDir, Usage, default_cache_dir, prepare_cache_dir

__all__ = [
    "DEFAULT_CACHE_SIZE_BYTES",
    "DEFAULT_CHUNK_SIZE_BYTES",
    "DEFAULT_MEMORY_BYTES",
    "CacheDir",
    "ChunkStore",
    "ContentStore",
    "MetaStore",
    "StoreUnavailable",
    "TagRecord",
    "Usage",
    "WholeBlob",
    "chunk_digest",
    "default_cache_dir",
    "prepare_cache_dir",
]
