"""The frozen settings a mount runs with, one part per layer (registry, remote opening, cache,
verify, kernel, prefetch, follow, daemon), built once by cli/options.py from what settings.py
resolved and passed down, each layer its own part; the `-o` key table and size parsing.

Where a value comes from (flag, `-o`, environment, config file, default) is settings.py's business,
and every default is written in defaults.py; this module only holds the shapes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from blobmount import defaults
from blobmount.errors import UsageError
from blobmount.registry.options import RegistryOptions

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """`10G` = 10 GiB, `512M`, `4096`; binary units, optional trailing `B`/`iB`."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS and t[-1:] else ""
    number = t[: len(t) - len(unit)] if unit else t
    try:
        value = float(number)
    except ValueError:
        raise UsageError(f"invalid size {text!r} (examples: 4096, 512M, 10G)") from None
    if value < 0:
        raise UsageError(f"invalid size {text!r}: negative")
    return int(value * _UNITS[unit])


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The cache directory (cache/): where, how large, and the chunk size of remote blobs."""

    dir: Path | None = None  # None: the default cache directory (cache.default_cache_dir)
    size_bytes: int = defaults.CACHE_SIZE_BYTES
    chunk_size: int | None = None  # None: the chunk store's default (not imported here: the mount path
    # imports this module before it starts opening the source, and the cache package is not cheap)


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    """How a registry source is opened besides the registry client's own options (sources)."""

    offline: bool = False  # never ask the registry: serve what the cache holds
    stale_tag: bool = True  # registry down: mount the tag's cached resolution (False: --no-stale-tag)


@dataclass(frozen=True, slots=True)
class VerifyConfig:
    """The integrity policy of the reader (README, *Integrity*)."""

    policy: str = defaults.VERIFY_POLICY  # lazy, strict or background
    threshold_bytes: int = defaults.VERIFY_THRESHOLD_BYTES  # raw files this small: verified before a byte


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """What the kernel and libfuse are told (fs.py, mount.py): options, ownership, timeouts."""

    nonempty: bool = False  # mount over a directory that has entries (hiding them)
    uid: int | None = None
    gid: int | None = None
    fuse_options: tuple[str, ...] = field(default_factory=tuple)
    debug: bool = False
    attr_timeout_s: float = 86400.0  # contents never change under a mount: let the kernel keep them
    read_ahead_kb: int = defaults.READ_AHEAD_KB  # the kernel's read-ahead for the mount (0: leave its default)
    request_bound_s: float = math.inf  # every FUSE request answered within this (settings.request_bound)


@dataclass(frozen=True, slots=True)
class PrefetchConfig:
    """Bytes fetched before anyone asks (prefetch.py, profile.py) and the recording of first reads
    that a later mount prefetches."""

    paths: tuple[str, ...] = ()  # paths whose bytes are fetched into the cache once mounted
    profile: str = "none"  # auto (the newest referrer), a file, or none
    record: bool = False  # record the order of first reads (profile.py), written on unmount
    record_seconds: float = 120.0  # ... for this long after the mount


@dataclass(frozen=True, slots=True)
class FollowConfig:
    """--follow: re-resolve the tag and switch archives (follow.py, generations.py)."""

    enabled: bool = False
    interval_s: float = defaults.FOLLOW_INTERVAL_S
    keep: int = defaults.FOLLOW_KEEP  # archives alive at most


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """The daemon's process and side rooms (daemon/): foreground or forked, the metrics endpoint."""

    foreground: bool = False
    metrics: str | None = None  # --metrics [HOST]:PORT: Prometheus endpoint (daemon/http.py); None: off


@dataclass(frozen=True, slots=True)
class MountConfig:
    """One mount, resolved once (cli/mounts.py) into a frozen configuration per layer; each layer
    is handed its own part, never the whole."""

    source: str
    mountpoint: Path
    registry: RegistryOptions = field(default_factory=RegistryOptions)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    follow: FollowConfig = field(default_factory=FollowConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)


# `-o` keys (mount(8), fstab) -> the option's dest (settings.resolve), and whether the key takes a value.
O_KEYS: dict[str, tuple[str, bool]] = {
    "cache_dir": ("cache_dir", True),
    "cache_size": ("cache_size", True),
    "verify": ("verify", True),
    "verify_threshold": ("verify_threshold", True),
    "uid": ("uid", True),
    "gid": ("gid", True),
    "chunk_size": ("chunk_size", True),
    "offline": ("offline", False),
    "no_stale_tag": ("no_stale_tag", False),
    "nonempty": ("nonempty", False),
    "prefetch": ("prefetch", True),
    "read_ahead_kb": ("read_ahead_kb", True),
    "record_profile": ("record_profile", False),
    "record_seconds": ("record_seconds", True),
    "prefetch_profile": ("prefetch_profile", True),
    "follow": ("follow", False),
    "follow_interval": ("follow_interval", True),
    "follow_keep": ("follow_keep", True),
}
# Passed through to the kernel/libfuse as given.
FUSE_PASSTHROUGH = frozenset({"allow_other", "allow_root", "default_permissions", "fsname", "subtype"})
# mount(8)'s generic options: accepted and ignored (the mount stays read-only).
GENERIC_IGNORED = frozenset(
    {
        "ro",
        "rw",
        "defaults",
        "auto",
        "noauto",
        "user",
        "nouser",
        "users",
        "_netdev",
        "nofail",
        "exec",
        "noexec",
        "suid",
        "nosuid",
        "dev",
        "nodev",
        "async",
        "sync",
        "atime",
        "noatime",
        "relatime",
        "norelatime",
        "strictatime",
    }
)


def split_o_options(values: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split `-o a=b,c` arguments into our keys (by O_KEYS) and FUSE pass-through options."""
    ours: dict[str, str] = {}
    fuse: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, val = item.partition("=")
            if key in O_KEYS:
                name, takes_value = O_KEYS[key]
                if takes_value and not sep:
                    raise UsageError(f"-o {key} needs a value ({key}=...)")
                if not takes_value and sep:
                    raise UsageError(f"-o {key} takes no value")
                ours[name] = val if takes_value else "1"
            elif key in FUSE_PASSTHROUGH:
                fuse.append(item)
            elif key in GENERIC_IGNORED or key.startswith(("x-systemd.", "x-", "comment=")):
                continue
            else:
                raise UsageError(f"unknown mount option -o {key}")
    return ours, fuse
