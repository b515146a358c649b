"""Run the index and create benchmarks in turn: ``python -m bench [--quick] [--json]``.

Without ``--quick`` each runs at its default size (indexes of 10k, 100k and 1M entries; a 1 GiB tree):
about a minute and a half once the indexes are cached, ~40 s more the first time. ``--quick`` is a
smoke run (10k entries, a 64 MiB tree) of a few seconds. ``--json`` writes each one's results to
bench/results/<date>-<name>.json (``-quick`` added to the name for smoke runs). The mount benchmarks
(``bench.fs_local``, ``bench.registry_ready``) need root, FUSE and their peers, and run on their own.
"""

from __future__ import annotations

import argparse
import sys

from bench import create_throughput, index_scale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 10k entries, a 64 MiB tree")
    ap.add_argument("--json", action="store_true", help="write bench/results/<date>-<name>[-quick].json for each")
    args = ap.parse_args(argv)
    common = [*(["--quick"] if args.quick else []), *(["--json"] if args.json else [])]
    for name, bench_main in (("index_scale", index_scale.main), ("create_throughput", create_throughput.main)):
        print(f"=== bench.{name} {' '.join(common)}".rstrip(), flush=True)
        status = bench_main(common)
        if status:
            return status
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
