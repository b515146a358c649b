"""The auth state of one registry client: which Authorization header a request carries, and how a
401 changes it (a bearer token fetched from the challenge's realm, or basic credentials).

Anonymous first; a 401 with a ``Bearer`` challenge fetches a token from the realm (with basic
credentials when we have them) and the request is sent again; a ``Basic`` challenge sends the
credentials. Tokens are refreshed when they expire or when a request answers 401, under one lock,
so concurrent reads in flight wait for the same refresh instead of failing. What one client
learned is handed to later clients of the same options (:data:`SHARED`, keyed by the options'
``auth_share``: the mount's parent fetches a token, the forked daemon starts with it).
Credentials are looked up (auth.py) only when a challenge asks for them; a mirror is given only
what is stored for its own host.

Requests go out through the client's transport (given at construction); nothing here retries: a
token endpoint's transient failure is the request's, retried by the client's one loop.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

import trio

from blobmount.errors import AuthError, TransientError
from blobmount.lru import LRU
from blobmount.registry.auth import Challenge, Credentials, find_credentials, parse_www_authenticate
from blobmount.registry.options import RegistryOptions
from blobmount.registry.retry import RetryLater
from blobmount.registry.transport import read_limited

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

TOKEN_MARGIN_S = 10.0  # refresh a bearer token this long before it expires (a request takes time) ...
TOKEN_MARGIN_FRACTION = 0.25  # ... but at most this part of its life: a 4 s token is still used for 3 s
DEFAULT_TOKEN_LIFETIME_S = 60.0  # the token spec's default when expires_in is absent
TOKEN_CLIENT_ID = "blobmount"  # the OAuth2 client_id the token spec asks refresh-token requests to name
MAX_TOKEN_ANSWER_BYTES = 1 << 20  # a token answer is a few KiB; a hostile realm must not fill memory

SHARED_ENTRIES = 256  # (options, registry, scope) triples remembered per process; a daemon uses a handful

Send = Callable[..., Awaitable["httpx.Response"]]  # Transport.send


@dataclass(slots=True)
class SharedAuth:
    challenge: Challenge | None = None  # the last bearer challenge: a new token needs no 401 first
    header: str | None = field(default=None, repr=False)  # "Bearer ..." (a secret)
    refresh_at: float = 0.0  # time.monotonic(): trio's clock differs per run (random offset)
    basic: bool = False  # the server asked for basic auth


class SharedTokens:
    """What one registry client learned about authenticating, for the later clients of the same
    options (``RegistryOptions.auth_share``): the mount's parent fetches a token while opening the
    archive, and the daemon (a fork, with a copy of this memory) starts with it instead of a 401
    and a token round trip before its first read. Entries never leave the process (or its fork);
    the oldest are dropped past :data:`SHARED_ENTRIES`, so a long-lived process that builds many
    options (the Python API) does not grow with them."""

    def __init__(self, max_entries: int = SHARED_ENTRIES) -> None:
        self._entries: LRU[tuple[str, str, str], SharedAuth] = LRU(max_entries)
        self._lock = threading.Lock()  # clients of one options object may live on two threads

    def __repr__(self) -> str:
        return f"SharedTokens({len(self._entries)} entries)"  # never the tokens

    def get(self, key: tuple[str, str, str]) -> SharedAuth | None:
        with self._lock:
            entry = self._entries.peek(key)
            return None if entry is None else SharedAuth(entry.challenge, entry.header, entry.refresh_at, entry.basic)

    def put(self, key: tuple[str, str, str], entry: SharedAuth) -> None:
        with self._lock:
            self._entries.put(key, entry)


SHARED = SharedTokens()


@dataclass(slots=True)
class _Token:
    header: str
    refresh_at: float  # trio.current_time() clock: from then on a new token is fetched before sending


class RegistryAuth:
    """Token and credential state for one (registry base URL, scope)."""

    def __init__(
        self,
        *,
        host: str,
        base: str,
        scope: str,
        options: RegistryOptions,
        creds_host: str,
        credentials: Credentials | None,
        send: Send,
        same_origin: Callable[[str], bool],
        plain_allowed: Callable[[str], bool],
    ) -> None:
        self.host, self.base, self.scope = host, base, scope
        self.creds_host = creds_host
        self._creds = credentials
        self._creds_loaded = credentials is not None
        self._send = send
        self._same_origin = same_origin
        self._plain_allowed = plain_allowed
        self._token: _Token | None = None
        self._challenge: Challenge | None = None
        self._basic = False
        self._lock = trio.Lock()
        self._shared_loaded = False
        self._shared_key = (options.auth_share, base, scope)

    def credentials(self) -> Credentials | None:
        if not self._creds_loaded:
            self._creds = find_credentials(self.creds_host)
            self._creds_loaded = True
        return self._creds

    def _load_shared(self) -> None:
        """Start from what another client of the same options learned (the mount's parent, for
        the daemon): the challenge, a token still valid, or that basic auth is wanted."""
        self._shared_loaded = True
        shared = SHARED.get(self._shared_key)
        if shared is None:
            return
        self._challenge, self._basic = shared.challenge, shared.basic
        remaining = shared.refresh_at - time.monotonic()
        if shared.header is not None and remaining > 0:
            self._token = _Token(shared.header, trio.current_time() + remaining)

    def _current(self) -> str | None:
        if self._token is not None:
            if trio.current_time() < self._token.refresh_at:
                return self._token.header
            return None
        if self._basic:
            creds = self.credentials()
            return creds.basic_header() if creds else None
        return None

    async def header(self) -> str | None:
        """The Authorization header for the next request (refreshing an expired token first, so
        that reads in flight wait for one refresh instead of each collecting a 401)."""
        if not self._shared_loaded:
            self._load_shared()
        used = self._current()
        if used is None and (self._token is not None or self._basic or self._challenge is not None):
            async with self._lock:
                used = self._current()
                if used is None and self._challenge is not None:
                    await self._fetch_token(self._challenge)
                    used = self._current()
        return used

    async def unauthorized(self, response: httpx.Response, used: str | None) -> None:
        """React to a 401: fetch or refresh a token, or switch to basic auth. Single-flight."""
        async with self._lock:
            if self._current() != used and self._current() is not None:
                return  # another task refreshed while we waited
            challenges = parse_www_authenticate(response.headers.get("www-authenticate", ""))
            bearer = next((c for c in challenges if c.scheme == "bearer"), None)
            if bearer is not None:
                await self._fetch_token(bearer)
                return
            if any(c.scheme == "basic" for c in challenges):
                if self.credentials() is None:
                    raise AuthError(f"{self.host}: authentication required and no credentials found")
                if self._basic:
                    raise AuthError(f"{self.host}: credentials refused (basic auth)")
                self._basic = True
                SHARED.put(self._shared_key, SharedAuth(basic=True))
                return
            raise AuthError(f"{self.host}: 401 without a usable WWW-Authenticate challenge")

    def refusal(self, response: httpx.Response) -> str:
        """Why a request stayed unauthorized after fresh credentials: the one line the user sees."""
        challenges = parse_www_authenticate(response.headers.get("www-authenticate", ""))
        errors = {c.params.get("error") for c in challenges}
        if self.credentials() is None:
            return f"authentication required and no credentials found for {self.creds_host} (401)"
        if "insufficient_scope" in errors:
            return f"access denied: the credentials do not grant {self.scope} (401 insufficient_scope)"
        return "credentials refused (401)"

    async def _fetch_token(self, challenge: Challenge) -> None:
        """A bearer token from the challenge's realm (the distribution token spec): an OAuth2 POST
        when we hold an identity (refresh) token, else a GET, with basic credentials when we have
        them (anonymous otherwise: public repositories hand out pull tokens)."""
        realm = challenge.params.get("realm")
        if not realm or urlsplit(realm).scheme not in ("http", "https"):
            raise AuthError(f"{self.host}: bearer challenge without a usable realm")
        where = f"{self.host}: token endpoint {urlsplit(realm).netloc}"
        form = {"scope": self.scope}
        if challenge.params.get("service"):
            form["service"] = challenge.params["service"]
        creds = self.credentials()
        if creds is not None and not self._plain_allowed(realm):
            netloc = urlsplit(realm).netloc
            raise AuthError(
                f"{where} is plain http://: refusing to send credentials over it"
                f" (--plain-http {netloc} if that is intended)"
            )
        headers = {"Accept": "application/json"}
        content: bytes | None = None
        if creds is not None and creds.identity_token:
            method, url = "POST", realm
            form.update(grant_type="refresh_token", refresh_token=creds.identity_token, client_id=TOKEN_CLIENT_ID)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            content = urlencode(form).encode()
        else:
            method, url = "GET", realm + ("&" if "?" in realm else "?") + urlencode(form)
            if creds is not None and creds.username and creds.password:
                headers["Authorization"] = creds.basic_header()
        # the realm on the registry's own host shares its connections and TLS settings
        try:
            response = await self._send(
                method, url, headers=headers, content=content, kind="token", to_registry=self._same_origin(realm)
            )
        except RetryLater as exc:
            raise RetryLater(f"{where} answered {exc.status}", exc.retry_after_s) from exc
        except TransientError as exc:
            raise TransientError(f"{where} unreachable ({exc})") from exc
        try:
            if response.status_code in (401, 403):
                refused = "refused the credentials" if creds is not None else "refused an anonymous token"
                raise AuthError(f"{where} {refused} ({response.status_code})")
            if response.status_code != 200:
                raise AuthError(f"{where} answered {response.status_code}")
            body = await read_limited(response, MAX_TOKEN_ANSWER_BYTES, where)
        finally:
            await response.aclose()
        self._accept(challenge, body, where)

    def _accept(self, challenge: Challenge, body: bytes, where: str) -> None:
        try:
            doc: Any = json.loads(body)
        except ValueError as exc:
            raise AuthError(f"{where} answered something that is not JSON") from exc
        token = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise AuthError(f"{where} answered no token")
        lifetime = doc.get("expires_in")
        seconds = float(lifetime) if isinstance(lifetime, int | float) and lifetime > 0 else DEFAULT_TOKEN_LIFETIME_S
        margin = min(TOKEN_MARGIN_S, seconds * TOKEN_MARGIN_FRACTION)
        self._token = _Token(f"Bearer {token}", trio.current_time() + seconds - margin)
        self._challenge = challenge
        SHARED.put(self._shared_key, SharedAuth(challenge, self._token.header, time.monotonic() + seconds - margin))
        log.debug("%s: bearer token for %s, valid %.0f s", self.host, self.scope, seconds)
