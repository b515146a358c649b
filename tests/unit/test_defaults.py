"""Every default is written once (blobmount/defaults.py): the objects each layer builds, the CLI's
help and the README's Configuration table all say the same value."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from blobmount import defaults
from blobmount.config import MountConfig, parse_size
from blobmount.defaults import size_text

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("n", [1, 4095, 4096, 1 << 10, 1536 << 10, 4 << 20, 64 << 20, 10 << 30, 3 << 40])
def test_size_text_reads_back_exactly(n: int) -> None:
    assert parse_size(size_text(n)) == n


def test_size_text_is_the_short_form() -> None:
    assert [size_text(n) for n in (10 << 30, 4 << 20, 1 << 20, 64 << 20, 1536 << 10)] == [
        "10G",
        "4M",
        "1M",
        "64M",
        "1536K",
    ]


def test_each_layer_takes_its_default_from_the_one_place() -> None:
    from blobmount.cache import CacheDir, ChunkStore
    from blobmount.extract import CopyOptions
    from blobmount.fetch import ChunkedSource
    from blobmount.reader import ReaderConfig
    from blobmount.registry.options import RegistryOptions

    config = MountConfig("src", Path("/mnt"))
    assert (config.cache.size_bytes, config.verify.policy, config.verify.threshold_bytes) == (
        defaults.CACHE_SIZE_BYTES,
        defaults.VERIFY_POLICY,
        defaults.VERIFY_THRESHOLD_BYTES,
    )
    options = RegistryOptions()
    assert (options.timeout_s, options.max_connections) == (defaults.TIMEOUT_S, defaults.MAX_CONNECTIONS)
    reader = ReaderConfig()
    assert (reader.verify, reader.verify_threshold, reader.wait_s) == (
        defaults.VERIFY_POLICY,
        defaults.VERIFY_THRESHOLD_BYTES,
        defaults.TIMEOUT_S,
    )
    assert inspect.signature(CacheDir).parameters["limit_bytes"].default == defaults.CACHE_SIZE_BYTES
    assert inspect.signature(ChunkStore).parameters["chunk_size"].default == defaults.CHUNK_SIZE_BYTES
    fetch = inspect.signature(ChunkedSource).parameters
    assert (fetch["timeout_s"].default, fetch["max_requests"].default) == (defaults.TIMEOUT_S, defaults.MAX_CONNECTIONS)
    copy = CopyOptions()
    assert (copy.concurrency, copy.buffer_bytes) == (defaults.CP_CONCURRENCY, defaults.CP_BUFFER_BYTES)
    assert (config.kernel.read_ahead_kb, config.follow.interval_s, config.follow.keep) == (
        defaults.READ_AHEAD_KB,
        defaults.FOLLOW_INTERVAL_S,
        defaults.FOLLOW_KEEP,
    )


def test_a_mount_configuration_is_one_frozen_part_per_layer() -> None:
    """Each layer gets its own part, and no part can be changed after the resolution built it."""
    config = MountConfig("src", Path("/mnt"))
    parts = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    layers = {name: part for name, part in parts.items() if name not in ("source", "mountpoint")}
    assert set(layers) == {"registry", "remote", "cache", "verify", "kernel", "prefetch", "follow", "daemon"}
    for name, part in [("mount", config), *layers.items()]:
        assert dataclasses.is_dataclass(part), name
        first = dataclasses.fields(part)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(part, first, None)


def test_the_readme_states_the_same_defaults() -> None:
    text = README.read_text()
    config = text[text.index("## Configuration") : text.index("## Operations")]

    def default_of(flag: str) -> str:
        row = next(line for line in config.splitlines() if line.startswith(f"| `{flag}"))
        cells = [c.strip().strip("`") for c in re.split(r"(?<!\\)\|", row.strip("|"))]  # not at an escaped \|
        return cells[3] if len(cells) == 5 else cells[2]  # mount's table has the -o column

    assert default_of("--cache-size") == size_text(defaults.CACHE_SIZE_BYTES)
    assert default_of("--chunk-size") == size_text(defaults.CHUNK_SIZE_BYTES)
    assert default_of("--verify ") == defaults.VERIFY_POLICY
    assert default_of("--verify-threshold") == size_text(defaults.VERIFY_THRESHOLD_BYTES)
    assert float(default_of("--timeout")) == defaults.TIMEOUT_S
    assert int(default_of("--max-connections")) == defaults.MAX_CONNECTIONS
    cp_row = next(line for line in config.splitlines() if line.startswith("| `cp SOURCE"))
    assert re.search(rf"\| {defaults.CP_CONCURRENCY}, {size_text(defaults.CP_BUFFER_BYTES)},", cp_row)


def test_the_help_states_the_same_defaults() -> None:
    from blobmount.cli.parser import build_parser
    from blobmount.settings import subparsers

    subs = subparsers(build_parser())
    mount_help = " ".join(subs["mount"].format_help().split())
    assert f"(default {size_text(defaults.CACHE_SIZE_BYTES)})" in mount_help
    assert f"(default {size_text(defaults.CHUNK_SIZE_BYTES)})" in mount_help
    assert f"(default {size_text(defaults.VERIFY_THRESHOLD_BYTES)})" in mount_help
    cp_help = " ".join(subs["cp"].format_help().split())
    assert f"(default {defaults.CP_CONCURRENCY})" in cp_help
    assert f"(default {size_text(defaults.CP_BUFFER_BYTES)})" in cp_help
