"""The hostile archives of tests/fuse/test_hostile.py and its kernel-free twins (and cp's): every
way an index entry can lie, each beside good files that must still be served, and the reading
expected of each entry; archives broken as a whole; a file beyond every limit."""

from __future__ import annotations

import errno
import hashlib
import random
from collections.abc import Callable
from pathlib import Path

from tests.support.corpus import Spec, bomb_frame, compress, write_archive

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BOMB_BYTES = 4 * GiB  # what each bomb frame inflates to

rng = random.Random(13)
TEXT = b"".join(b"hostile corpus line %06d\n" % i for i in range(4000))
OK_BIG = rng.randbytes(5 * MiB)
OVERLAP = rng.randbytes(64 * KiB)
GOOD: dict[str, bytes] = {
    "ok/one.txt": b"hello\n",
    "ok/two.txt": TEXT,
    "ok/big.bin": OK_BIG,
    "overlap-a.bin": OVERLAP,
    "overlap-b.bin": OVERLAP[1000:5000],  # the same stored bytes as part of overlap-a
    "setuid.bin": b"#!/bin/sh\necho never root\n",
}


def _text(name: bytes) -> bytes:
    """Content of its own: decoded files are cached by sha256, so a bad entry that shares a good
    file's hash would (rightly) be served that file's verified bytes."""
    return TEXT + name


def _hostile_specs() -> list[Spec]:
    frame = compress(_text(b"truncated"))
    checksum = compress(_text(b"checksum"))
    checksum_flipped = checksum[:-1] + bytes([checksum[-1] ^ 0xFF])
    short = _text(b"short")
    zeros = bytes(100 * KiB)
    return [
        Spec(b"overlap-a.bin", OVERLAP),  # first: its stored bytes start at 0
        Spec(b"ok/one.txt", GOOD["ok/one.txt"]),
        Spec(b"ok/two.txt", TEXT, zstd=True),
        Spec(b"ok/big.bin", OK_BIG),
        # refused by the path rules (skipped in listings; no name can reach them)
        Spec(b"../escape", b"must never be written outside"),
        Spec(b"/abs", b"absolute"),
        Spec(b"nul\x00name", b"nul"),
        Spec(b"dbl//slash", b"double slash"),
        Spec(b"n" * 256, b"long name"),
        # refused when used: EIO for that name only
        Spec(b"conf", b"a file"),
        Spec(b"conf/inner", b"and a directory"),
        Spec(b"past-blob.bin", b"x" * 100, data_offset=1 << 40),
        Spec(b"overflow.bin", b"y", data_offset=(1 << 64) - 1),
        Spec(b"huge.txt", b"z", zstd=True, original_size=1 << 63),
        # served as files, fail when read
        Spec(b"bomb-small.txt", zeros, zstd=True, stored=bomb_frame(BOMB_BYTES)),  # decoded in memory
        Spec(b"bomb-big.txt", bytes(3 * MiB), zstd=True, stored=bomb_frame(BOMB_BYTES)),  # into the store
        Spec(b"truncated.txt", _text(b"truncated"), zstd=True, stored=frame[: len(frame) // 2]),
        Spec(b"bad-checksum.txt", _text(b"checksum"), zstd=True, stored=checksum_flipped),
        Spec(b"short-frame.txt", short + b"more", zstd=True, stored=compress(short)),  # decodes short
        Spec(b"wrong-hash.bin", b"honest bytes", hash=hashlib.sha256(b"other bytes").digest()),
        Spec(b"wrong-hash.txt", _text(b"wrong"), zstd=True, hash=hashlib.sha256(b"other").digest()),
        Spec(b"overlap-b.bin", OVERLAP[1000:5000], data_offset=1000),  # inside overlap-a's bytes
        Spec(b"overlap-bad.bin", OVERLAP[:2000], data_offset=0, hash=hashlib.sha256(b"no").digest()),
        Spec(b"setuid.bin", GOOD["setuid.bin"], mode=0o6777),
        Spec(b"max.txt", b"m", zstd=True, original_size=(1 << 63) - 1),
    ]


# name -> (errno on open/read, phrase of its one log line)
BAD: dict[str, tuple[int, str]] = {
    "conf": (errno.EIO, "both a file and a directory"),
    "past-blob.bin": (errno.EIO, "runs past the"),
    "overflow.bin": (errno.EIO, "runs past the"),
    "huge.txt": (errno.EIO, "exceeds 2^63-1"),
    "bomb-small.txt": (errno.EIO, "decodes past original_size"),
    "bomb-big.txt": (errno.EIO, "decodes past original_size"),
    "truncated.txt": (errno.EIO, "original_size is"),
    "bad-checksum.txt": (errno.EIO, "corrupt zstd frame"),
    "short-frame.txt": (errno.EIO, "original_size is"),
    "wrong-hash.bin": (errno.EIO, "sha256 mismatch"),
    "wrong-hash.txt": (errno.EIO, "sha256 mismatch"),
    "overlap-bad.bin": (errno.EIO, "sha256 mismatch"),
}
# entries no name can reach: (how the log shows the path, phrase of the warning when listed)
UNREACHABLE = (
    ("'../escape'", "'..' component"),
    ("'/abs'", "empty path component"),
    ("nul\\x00name", "NUL byte"),
    ("'dbl//slash'", "empty path component"),
    ("nnnnnnnn", "name of 256 bytes exceeds 255"),
)


def build_hostile(out: Path) -> Path:
    write_archive(out, _hostile_specs())
    return out


def beyond_every_limit(out: Path) -> None:
    """max.txt: a zstd file that says it decodes to 2^63-1 bytes (beyond the disk cache and the
    in-memory limit), beside a good one."""
    write_archive(out, [Spec(b"max.txt", b"m", zstd=True, original_size=(1 << 63) - 1), Spec(b"ok", b"ok")])


def _duplicates(out: Path) -> None:
    write_archive(out, [Spec(b"a", b"1"), Spec(b"b", b"2"), Spec(b"a", b"3")])


def _data_size_lies(out: Path) -> None:
    write_archive(out, [Spec(b"a", b"123")])
    (out / "data.blob").write_bytes(b"1234")


def _noise(out: Path) -> None:
    (out / "index.blob").write_bytes(random.Random(1).randbytes(4096))
    (out / "data.blob").touch()


# archives refused as a whole: how to make one in a directory, a phrase of the one-line refusal
WHOLE: dict[str, tuple[Callable[[Path], None], str]] = {
    "duplicate paths": (_duplicates, "duplicate path 'a'"),
    "data_size lies": (_data_size_lies, "does not match the data blob"),
    "index is noise": (_noise, "index"),
}
