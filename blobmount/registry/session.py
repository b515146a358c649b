"""The request path of one repository on one registry: its base URL and scheme, where credentials
may go, and :meth:`Session.request`, the one way a request is sent (the Authorization header from
tokens.py, one retry per 401, transient failures retried by the one policy in retry.py) over
transport.py. The distribution API (client.py) and uploads (upload.py) are built on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from blobmount.errors import AuthError, BlobmountError
from blobmount.reference import Reference, host_matches
from blobmount.registry.options import Endpoint, RegistryOptions
from blobmount.registry.retry import MAX_ATTEMPTS, Retry
from blobmount.registry.tokens import RegistryAuth
from blobmount.registry.transport import Stats, Transport, release

if TYPE_CHECKING:
    import httpx


class Session:
    """One repository on one registry, as far as sending requests goes. Create and use it inside a
    running trio loop."""

    def __init__(
        self,
        ref: Reference,
        options: RegistryOptions | None = None,
        *,
        push: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
        endpoint: Endpoint | None = None,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        """`endpoint` names a mirror to talk to instead of the reference's registry (same
        repository path); `transport` is the test seam (httpx.MockTransport); None: the network.
        `max_attempts`: mirrors get 1, the next endpoint is the retry."""
        self.ref = ref
        self.options = options or RegistryOptions()
        self.retry = Retry(max_attempts)
        host = endpoint.host if endpoint else ref.api_host
        plain = self._plain_ok(host)
        if endpoint is not None and endpoint.plain_http is not None:
            plain = endpoint.plain_http
        self.base = f"{'http' if plain else 'https'}://{host}"
        self.host = host
        self.scope = f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"
        self.stats = Stats()
        insecure = any(host_matches(h, host) for h in self.options.insecure) or bool(endpoint and endpoint.insecure)
        ca_file = endpoint.ca_file if endpoint and endpoint.ca_file else self.options.ca_file
        self.transport = Transport(
            self.base, self.options, insecure=insecure, ca_file=ca_file, transport=transport, stats=self.stats
        )
        # a mirror gets only what is stored for the mirror's own host, never the origin's
        # credentials (--username, or the files' entry for the origin)
        self.auth = RegistryAuth(
            host=host,
            base=self.base,
            scope=self.scope,
            options=self.options,
            creds_host=endpoint.host if endpoint else ref.registry,
            credentials=None if endpoint else self.options.credentials,
            send=self.transport.send,
            same_origin=self._same_origin,
            plain_allowed=self._plain_allowed,
        )

    @property
    def max_attempts(self) -> int:
        return self.retry.attempts

    @property
    def last_error(self) -> BlobmountError | None:
        """What the last retry was for (timeout messages)."""
        return self.retry.last_error

    def _plain_ok(self, host: str) -> bool:
        """Whether plain HTTP is right for `host` (host[:port]): loopback, or named with --plain-http.
        The one rule for the registry's scheme and for where credentials may go in clear."""
        loopback = Reference(host, self.ref.repository, None, None).plain_http_default
        return loopback or any(host_matches(h, host) for h in self.options.plain_http)

    def _plain_allowed(self, url: str) -> bool:
        """Whether credentials may travel to `url`. A challenge can point anywhere; a realm on plain
        HTTP elsewhere would put the password on the wire in clear."""
        parts = urlsplit(url)
        return parts.scheme == "https" or self._plain_ok(parts.netloc)

    def _same_origin(self, url: str) -> bool:
        """Whether `url` is this registry (scheme and host:port): only then our client, its TLS
        settings and our Authorization header are used."""
        parts, base = urlsplit(url), urlsplit(self.base)
        return (parts.scheme, parts.netloc) == (base.scheme, base.netloc)

    async def aclose(self) -> None:
        await self.transport.aclose()

    # -- the request path ------------------------------------------------------------------------

    async def _send(self, method: str, url: str, **kw: Any) -> httpx.Response:
        response = await self.transport.send(method, url, **kw)
        if response.status_code != 429 and response.status_code < 500:
            self.retry.answered()
        return response

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        content: Any = None,
        kind: str,
        retry: bool = True,
    ) -> httpx.Response:
        """A registry request with auth (one retry per 401) and transient retries, streamed.
        `retry=False`: the caller retries the whole exchange itself (blob reads, whose body can
        fail too); retrying here as well multiplied the attempts (6 x 6 against a 503)."""
        url = path if path.startswith(("http://", "https://")) else self.base + path
        same = self._same_origin(url)
        attempt = 0
        auth_retries = 0
        while True:
            attempt += 1
            try:
                used = await self.auth.header() if same else None
                hdrs = dict(headers or {})
                if used:  # never to another host
                    hdrs["Authorization"] = used
                response = await self._send(method, url, headers=hdrs, content=content, kind=kind, to_registry=same)
                if response.status_code == 401 and auth_retries < 2:
                    await release(response)
                    await self.auth.unauthorized(response, used)  # a failing token endpoint is retried
                    auth_retries += 1  # ... as a transient error, without using up these
                    continue
                if response.status_code == 401:
                    await release(response)
                    raise AuthError(f"{self.host}: {method} {_short(url)}: {self.auth.refusal(response)}")
                if response.status_code == 403:
                    await release(response)
                    raise AuthError(f"{self.host}: {method} {_short(url)}: access denied (403)")
                return response
            except BlobmountError as exc:
                replayable = content is None or isinstance(content, bytes)
                if not retry or not replayable or not self.retry.should_retry(attempt, exc):
                    raise
                await self.retry.pause(attempt, exc)


def _short(url: str) -> str:
    return urlsplit(url).path[:120]
