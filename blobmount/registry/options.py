"""Registry settings: frozen, built once by cli/ (options.py, mounts.py).

Kept free of httpx and trio: the CLI builds these before anything heavy is imported, so that the
mount can start talking to the registry on a background thread while the rest of it loads.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from blobmount import defaults
from blobmount.registry.auth import Credentials

DEFAULT_TIMEOUT_S = defaults.TIMEOUT_S


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A mirror of a registry (from --mirror or hosts.toml): where to send the same requests."""

    host: str  # host[:port]
    plain_http: bool | None = None  # None: loopback plain, else HTTPS (and --plain-http)
    insecure: bool = False  # skip TLS verification for this host only
    ca_file: Path | None = None
    resolve: bool = True  # may answer tag lookups (containerd's "resolve" capability)


@dataclass(frozen=True, slots=True)
class RegistryOptions:
    plain_http: tuple[str, ...] = ()  # HOST[:PORT] talked to over plain HTTP
    insecure: tuple[str, ...] = ()  # HOST[:PORT] whose TLS certificate is not verified
    ca_file: Path | None = None
    credentials: Credentials | None = None  # explicit --username/--password-*; else the files
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_connections: int = defaults.MAX_CONNECTIONS
    mirrors: tuple[str, ...] = ()  # --mirror HOST[:PORT], tried in order before the origin
    hosts_dir: Path | None = None  # containerd-style HOST/hosts.toml (default /etc/blobmount/certs.d)
    # Clients built from options with the same key share what they learned about authenticating
    # (tokens.SHARED): the mount's parent fetches a token, the forked daemon starts with it. A
    # value, not the state itself, so that these options stay immutable; a copy made with
    # dataclasses.replace shares too, two options built apart never do.
    auth_share: str = field(default_factory=lambda: secrets.token_hex(8), compare=False, repr=False)
