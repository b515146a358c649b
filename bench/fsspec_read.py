"""Read every file of an archive through the blob:// fsspec filesystem (a child of bench.cp_extract).

``python -m bench.fsspec_read REF CACHE_DIR THREADS [PLAIN_HOST]``: ``find`` from the index, then
``cat_file`` of every file (whole: verified before returned) on THREADS threads, as ``xargs -P``
does for the mount's read. Prints the file and byte counts; the caller times the whole process.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import fsspec


def main(argv: list[str]) -> int:
    ref, cache, threads = argv[0], argv[1], int(argv[2])
    plain = argv[3:4]
    fs = fsspec.filesystem("blob", cache_dir=cache, plain_http=plain, skip_instance_cache=True)
    paths = fs.find(ref)
    with ThreadPoolExecutor(threads) as pool:
        total = sum(len(b) for b in pool.map(fs.cat_file, paths))
    fs.close_archives()
    print(f"{len(paths)} files, {total} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
