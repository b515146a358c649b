"""The servers the remote peers read from, the network they sit behind, and what they counted.

- docker-registry (the CNCF distribution server, Debian's package) serves the archives to blobmount;
- nginx serves the same datasets as plain files with correct Range support (to rclone and httpfs2);
- both run on 127.0.0.1 ("loopback") and inside the shaped namespace at 10.200.0.2 ("netns",
  bench/netshape: the delay on every packet into the namespace, the rate cap on its egress).
Requests and bytes come from the servers' own access logs (the same line shape for both), so
"fetched from the server" is counted, never estimated. Only one netshape namespace can exist on the
machine: it is only touched under ``flock /tmp/netshape.lock``.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from bench import netshape
from bench.janitor import Janitor

NETSHAPE_LOCK = netshape.LOCK_PATH
NETNS = netshape.BENCH_LINK.ns
NS_IP = netshape.BENCH_LINK.ns_ip
NS_REGISTRY_PORT = 5000
NS_NGINX_PORT = 8080
REGISTRY_BIN = "/usr/bin/docker-registry"
START_WAIT_S = 30.0  # both servers answer within a second; 30 s means they will not
LOCK_WAIT_S = 3600.0  # another engineer's benchmark may hold the namespace for a while
LOG_SETTLE_S = 0.15  # servers write their access-log line just after the last byte is sent
LOG_LINE = re.compile(rb'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
DATA_LAYER_TYPE = "application/vnd.meigma.blob.data.v1"
INDEX_LAYER_TYPE = "application/vnd.meigma.blob.index.v1+flatbuffers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(host: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_WAIT_S
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                raise RuntimeError(f"server on {host}:{port} did not start:\n{tail}") from None
            time.sleep(0.05)


@dataclass
class Traffic:
    requests: int
    bytes: int
    blob_requests: int  # requests for a registry blob (index or data), or for a file (nginx)
    by_method: dict[str, int]


class AccessLog:
    """Counts the requests and body bytes a server logged between two marks."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        time.sleep(LOG_SETTLE_S)
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def since(self, mark: int) -> Traffic:
        time.sleep(LOG_SETTLE_S)
        with open(self.path, "rb") as f:
            f.seek(mark)
            text = f.read()
        requests = size = blobs = 0
        by_method: dict[str, int] = {}
        for m in LOG_LINE.finditer(text):
            requests += 1
            size += int(m.group(4)) if m.group(4) != b"-" else 0
            path = m.group(2)
            if b"/blobs/" in path or not path.startswith(b"/v2/"):
                blobs += 1
            method = m.group(1).decode()
            by_method[method] = by_method.get(method, 0) + 1
        return Traffic(requests, size, blobs, by_method)


@dataclass
class Server:
    """One running server: where it listens and what it logged."""

    name: str
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    log: AccessLog

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"


def _in_netns(cmd: list[str], netns: bool) -> list[str]:
    return ["ip", "netns", "exec", NETNS, *cmd] if netns else cmd


def start_registry(janitor: Janitor, work: Path, storage: Path, host: str, port: int, netns: bool) -> Server:
    """docker-registry on host:port over `storage` (two registries may share one storage directory:
    the archives are pushed once, on loopback, and the namespace's registry serves the same blobs)."""
    if not os.path.exists(REGISTRY_BIN):
        raise SystemExit(f"{REGISTRY_BIN} is missing: apt-get install docker-registry")
    name = f"registry-{'netns' if netns else 'loopback'}"
    config = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}},
        "http": {"addr": f"{host}:{port}"},
    }
    conf = work / f"{name}.yml"
    conf.write_text(json.dumps(config))  # YAML is a superset of JSON
    log = work / f"{name}.log"
    proc = janitor.spawn(_in_netns([REGISTRY_BIN, "serve", str(conf)], netns), log)
    wait_listening(host, port, proc, log)
    return Server(name, host, port, proc, AccessLog(log))


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 2;
user root;
pid {work}/{name}.pid;
error_log {work}/{name}.err warn;
events {{ worker_connections 1024; }}
http {{
  log_format bench '"$request" $status $body_bytes_sent';
  access_log {work}/{name}.access bench;
  client_body_temp_path {work}/{name}-tmp/body;
  proxy_temp_path {work}/{name}-tmp/proxy;
  fastcgi_temp_path {work}/{name}-tmp/fastcgi;
  uwsgi_temp_path {work}/{name}-tmp/uwsgi;
  scgi_temp_path {work}/{name}-tmp/scgi;
  types {{ }}
  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  keepalive_timeout 600s;
  server {{
    listen {host}:{port};
    root {root};
    autoindex on;
    autoindex_exact_size on;
    # httpfs2 refuses a 206 without it; nginx only sends it with a 200
    add_header Accept-Ranges bytes always;
    location / {{ }}
  }}
}}
"""


def start_nginx(janitor: Janitor, work: Path, root: Path, host: str, port: int, netns: bool) -> Server:
    """nginx serving `root` as static files (Range-correct, with directory listings for rclone)."""
    if shutil.which("nginx") is None:
        raise SystemExit("nginx is missing: apt-get install nginx-light")
    name = f"nginx-{'netns' if netns else 'loopback'}"
    (work / f"{name}-tmp").mkdir(exist_ok=True)
    conf = work / f"{name}.conf"
    conf.write_text(NGINX_CONF.format(work=work, name=name, host=host, port=port, root=root))
    err = work / f"{name}.err"
    proc = janitor.spawn(_in_netns(["nginx", "-c", str(conf), "-p", str(work)], netns), err)
    wait_listening(host, port, proc, err)
    return Server(name, host, port, proc, AccessLog(work / f"{name}.access"))


def stop_server(janitor: Janitor, server: Server) -> None:
    janitor.stop(server.proc)


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int


def manifest_layers(registry: Server, repo: str, tag: str) -> tuple[Blob, Blob]:
    """(index blob, data blob) of an archive pushed as repo:tag."""
    conn = http.client.HTTPConnection(registry.host, registry.port, timeout=30)
    try:
        conn.request("GET", f"/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST_TYPE})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"manifest {repo}:{tag}: HTTP {resp.status}")
    layers = {layer["mediaType"]: Blob(layer["digest"], layer["size"]) for layer in json.loads(body)["layers"]}
    return layers[INDEX_LAYER_TYPE], layers[DATA_LAYER_TYPE]


def rtt_s(host: str, port: int, path: str = "/") -> float:
    """Median TCP connect time to host:port: one round trip."""
    out = []
    for _ in range(5):
        r = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{time_connect}", f"http://{host}:{port}{path}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        out.append(float(r.stdout))
    return statistics.median(out)


class Netshape:
    """The shaped namespace, held under the machine-wide netshape lock from `with` to its end.

    Entering waits for the lock (another engineer's run may hold it), clears whatever a crashed
    holder left, and brings the namespace up; leaving always brings it down and releases the lock."""

    def __init__(self, janitor: Janitor, delay_ms: int, rate: str) -> None:
        self.janitor = janitor
        self.shape = netshape.Shape(delay_ms, None if rate.lower() == "none" else rate)
        self.lock_file: int | None = None

    def acquire(self) -> None:
        self.lock_file = os.open(NETSHAPE_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + LOCK_WAIT_S
        said = False
        while True:
            try:
                fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if not said:
                    print(f"waiting for {NETSHAPE_LOCK} (someone else is using the netshape namespace)", flush=True)
                    said = True
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{NETSHAPE_LOCK} still held after {LOCK_WAIT_S:.0f} s") from None
                time.sleep(1)

    def release(self) -> None:
        if self.lock_file is not None:
            fcntl.flock(self.lock_file, fcntl.LOCK_UN)
            os.close(self.lock_file)
            self.lock_file = None

    def down(self) -> None:
        """Tear down (the caller holds the lock)."""
        for line in netshape.down(netshape.BENCH_LINK):
            print(f"netshape: {line}", flush=True)
        self.janitor.netns_up = False
        self.janitor.save()

    def __enter__(self) -> Netshape:
        self.acquire()
        try:
            self.down()  # a crashed holder's leftovers; we hold the lock, so nobody uses it
            self.janitor.netns_up = True
            self.janitor.save()
            netshape.up(netshape.BENCH_LINK, self.shape, tied=True)
        except BaseException:
            self.down()
            self.release()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.down()
        finally:
            self.release()


def netshape_down_locked(janitor: Janitor) -> None:
    """For crash recovery: take the lock, tear the namespace down, give the lock back."""
    shape = Netshape(janitor, 0, "none")
    shape.acquire()
    try:
        shape.down()
    finally:
        shape.release()
