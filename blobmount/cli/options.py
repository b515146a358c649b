"""Flags -> the library's frozen settings: registry options (secrets only from stdin or a file),
create options, and the mount's few values that a flag, an `-o` key or a default may give."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from blobmount import defaults
from blobmount.errors import UsageError

if TYPE_CHECKING:
    from blobmount.config import CacheConfig, MountConfig
    from blobmount.create import CreateOptions
    from blobmount.registry.options import RegistryOptions

log = logging.getLogger("blobmount")


def registry_options(args: argparse.Namespace) -> RegistryOptions:
    """Registry settings from flags; secrets only from stdin or a file, never argv or BLOBMOUNT_*."""
    from blobmount.registry.auth import Credentials, read_password_file
    from blobmount.registry.options import RegistryOptions

    known = getattr(args, "registry_options", None)
    if isinstance(known, RegistryOptions):  # asked twice (inspect and its referrers): stdin is read once
        return known
    creds = None
    if args.username:
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        elif args.password_file:
            password = read_password_file(args.password_file)
        elif getattr(args, "config_password", None):  # settings.py checked the file is 0600
            password = args.config_password
        else:
            raise UsageError("--username needs --password-stdin or --password-file")
        creds = Credentials(args.username, password)
    elif args.password_stdin or args.password_file:
        raise UsageError("--password-stdin/--password-file need --username")
    if args.timeout <= 0 or args.max_connections <= 0:
        raise UsageError("--timeout and --max-connections must be positive")
    options = args.registry_options = RegistryOptions(
        plain_http=tuple(args.plain_http),
        insecure=tuple(args.insecure),
        ca_file=args.ca_file,
        credentials=creds,
        timeout_s=args.timeout,
        max_connections=args.max_connections,
        mirrors=tuple(args.mirror),
        hosts_dir=args.hosts_dir,
    )
    return options


def create_options(args: argparse.Namespace) -> CreateOptions:
    from blobmount.config import parse_size
    from blobmount.create.options import SKIP_BELOW_BYTES, SKIP_EXTENSIONS, CreateOptions, extension_list

    if args.threads < 0:
        raise UsageError(f"--threads {args.threads}: 0 (one per core) or more")
    below = parse_size(args.skip_compression_below) if args.skip_compression_below is not None else SKIP_BELOW_BYTES
    exts = args.skip_compression_ext
    return CreateOptions(
        compression=args.compression,
        level=args.level,
        progress=args.progress,
        max_files=args.max_files,
        change_detection=args.change_detection,
        skip_compression=args.skip_compression,
        skip_below=below,
        skip_extensions=SKIP_EXTENSIONS if exts is None else extension_list(",".join(exts)),
        threads=args.threads,
    )


def chunk_size_of(text: str | None) -> int | None:
    """--chunk-size, checked; None for the chunk store's default."""
    from blobmount.config import parse_size

    if text is None:
        return None
    size = parse_size(text)
    if not (4 << 10) <= size <= (64 << 20) or size & (size - 1):
        raise UsageError(f"--chunk-size {text}: a power of two from 4K to 64M")
    return size


def read_ahead_of(value: int | None) -> int:
    """--read-ahead-kb (or its -o key, settings.resolve), checked; 1024 when neither is given."""
    if value is None:
        return defaults.READ_AHEAD_KB
    if not 0 <= value <= 1 << 20:
        raise UsageError("--read-ahead-kb: 0 to 1048576")
    return value


def positive_setting(flag: str, value: float | None, default: float) -> float:
    """A number > 0 (from its flag or its -o key, settings.resolve), else the default."""
    if value is None:
        return default
    if not value > 0:
        raise UsageError(f"{flag} {value:g}: must be more than 0")
    return value


def cache_dir_of(args: argparse.Namespace) -> Path:
    from blobmount.cache import default_cache_dir

    return Path(args.cache_dir) if args.cache_dir else default_cache_dir()


def profile_setting(value: str) -> str:
    """auto, none, or a file made absolute: the daemon reads it later, wherever it runs from."""
    return value if value in ("auto", "none") else os.path.abspath(value)


def record_seconds_of(value: float | None) -> float:
    from blobmount.profile import DEFAULT_RECORD_SECONDS

    if value is None:
        value = DEFAULT_RECORD_SECONDS
    if not 0 < value <= 86400 * 365:
        raise UsageError("--record-seconds: a positive number of seconds")
    return value


def cache_config(args: argparse.Namespace, directory: Path | None) -> CacheConfig:
    """--cache-dir (as the caller resolved it: `cp` and `prefetch` need the directory itself, a
    mount leaves None to the daemon), --cache-size and --chunk-size, checked."""
    from blobmount.config import CacheConfig, parse_size

    return CacheConfig(
        dir=directory,
        size_bytes=parse_size(args.cache_size) if args.cache_size else defaults.CACHE_SIZE_BYTES,
        chunk_size=chunk_size_of(args.chunk_size),
    )


def mount_config(args: argparse.Namespace) -> MountConfig:
    """The resolved flags (settings.resolve) as one frozen configuration per layer, built once; the
    kernel's FUSE request timeout read now, --timeout lowered under it (with a warning)."""
    from blobmount.config import (
        DaemonConfig,
        FollowConfig,
        KernelConfig,
        MountConfig,
        PrefetchConfig,
        RemoteConfig,
        VerifyConfig,
        parse_size,
        split_o_options,
    )
    from blobmount.settings import clamp_timeout, kernel_request_timeout, request_bound

    if not args.source or not args.mountpoint:
        raise UsageError("mount needs SOURCE and MOUNTPOINT (arguments, or BLOBMOUNT_SOURCE and BLOBMOUNT_MOUNTPOINT)")
    _, fuse_opts = split_o_options(args.options)  # our keys are in args already (settings.resolve)
    uid, gid = args.uid, args.gid
    if args.owner_self:
        uid, gid = os.getuid(), os.getgid()
    kernel_s = kernel_request_timeout()  # before the source opens: its requests obey --timeout too
    args.timeout, clamped = clamp_timeout(args.timeout, kernel_s)
    if clamped:
        log.warning("%s", clamped)
    config = MountConfig(
        source=args.source,
        mountpoint=Path(args.mountpoint),
        registry=registry_options(args),
        remote=RemoteConfig(offline=args.offline, stale_tag=not args.no_stale_tag),
        cache=cache_config(args, Path(args.cache_dir) if args.cache_dir else None),
        verify=VerifyConfig(
            policy=args.verify or defaults.VERIFY_POLICY,
            threshold_bytes=parse_size(args.verify_threshold)
            if args.verify_threshold
            else defaults.VERIFY_THRESHOLD_BYTES,
        ),
        kernel=KernelConfig(
            nonempty=args.nonempty,
            uid=uid,
            gid=gid,
            fuse_options=tuple(fuse_opts),
            debug=args.debug,
            read_ahead_kb=read_ahead_of(args.read_ahead_kb),
            request_bound_s=request_bound(kernel_s),
        ),
        prefetch=PrefetchConfig(
            paths=tuple(args.prefetch),
            profile=profile_setting(args.prefetch_profile or "none"),
            record=args.record_profile,
            record_seconds=record_seconds_of(args.record_seconds),
        ),
        follow=FollowConfig(
            enabled=args.follow,
            interval_s=positive_setting("--follow-interval", args.follow_interval, defaults.FOLLOW_INTERVAL_S),
            keep=int(positive_setting("--follow-keep", args.follow_keep, defaults.FOLLOW_KEEP)),
        ),
        daemon=DaemonConfig(foreground=args.foreground, metrics=args.metrics),
    )
    if config.follow.keep < 2:
        raise UsageError("--follow-keep: at least 2 (the archive served and the one before it)")
    return config
