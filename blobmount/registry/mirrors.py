"""Mirrors: which endpoints serve a registry's content, and trying them in order before the origin.

Sources: ``--mirror HOST[:PORT]`` (repeatable, for the reference's registry) and containerd's
``hosts.toml`` layout, ``HOSTS_DIR/<registry>/hosts.toml`` (default ``/etc/blobmount/certs.d``)::

    [host."http://127.0.0.1:5001"]
      capabilities = ["pull", "resolve"]
      skip_verify = false
      ca = "/etc/ssl/mirror-ca.pem"

Mirrors are never trusted for content: every manifest, index and file is checked against its
digest, so a mirror can only be slow or wrong, never believed. Any failure of a mirror (down,
404, auth, a digest mismatch) moves on to the next endpoint, and finally to the origin. A failing
mirror is skipped for ``MIRROR_BACKOFF_S`` before it is tried again. A pull-through cache that has
not stored a blob yet answers a range with the whole blob (200): that is detected before the body
is read (the connection is dropped, nothing is downloaded) and the ranges go to the next endpoint
meanwhile; the cache fills itself from the origin on its own. A mirror never receives the
origin's credentials: only what the credential files hold for the mirror's own host.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlsplit

import trio

from blobmount.errors import BlobmountError, UsageError
from blobmount.reference import Reference
from blobmount.registry.client import Endpoint, RangeNotSupported, RegistryClient, RegistryOptions

log = logging.getLogger(__name__)

DEFAULT_HOSTS_DIR = Path("/etc/blobmount/certs.d")
MIRROR_BACKOFF_S = 30.0  # a mirror that just failed is likely to fail again right away


def load_hosts_toml(hosts_dir: Path, registry: str) -> list[Endpoint]:
    """Mirror endpoints for `registry` from ``hosts_dir/registry/hosts.toml`` (absent: none)."""
    path = hosts_dir / registry / "hosts.toml"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: {exc}") from exc
    import tomllib  # only when there is a file: most mounts have none

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: {exc}") from exc
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict):
        raise UsageError(f"{path}: [host] must be a table of URLs")
    out = []
    for url, conf in hosts.items():
        parts = urlsplit(url if "://" in url else f"https://{url}")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UsageError(f"{path}: host {url!r} is not an http(s) URL")
        conf = conf if isinstance(conf, dict) else {}
        caps = conf.get("capabilities", ["pull", "resolve"])
        if not isinstance(caps, list) or "pull" not in caps:
            continue
        ca = conf.get("ca")  # containerd reads a relative path from the hosts.toml's directory
        out.append(
            Endpoint(
                host=parts.netloc,
                plain_http=parts.scheme == "http",
                insecure=bool(conf.get("skip_verify", False)),
                ca_file=path.parent / ca if isinstance(ca, str) else None,
                resolve="resolve" in caps,
            )
        )
    return out


def endpoints_for(ref: Reference, options: RegistryOptions) -> list[Endpoint]:
    """Mirrors in the order to try them (flags first, then hosts.toml); the origin is not listed."""
    flags = [Endpoint(host) for host in options.mirrors]
    return flags + load_hosts_toml(options.hosts_dir or DEFAULT_HOSTS_DIR, ref.registry)


class Endpoints:
    """Clients for the mirrors and the origin, and the rule for trying them."""

    def __init__(self, ref: Reference, options: RegistryOptions, *, origin: RegistryClient | None = None) -> None:
        """`origin` replaces the origin's client (the test seam for injected transports)."""
        self.ref = ref
        self.mirrors = endpoints_for(ref, options)
        self.clients = [RegistryClient(ref, options, endpoint=e, max_attempts=1) for e in self.mirrors]
        self.clients.append(origin or RegistryClient(ref, options))
        self._down_until = [0.0] * len(self.clients)

    @property
    def origin(self) -> RegistryClient:
        return self.clients[-1]

    def candidates(self, *, resolve: bool = False, mirrors: bool = True) -> list[RegistryClient]:
        """The clients to try, in order: mirrors not resting after a failure (unless `mirrors` is
        False: bytes that failed verification are fetched again from the origin only; `resolve`:
        only mirrors that may answer tag lookups), then the origin, always last. The caller tries
        each in turn and reports a failure to :meth:`failed` (no callback into the caller: the
        caller's loop calls down, this class only keeps the rule)."""
        out = []
        for i, client in enumerate(self.clients[:-1]):
            if not mirrors or (resolve and not self.mirrors[i].resolve):
                continue
            if trio.current_time() < self._down_until[i]:
                continue
            out.append(client)
        return [*out, self.origin]

    def failed(self, client: RegistryClient, exc: BlobmountError) -> None:
        """`client` failed with `exc`: the origin's error is raised; a mirror rests for
        MIRROR_BACKOFF_S and the next endpoint is tried."""
        if client is self.origin:
            raise exc
        self._down_until[self.clients.index(client)] = trio.current_time() + MIRROR_BACKOFF_S
        if isinstance(exc, RangeNotSupported):  # expected of a cold pull-through cache
            log.info(
                "mirror %s answers ranges with the whole blob (a pull-through cache that has not"
                " stored it yet); the next endpoint serves for %.0f s",
                client.host,
                MIRROR_BACKOFF_S,
            )
        else:
            log.warning("mirror %s failed (%s); trying the next endpoint", client.host, exc)

    def last_error(self) -> BlobmountError | None:
        """The origin's last retried failure, else a mirror's: what an overall timeout was spent on."""
        return next((c.last_error for c in reversed(self.clients) if c.last_error is not None), None)

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()
