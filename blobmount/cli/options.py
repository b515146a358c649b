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
