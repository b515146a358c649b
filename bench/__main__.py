"""``python -m bench``: the whole suite (see bench/suite.py). The parts also run alone:
``python -m bench.index_scale`` (the index without FUSE), ``python -m bench.create_throughput``."""

from __future__ import annotations

import sys

from bench.suite import main

if __name__ == "__main__":
    sys.exit(main())
