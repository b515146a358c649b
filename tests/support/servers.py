"""Real servers for tests: Debian's docker-registry (the CNCF distribution server) on 127.0.0.1 with
a free port and temp storage; a token issuer that signs the JWTs docker-registry's ``auth: token``
verifies; and a small HTTP proxy in front of a registry that imitates what other registries do
(bearer challenges, 307 to storage, 200 for ranges, 429, refused HEADs, failed PUTs, stalls).
Processes are started and stopped by PID; the in-process servers run on their own threads."""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

REGISTRY_BIN = "/usr/bin/docker-registry"
START_WAIT_S = 20.0
ISSUER_NAME = "blobmount-test-issuer"  # the JWT `iss` docker-registry is configured to trust
TOKEN_SERVICE = "blobmount-test"  # the `service` of the registry's challenge and the JWT `aud`
REGISTRY_LEEWAY_S = 60  # docker-registry still accepts a token this long past its `exp` (clock skew)
HOLD_LIMIT_S = 60.0  # the longest the quirk proxy holds an upload for a test
RELAY_BLOCK_BYTES = 64 << 10  # the quirk proxy relays bodies in blocks, so a hang-up stops it early


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def bcrypt_hash(password: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # the stdlib's, deprecated but present in 3.11; bcrypt is what htpasswd needs

        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))


@dataclass
class Registry:
    """A running docker-registry. `host` is 127.0.0.1:PORT."""

    root: Path
    port: int
    proc: subprocess.Popen[bytes]
    user: str | None = None
    password: str | None = None
    token: TokenIssuer | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def blob_path(self, digest_hex: str) -> Path:
        return self.root / "data/docker/registry/v2/blobs/sha256" / digest_hex[:2] / digest_hex / "data"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_registry(
    root: Path,
    *,
    user: str | None = None,
    password: str | None = None,
    proxy_of: str | None = None,
    token: TokenIssuer | None = None,
    access_log: bool = False,
) -> Registry:
    """`proxy_of` HOST:PORT makes it a pull-through cache of that registry (access log on); `token`
    makes it trust that issuer's JWTs (`auth: token`); `user`/`password` turn on htpasswd."""
    if not os.path.exists(REGISTRY_BIN):
        pytest.fail(f"{REGISTRY_BIN} is missing: apt-get install docker-registry (make test does)")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": proxy_of is None and not access_log}},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }
    if proxy_of is not None:
        config["proxy"] = {"remoteurl": f"http://{proxy_of}"}
    if user is not None and password is not None:
        (root / "htpasswd").write_text(f"{user}:{bcrypt_hash(password)}\n")
        config["auth"] = {"htpasswd": {"realm": "blobmount-test", "path": str(root / "htpasswd")}}
    if token is not None:
        config["auth"] = {
            "token": {
                "realm": token.realm,
                "service": TOKEN_SERVICE,
                "issuer": ISSUER_NAME,
                "rootcertbundle": str(token.key.cert),
            }
        }
    (root / "config.yml").write_text(json.dumps(config))  # YAML is a superset of JSON
    log = open(root / "registry.log", "wb")
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(root / "config.yml")], stdout=log, stderr=log)
    log.close()
    reg = Registry(root, port, proc, user, password, token)
    deadline = time.monotonic() + START_WAIT_S
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                reg.stop()
                pytest.fail(f"docker-registry did not start:\n{(root / 'registry.log').read_text()}")
            time.sleep(0.05)
    return reg


def _http_server(
    handle: Callable[[http.server.BaseHTTPRequestHandler], None], host: str = "127.0.0.1", port: int = 0
) -> http.server.ThreadingHTTPServer:
    """A threaded HTTP/1.1 server (a free loopback port by default) calling `handle` for every method."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # headers and body leave in two writes: with Nagle the body would wait for the client's
        # (delayed) ACK, a round trip that belongs to this test server, not to the client measured
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            handle(self)

        do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = do_GET

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: object, client_address: object) -> None:
            """A client hanging up mid-answer is normal here (tests stop reading, kill pushes); a
            traceback on stderr would also land in the CLI output the tests check."""

    server = Server((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _reply(h: http.server.BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


@dataclass(frozen=True)
class SigningKey:
    """An RSA key and its self-signed certificate, made and used through the openssl CLI so that
    neither the project nor its tests need a crypto library."""

    key: Path
    cert: Path  # docker-registry's `rootcertbundle`
    x5c: str  # base64 DER of the certificate: the JWT header's chain, verified against that bundle

    @classmethod
    def create(cls, directory: Path) -> SigningKey:
        if shutil.which("openssl") is None:
            pytest.fail("the openssl command is missing: apt-get install openssl (make test does)")
        directory.mkdir(parents=True, exist_ok=True)
        key, cert = directory / "issuer.key", directory / "issuer.crt"
        new_cert = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
        subprocess.run(
            [*new_cert, "-subj", f"/CN={ISSUER_NAME}", "-keyout", str(key), "-out", str(cert)],
            check=True,
            capture_output=True,
        )
        return cls.load(directory)

    @classmethod
    def load(cls, directory: Path) -> SigningKey:
        """The key and certificate `create` left in `directory`."""
        key, cert = directory / "issuer.key", directory / "issuer.crt"
        der = subprocess.run(
            ["openssl", "x509", "-in", str(cert), "-outform", "DER"], check=True, capture_output=True
        ).stdout
        return cls(key, cert, base64.b64encode(der).decode())

    def sign(self, data: bytes) -> bytes:
        """RS256 is RSASSA-PKCS1-v1_5 over SHA-256: exactly what `openssl dgst -sha256 -sign` makes."""
        return subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=data, check=True, capture_output=True
        ).stdout


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class IssuerState:
    """What the token issuer answers; tests change these between requests."""

    users: dict[str, str] = field(default_factory=dict)  # user -> password: granted pull and push
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # OAuth2 refresh token -> user
    anonymous: bool = True  # anonymous requests get pull (never push) tokens
    answer: tuple[str, ...] = ("token",)  # the JSON field(s) that carry the JWT: token, access_token
    expires_in: int | None = 300  # what the answer says (None: left out, the spec's 60 s default)
    lifetime_s: int = 300  # how long docker-registry really accepts the token (may differ: a lie)
    fail_next: list[int] = field(default_factory=list)  # statuses to answer the next requests with
    body: bytes | None = None  # answer 200 with this body instead of a token (broken issuers)
    issued: list[tuple[str, str, float]] = field(default_factory=list)  # (subject, access, time)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class TokenIssuer:
    """The token server of the distribution auth spec, for docker-registry's `auth: token`: GET
    with optional basic credentials, POST with an OAuth2 refresh token or password; signs RS256
    JWTs whose x5c chain is the self-signed certificate the registry trusts."""

    def __init__(self, key: SigningKey, host: str = "127.0.0.1", port: int = 0) -> None:
        self.key = key
        self.state = IssuerState()
        self.server = _http_server(self._handle, host, port)
        self.listen_host = host
        self.port: int = self.server.server_address[1]

    @property
    def realm(self) -> str:
        return f"http://{self.listen_host}:{self.port}/token"

    def reset(self) -> None:
        self.state = IssuerState(users=self.state.users)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        st = self.state
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length).decode() if length else ""
        query = parse_qs(urlsplit(h.path).query) if h.command == "GET" else parse_qs(body)
        with st.lock:
            st.requests.append((h.command, h.path, {k.lower(): v for k, v in h.headers.items()}))
            forced = st.fail_next.pop(0) if st.fail_next else None
        if forced is not None:
            _reply(h, forced, {"Content-Type": "application/json"}, b'{"errors":[{"code":"UNAVAILABLE"}]}')
            return
        if urlsplit(h.path).path != "/token" or h.command not in ("GET", "POST"):
            _reply(h, 404, {}, b"")
            return
        user = self._authenticate(h, query)
        if user is None or (user == "" and not st.anonymous):
            _reply(h, 401, {"Content-Type": "application/json"}, b'{"details":"incorrect username or password"}')
            return
        if st.body is not None:
            _reply(h, 200, {"Content-Type": "application/json"}, st.body)
            return
        access = [a for scope in query.get("scope", []) if (a := self._grant(scope, user)) is not None]
        jwt = self._jwt(user, query.get("service", [""])[0], access)
        doc: dict[str, object] = {field_name: jwt for field_name in st.answer}
        if st.expires_in is not None:
            doc["expires_in"] = st.expires_in
        with st.lock:
            st.issued.append((user, json.dumps(access), time.monotonic()))
        _reply(h, 200, {"Content-Type": "application/json"}, json.dumps(doc).encode())

    def _authenticate(self, h: http.server.BaseHTTPRequestHandler, query: dict[str, list[str]]) -> str | None:
        """The user name ('' anonymous), or None when the credentials are wrong."""
        st = self.state
        if h.command == "POST":
            grant = query.get("grant_type", [""])[0]
            if grant == "refresh_token":
                return st.refresh_tokens.get(query.get("refresh_token", [""])[0])
            if grant == "password":
                user, password = query.get("username", [""])[0], query.get("password", [""])[0]
                return user if st.users.get(user) == password else None
            return None
        auth = h.headers.get("Authorization", "")
        if not auth:
            return ""
        if not auth.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        return user if user in st.users and st.users[user] == password else None

    @staticmethod
    def _grant(scope: str, user: str) -> dict[str, object] | None:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind != "repository" or not name:
            return None
        allowed = {"pull", "push"} if user else {"pull"}
        return {"type": kind, "name": name, "actions": sorted(set(actions.split(",")) & allowed)}

    def _jwt(self, user: str, service: str, access: list[dict[str, object]]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.key.x5c]}
        claims = {
            "iss": ISSUER_NAME,
            "sub": user,
            "aud": service,
            "exp": now + self.state.lifetime_s - REGISTRY_LEEWAY_S,  # refused `lifetime_s` from now
            "nbf": now - 1,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        return f"{signing_input}.{_b64url(self.key.sign(signing_input.encode()))}"


@dataclass
class QuirkState:
    """What the proxy does; tests flip these between requests."""

    bearer: bool = False  # demand a bearer token issued by /token
    token_lifetime_s: int = 300
    redirect_blobs: bool = False  # answer blob GETs with 307 to /storage/...
    ignore_ranges: bool = False  # answer ranges with 200 and the whole body
    corrupt_ranges: bool = False  # flip one byte in every 206 body (a broken mirror)
    fail_next: list[int] = field(default_factory=list)  # statuses to answer the next requests with
    retry_after: str | None = None
    head: str = "pass"  # manifest HEADs: "pass", "refuse" (405) or "no-digest" (header dropped)
    fail_manifest_put: int | None = None  # answer every manifest PUT with this status
    hold_uploads_over: int | None = None  # hold blob uploads (PUT/PATCH) with larger bodies ...
    lose_patch_answer: int | None = None  # forward the Nth upload PATCH (1-based), then answer 502
    patches: int = 0
    upload_held: threading.Event = field(default_factory=threading.Event)  # set when one is held
    release: threading.Event = field(default_factory=threading.Event)  # ... until this is set
    blob_gets_meet: threading.Barrier | None = None  # blob GETs wait here for each other ...
    blob_gets_met: bool = False  # ... and this says whether they were in flight together
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)  # the client's port per request of `seen`
    body_bytes_sent: int = 0  # response body bytes written to clients (stops when they hang up)
    tokens_issued: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class QuirkProxy:
    """An HTTP proxy in front of a registry (same process, its own thread). tests/support/faults.py extends it
    with switchable faults: the hooks for that are :meth:`answer` (every upstream answer goes out
    through it unless bodies are streamed) and the set of live client connections (so a subclass
    can cut them)."""

    streams_bodies = True  # relay large bodies as they come, counting what the client took

    def __init__(self, upstream: str, *, port: int | None = None, tls: ssl.SSLContext | None = None) -> None:
        """`tls`: serve HTTPS with this server context (a registry with a certificate)."""
        self.upstream = upstream
        self.state = QuirkState()
        self.port = port or free_port()
        self.tls = tls
        self.live: set[socket.socket] = set()  # client connections being served
        self._start()

    def _start(self) -> None:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # see _http_server: no round trip of this server's own

            def log_message(self, format: str, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with proxy.state.lock:
                    proxy.live.add(self.connection)

            def finish(self) -> None:
                try:
                    super().finish()
                finally:
                    with proxy.state.lock:
                        proxy.live.discard(self.connection)

            def do_GET(self) -> None:
                proxy.handle(self)

            do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = do_GET

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # clients hanging up mid-answer is what the fault tests do on purpose

        self.server = Server(("127.0.0.1", self.port), Handler)
        if self.tls is not None:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        # a short poll: shutdown() (each stop, each FaultProxy.down) waits for one poll interval
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        st = self.state
        path = h.path
        with st.lock:
            st.seen.append((h.command, path, {k.lower(): v for k, v in h.headers.items()}))
            st.ports.append(h.client_address[1])  # one port per connection
            forced = st.fail_next.pop(0) if st.fail_next else None
        length = int(h.headers.get("Content-Length") or 0)
        upload = h.command in ("PUT", "PATCH") and "/blobs/uploads/" in path
        if upload and st.hold_uploads_over is not None and length > st.hold_uploads_over:
            st.upload_held.set()
            st.release.wait(HOLD_LIMIT_S)  # bounded: a test that forgets to release still ends
        body = h.rfile.read(length) if length else b""
        lose_answer = False
        if upload and h.command == "PATCH":
            with st.lock:
                st.patches += 1
                lose_answer = st.patches == st.lose_patch_answer
        if forced is not None:
            headers = {"Retry-After": st.retry_after} if st.retry_after else {}
            _reply(h, forced, headers, b"")
            return
        if path.startswith("/token"):
            query = parse_qs(urlsplit(path).query)
            with st.lock:
                st.tokens_issued += 1
                token = f"tok{st.tokens_issued}"
            doc = {"token": token, "expires_in": st.token_lifetime_s, "scope": query.get("scope", [""])[0]}
            _reply(h, 200, {"Content-Type": "application/json"}, json.dumps(doc).encode())
            return
        if path.startswith("/storage/"):
            if h.headers.get("Authorization"):
                _reply(h, 400, {}, b"registry credentials leaked to storage")
                return
            path = path[len("/storage") :]
        elif st.bearer:
            auth = h.headers.get("Authorization", "")
            if not auth.startswith("Bearer tok"):
                realm = f"http://{self.host}/token"
                challenge = f'Bearer realm="{realm}",service="test",scope="repository:x:pull"'
                _reply(h, 401, {"WWW-Authenticate": challenge}, b"")
                return
        if st.redirect_blobs and h.command == "GET" and "/blobs/sha256:" in path and not h.path.startswith("/storage"):
            _reply(h, 307, {"Location": f"http://localhost:{self.port}/storage{path}"}, b"")
            return
        if st.blob_gets_meet is not None and h.command == "GET" and "/blobs/sha256:" in path:
            try:
                st.blob_gets_meet.wait()  # the barrier carries its own timeout
                st.blob_gets_met = True
            except threading.BrokenBarrierError:  # only one came: they were sent one after another
                pass
        if st.fail_manifest_put is not None and h.command == "PUT" and "/manifests/" in path:
            _reply(h, st.fail_manifest_put, {}, b"")
            return
        if h.command == "HEAD" and "/manifests/" in path and st.head == "refuse":
            _reply(h, 405, {}, b"")
            return
        # Host is kept, as reverse proxies do: the registry then writes Locations that point here
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("authorization", "content-length")}
        if st.ignore_ranges:
            headers.pop("Range", None)
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            conn.request(h.command, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            if lose_answer:  # the registry took it; the client never hears so
                resp.read()
                _reply(h, 502, {}, b"")
                return
            drop = {"content-length", "transfer-encoding", "connection"}
            if h.command == "HEAD" and st.head == "no-digest":
                drop.add("docker-content-digest")
            out = {k: v for k, v in resp.getheaders() if k.lower() not in drop}
            size = resp.getheader("Content-Length")
            if self.streams_bodies and not st.corrupt_ranges and size is not None and h.command != "HEAD":
                h.send_response(resp.status)  # stream the body, counting what the client really took
                for k, v in out.items():
                    h.send_header(k, v)
                h.send_header("Content-Length", size)
                h.end_headers()
                while block := resp.read(RELAY_BLOCK_BYTES):
                    h.wfile.write(block)
                    with st.lock:
                        st.body_bytes_sent += len(block)
                return
            data = resp.read()
            if st.corrupt_ranges and resp.status == 206 and data:
                data = bytes([data[0] ^ 0x55]) + data[1:]
        finally:
            conn.close()
        self.answer(h, resp.status, out, data)

    def answer(self, h: http.server.BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
        """Send the upstream's answer to the client (the hook tests/support/faults.py bends)."""
        self._reply(h, status, headers, body)

    @staticmethod
    def _reply(h: http.server.BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
        _reply(h, status, headers, body)


def basic_auth_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def cleanup_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# the token registry of tests/registry (its conftest starts it)
TOKEN_USER = "alice"
TOKEN_PASSWORD = "tok s3cret"  # a space and digits: quoting mistakes show up


def access_log_mark(reg: Registry) -> int:
    return len((reg.root / "registry.log").read_bytes())


def statuses_since(reg: Registry, mark: int) -> list[int]:
    """HTTP statuses of the requests the registry logged after `mark` (its access log)."""
    text = (reg.root / "registry.log").read_bytes()[mark:].decode(errors="replace")
    out = []
    for line in text.splitlines():
        if '" ' in line and "HTTP/1.1" in line:
            after = line.split('HTTP/1.1" ', 1)[1]
            out.append(int(after.split(" ", 1)[0]))
    return out
