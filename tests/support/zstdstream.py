"""The archive contents of tests/fuse/test_zstd_stream.py and of its kernel-free twin
(tests/fs/test_stream_twins.py), written once: the sizes, the text, and the log line that says a
decode began."""

from __future__ import annotations

import random

MiB = 1 << 20
TEXT_BYTES = 48 * MiB + 4321  # compresses ~4x: a dozen MiB of frame, several range requests
RANDOM_BYTES = 6 * MiB + 99  # incompressible: raw zstd blocks, so a flipped bit decodes fine
DECODE_LINE = "decoding it while it is read"


def text(size: int, seed: int) -> bytes:
    """Compressible text with variation: words of a fixed vocabulary in random order."""
    rng = random.Random(seed)
    letters = b"etaoinshrdlucmfwypvbgkjqxz"
    words = [bytes(rng.choices(letters, k=rng.randint(1, 10))) for _ in range(4000)]
    out = b" ".join(rng.choices(words, k=size // 5))
    while len(out) < size:
        out += out[: size - len(out)]
    return out[:size]
