"""Real servers for tests: Debian's docker-registry (the CNCF distribution server) on 127.0.0.1 with
a free port and temp storage, and a small HTTP proxy in front of it that imitates what other
registries do (bearer challenges, 307 to storage, 200 for ranges, 429). Started and stopped by PID."""

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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

REGISTRY_BIN = "/usr/bin/docker-registry"
START_WAIT_S = 20.0


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
    root: Path, *, user: str | None = None, password: str | None = None, proxy_of: str | None = None
) -> Registry:
    """`proxy_of` HOST:PORT makes it a pull-through cache of that registry (its access log on)."""
    if not os.path.exists(REGISTRY_BIN):
        pytest.fail(f"{REGISTRY_BIN} is missing: apt-get install docker-registry (make test does)")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": proxy_of is None}},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }
    if proxy_of is not None:
        config["proxy"] = {"remoteurl": f"http://{proxy_of}"}
    if user is not None and password is not None:
        (root / "htpasswd").write_text(f"{user}:{bcrypt_hash(password)}\n")
        config["auth"] = {"htpasswd": {"realm": "blobmount-test", "path": str(root / "htpasswd")}}
    (root / "config.yml").write_text(json.dumps(config))  # YAML is a superset of JSON
    log = open(root / "registry.log", "wb")
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(root / "config.yml")], stdout=log, stderr=log)
    log.close()
    reg = Registry(root, port, proc, user, password)
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
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    tokens_issued: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class QuirkProxy:
    """An HTTP proxy in front of a registry (same process, its own thread). tests/faults.py extends it
    with switchable faults: the hooks for that are :meth:`answer` (every upstream answer goes out
    through it) and the set of live client connections (so a subclass can cut them)."""

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

    def _reply(self, h: http.server.BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        st = self.state
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        path = h.path
        with st.lock:
            st.seen.append((h.command, path, {k.lower(): v for k, v in h.headers.items()}))
            forced = st.fail_next.pop(0) if st.fail_next else None
        if forced is not None:
            headers = {"Retry-After": st.retry_after} if st.retry_after else {}
            self._reply(h, forced, headers, b"")
            return
        if path.startswith("/token"):
            query = parse_qs(urlsplit(path).query)
            with st.lock:
                st.tokens_issued += 1
                token = f"tok{st.tokens_issued}"
            doc = {"token": token, "expires_in": st.token_lifetime_s, "scope": query.get("scope", [""])[0]}
            self._reply(h, 200, {"Content-Type": "application/json"}, json.dumps(doc).encode())
            return
        if path.startswith("/storage/"):
            if h.headers.get("Authorization"):
                self._reply(h, 400, {}, b"registry credentials leaked to storage")
                return
            path = path[len("/storage") :]
        elif st.bearer:
            auth = h.headers.get("Authorization", "")
            if not auth.startswith("Bearer tok"):
                realm = f"http://{self.host}/token"
                challenge = f'Bearer realm="{realm}",service="test",scope="repository:x:pull"'
                self._reply(h, 401, {"WWW-Authenticate": challenge}, b"")
                return
        if st.redirect_blobs and h.command == "GET" and "/blobs/sha256:" in path and not h.path.startswith("/storage"):
            self._reply(h, 307, {"Location": f"http://localhost:{self.port}/storage{path}"}, b"")
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "authorization", "content-length")}
        if st.ignore_ranges:
            headers.pop("Range", None)
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            conn.request(h.command, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            if st.corrupt_ranges and resp.status == 206 and data:
                data = bytes([data[0] ^ 0x55]) + data[1:]
            out = {k: v for k, v in resp.getheaders() if k.lower() not in ("content-length", "transfer-encoding")}
        finally:
            conn.close()
        self.answer(h, resp.status, out, data)

    def answer(self, h: http.server.BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
        """Send the upstream's answer to the client (the hook tests/faults.py bends)."""
        self._reply(h, status, headers, body)


def basic_auth_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def cleanup_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
