"""Registry settings (frozen, built once by cli.py) and the auth state their clients share.

Kept free of httpx and trio: the CLI builds these before anything heavy is imported, so that the
mount can start talking to the registry on a background thread while the rest of it loads.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from blobmount.registry.auth import Challenge, Credentials

DEFAULT_TIMEOUT_S = 30.0  # total time of one operation across retries (DESIGN §8 --timeout)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A mirror of a registry (from --mirror or hosts.toml): where to send the same requests."""

    host: str  # host[:port]
    plain_http: bool | None = None  # None: loopback plain, else HTTPS (and --plain-http)
    insecure: bool = False  # skip TLS verification for this host only
    ca_file: Path | None = None
    resolve: bool = True  # may answer tag lookups (containerd's "resolve" capability)


@dataclass(slots=True)
class SharedAuth:
    challenge: Challenge | None = None  # the last bearer challenge: a new token needs no 401 first
    header: str | None = field(default=None, repr=False)  # "Bearer ..." (a secret)
    refresh_at: float = 0.0  # time.monotonic(): trio's clock differs per run (random offset)
    basic: bool = False  # the server asked for basic auth


class AuthCache:
    """What one registry client learned about authenticating, for the others made from the same
    options: the mount's parent fetches a token while opening the archive, and the daemon (a fork,
    with a copy of this memory) starts with it instead of a 401 and a token round trip before its
    first read. Keyed by (base URL, scope); entries never leave the process (or its fork)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], SharedAuth] = {}
        self._lock = threading.Lock()  # clients of one options object may live on two threads

    def __repr__(self) -> str:
        return f"AuthCache({len(self._entries)} entries)"  # never the tokens

    def get(self, base: str, scope: str) -> SharedAuth | None:
        with self._lock:
            entry = self._entries.get((base, scope))
            return None if entry is None else SharedAuth(entry.challenge, entry.header, entry.refresh_at, entry.basic)

    def put_token(self, base: str, scope: str, challenge: Challenge, header: str, valid_s: float) -> None:
        with self._lock:
            self._entries[(base, scope)] = SharedAuth(challenge, header, time.monotonic() + valid_s)

    def put_basic(self, base: str, scope: str) -> None:
        with self._lock:
            self._entries[(base, scope)] = SharedAuth(basic=True)


@dataclass(frozen=True, slots=True)
class RegistryOptions:
    plain_http: tuple[str, ...] = ()  # HOST[:PORT] talked to over plain HTTP
    insecure: tuple[str, ...] = ()  # HOST[:PORT] whose TLS certificate is not verified
    ca_file: Path | None = None
    credentials: Credentials | None = None  # explicit --username/--password-*; else the files
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_connections: int = 8
    mirrors: tuple[str, ...] = ()  # --mirror HOST[:PORT], tried in order before the origin
    hosts_dir: Path | None = None  # containerd-style HOST/hosts.toml (default /etc/blobmount/certs.d)
    auth_cache: AuthCache = field(default_factory=AuthCache, compare=False, repr=False)
