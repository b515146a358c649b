"""The benchmark's shaper does what its figures rely on: every round trip through the namespace
takes at least the configured delay, a transfer out of it is no faster than the configured rate,
and `down` leaves nothing behind. The bounds are lower bounds (a correctness check of the shaper,
not a speed target); the only upper limits are hang guards.

Each test run makes its own link (names and a /30 in 10.201.0.0/16 derived from the PID), so it
never touches the benchmark's namespace or another run's. Needs root, like the rest of the suite:
it fails, never skips, without it."""

from __future__ import annotations

import ipaddress
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import netshape
from bench.netshape import Link, Shape

DELAY_MS = 20.0
RATE = "16mbit"  # 2 MB/s: a 3 MiB transfer takes ~1.5 s at the cap, ~10 ms without it
TRANSFER_BYTES = 3 << 20
PORT = 9309
HANG_S = 30.0  # hang guard for any single socket operation
START_WAIT_S = 20.0

# A tiny server for the namespace (stdlib only, bounded: at most 20 connections, 60 s idle):
# "echo\n" -> b"!"; "send N\n" -> N bytes, then close.
SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(8)
s.settimeout(60)
print("listening", flush=True)
block = b"x" * 65536
for _ in range(20):
    c, _ = s.accept()
    c.settimeout(60)
    f = c.makefile("rb")
    while line := f.readline():
        word = line.split()
        if word[0] == b"echo":
            c.sendall(b"!")
        elif word[0] == b"send":
            n = int(word[1])
            while n > 0:
                c.sendall(block[: min(n, len(block))])
                n -= len(block)
            break
    f.close()
    c.close()
"""


def test_tc_rates_are_read_as_tc_reads_them() -> None:
    assert netshape.rate_bytes_per_s("1gbit") == 125e6
    assert netshape.rate_bytes_per_s("100mbit") == 12.5e6
    assert netshape.rate_bytes_per_s("12.5mbps") == 12.5e6  # tc's "bps" is bytes per second
    assert netshape.rate_bytes_per_s("8kibit") == 1024
    assert netshape.rate_bytes_per_s("8000") == 1000  # a bare number is bits per second
    for bad in ("", "fast", "-1mbit", "0gbit", "1 gallon"):
        with pytest.raises(ValueError, match="not a tc rate"):
            netshape.rate_bytes_per_s(bad)
    burst, limit = netshape.bucket(125e6)
    assert 16 << 10 <= burst < limit


def test_a_link_must_stay_on_a_private_subnet_with_short_names() -> None:
    with pytest.raises(ValueError, match="private"):
        Link(host_ip="8.8.8.1", ns_ip="8.8.8.2").check()
    with pytest.raises(ValueError, match="two host addresses"):
        Link(host_ip="10.9.0.1", ns_ip="10.9.1.2").check()
    with pytest.raises(ValueError, match="usable"):
        Link(host_if="a-very-long-interface-name").check()
    Link().check()


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the shaper needs root (network namespaces, veth, tc, iptables); CI runs as root")
    if missing := netshape.missing_tools():
        pytest.fail(f"the shaper needs the apt packages {' '.join(missing)} (make test installs them)")


def _test_link(salt: int) -> Link:
    """Names and a /30 of 10.201.0.0/16 of this test process's own."""
    key = (os.getpid() * 4 + salt) % 16384
    base = ipaddress.IPv4Address("10.201.0.0") + 4 * key
    tag = f"{key:x}"
    return Link(ns=f"bmshape-{tag}", host_if=f"bmh-{tag}", ns_if=f"bmn-{tag}",
                host_ip=str(base + 1), ns_ip=str(base + 2), prefix=30)  # fmt: skip


def _gone(link: Link) -> None:
    assert not netshape.namespace_exists(link)
    assert subprocess.run(["ip", "link", "show", "dev", link.host_if], capture_output=True).returncode != 0
    assert not link.pidfile.exists()


def _start_server(link: Link) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        netshape.in_ns(link, [sys.executable, "-I", "-c", SERVER, link.ns_ip, str(PORT)]),
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], START_WAIT_S)  # one line once it listens, or EOF
    line = proc.stdout.readline() if ready else b"(nothing within the hang guard)"
    if line != b"listening\n":
        _stop(proc)
        pytest.fail(f"the server in the namespace did not start: {line!r}")
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def _connect(link: Link, timeout: float = HANG_S) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((link.ns_ip, PORT))
    except BaseException:
        s.close()
        raise
    return s


@pytest.fixture(scope="module")
def shaped() -> Iterator[Link]:
    """A link with DELAY_MS and RATE, and the server inside it."""
    _require_root()
    link = _test_link(0)
    netshape.up(link, Shape(DELAY_MS, RATE), tied=True)
    server = None
    try:
        server = _start_server(link)
        yield link
    finally:
        if server is not None:
            _stop(server)
        netshape.down(link)
    _gone(link)


def test_every_round_trip_takes_at_least_the_delay(shaped: Link) -> None:
    connects, echoes = [], []
    for _ in range(3):
        t0 = time.monotonic()
        with _connect(shaped) as s:
            t1 = time.monotonic()  # SYN in (delayed), SYN-ACK out: one round trip
            connects.append(t1 - t0)
            for _ in range(3):
                t2 = time.monotonic()
                s.sendall(b"echo\n")
                assert s.recv(1) == b"!"
                echoes.append(time.monotonic() - t2)
    print(f"connect {[round(c * 1e3, 1) for c in connects]} ms, echo {[round(e * 1e3, 1) for e in echoes]} ms")
    assert min(connects) >= DELAY_MS / 1e3, connects
    assert min(echoes) >= DELAY_MS / 1e3, echoes


def test_a_transfer_is_no_faster_than_the_rate(shaped: Link) -> None:
    rate = netshape.rate_bytes_per_s(RATE)
    burst, _ = netshape.bucket(rate)
    with _connect(shaped) as s:
        s.sendall(f"send {TRANSFER_BYTES}\n".encode())
        t0 = time.monotonic()
        got = 0
        while chunk := s.recv(1 << 16):
            got += len(chunk)
        secs = time.monotonic() - t0
    assert got == TRANSFER_BYTES
    floor = (TRANSFER_BYTES - burst) / rate  # the bucket starts full: `burst` bytes may pass at once
    print(f"{got} bytes in {secs:.3f} s = {got / secs / 1e6:.2f} MB/s (cap {rate / 1e6:.2f} MB/s)")
    assert secs >= floor, (secs, floor)


def test_an_overlapping_subnet_is_refused_and_nothing_is_created(shaped: Link) -> None:
    other = Link(ns=shaped.ns + "x", host_if=shaped.host_if + "x", ns_if=shaped.ns_if + "x",
                 host_ip=shaped.host_ip, ns_ip=shaped.ns_ip, prefix=shaped.prefix)  # fmt: skip
    with pytest.raises(RuntimeError, match="already in use"):
        netshape.up(other, Shape(1, None))
    _gone(other)


def test_down_stops_the_delay_line_and_removes_the_link() -> None:
    """Also: with the delay line dead, traffic stops rather than flowing undelayed (a dead shaper
    is loud, never silently a fast link)."""
    _require_root()
    link = _test_link(1)
    netshape.up(link, Shape(DELAY_MS, "1gbit"), tied=True)
    server = None
    try:
        pid = netshape.delayline_pid(link)
        assert pid is not None
        assert Path(f"/proc/{pid}").exists()
        server = _start_server(link)
        with _connect(link) as s:
            s.sendall(b"echo\n")
            assert s.recv(1) == b"!"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + HANG_S
        while netshape.delayline_pid(link) is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(OSError):  # a timeout: the SYN waits on a queue nobody reads
            _connect(link, timeout=1.0).close()
        status = netshape.status(link)
        assert "no delay line running" in status, status
    finally:
        if server is not None:
            _stop(server)
        done = netshape.down(link)
    _gone(link)
    assert any(line.startswith(f"deleted namespace {link.ns}") for line in done), done
    assert netshape.down(link) == []  # idempotent
