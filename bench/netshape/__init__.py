"""A network namespace behind a slow link, for the benchmark's "netns" figures and their tests.

The servers (docker-registry, nginx) run inside a namespace; the clients (blobmount, curl, httpfs2)
stay on the host. The two are joined by one veth pair carrying a small private subnet that exists
only between its two ends: the namespace has no other interface and no default route, so nothing
sent through it can leave the machine. Two things shape that link:

- **delay**: a firewall rule in the namespace's raw PREROUTING hook hands every packet arriving
  from the host to NFQUEUE, and ``delayline.py`` holds each one for the configured time before
  accepting it. Only the host-to-namespace direction is delayed, so every round trip (a TCP
  handshake, a request and its answer) takes the delay once. This kernel has no ``sch_netem``;
  NFQUEUE is what it offers.
- **rate**: a token bucket (``tc … tbf``) on the namespace's egress, i.e. on what the servers send.

Everything is undone by :func:`down`: the firewall rule first (so no packet waits for a listener
that is going away), the delay line by its PID (checked against its start time, so a recycled PID
is never signalled), then the veth pair and the namespace. :func:`up` refuses a subnet that an
address or route on the host already covers, and rolls back whatever it created if a step fails.

One namespace per :class:`Link`; the benchmark's is :data:`BENCH_LINK` and is only touched under
``flock`` on :data:`LOCK_PATH` (bench/servers.py). Tests make their own links with unique names.
``python -m bench.netshape up|down|status|exec`` drives it by hand.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DELAYLINE = Path(__file__).resolve().with_name("delayline.py")
RUN_ROOT = Path(os.environ.get("NETSHAPE_RUN", "/run/blobmount-netshape"))
LOCK_PATH = Path("/tmp/netshape.lock")
TOOLS = {"ip": "iproute2", "tc": "iproute2", "iptables": "iptables"}  # command -> Debian package
CMD_TIMEOUT_S = 30.0
READY_WAIT_S = 15.0  # the delay line binds its queue in well under a second
STOP_WAIT_S = 5.0
GONE_WAIT_S = 10.0  # a namespace's devices disappear asynchronously after `ip netns del`
IFNAMSIZ = 15
PR_SET_PDEATHSIG = 1

# Delay lines this process started, kept so they are reaped (and never reported as leaked) here.
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class Link:
    """Names and addresses of one shaped namespace (every field must be unique on the host)."""

    ns: str = "benchnet"
    host_if: str = "veth-bh"
    ns_if: str = "veth-bn"
    host_ip: str = "10.200.0.1"
    ns_ip: str = "10.200.0.2"
    prefix: int = 24
    queue: int = 7  # NFQUEUE numbers are per namespace: any value is free in a fresh one

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.host_ip}/{self.prefix}", strict=False)

    @property
    def run_dir(self) -> Path:
        return RUN_ROOT / self.ns

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "delayline.pid"

    @property
    def log(self) -> Path:
        return self.run_dir / "delayline.log"

    def check(self) -> None:
        for name in (self.ns, self.host_if, self.ns_if):
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or len(name) > IFNAMSIZ:
                raise ValueError(f"netshape: {name!r} is not a usable interface/namespace name (<= 15 chars)")
        net = self.network
        if not net.is_private:
            raise ValueError(f"netshape: {net} is not a private subnet")
        hosts = {ipaddress.IPv4Address(self.host_ip), ipaddress.IPv4Address(self.ns_ip)}
        usable = [a for a in hosts if a in net and a not in (net.network_address, net.broadcast_address)]
        if len(usable) != 2:
            raise ValueError(f"netshape: {self.host_ip} and {self.ns_ip} must be two host addresses of {net}")


BENCH_LINK = Link()


@dataclass(frozen=True)
class Shape:
    """What the link does to traffic: `delay_ms` per round trip, `rate` in tc syntax or None."""

    delay_ms: float = 10.0
    rate: str | None = "1gbit"

    @property
    def delay_us(self) -> int:
        return round(self.delay_ms * 1000)


# -- rates -----------------------------------------------------------------------------------------

_RATE_UNITS = {  # tc(8): "bit" and a bare number are bits/s, "bps" is bytes/s; "i" forms are 1024-based
    "": 1 / 8, "bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "tbit": 1e12 / 8,
    "kibit": 1024 / 8, "mibit": 1024**2 / 8, "gibit": 1024**3 / 8, "tibit": 1024**4 / 8,
    "bps": 1.0, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9, "tbps": 1e12,
    "kibps": 1024.0, "mibps": 1024.0**2, "gibps": 1024.0**3, "tibps": 1024.0**4,
}  # fmt: skip


def rate_bytes_per_s(rate: str) -> float:
    """A tc rate ("1gbit", "100mbit", "12.5mbps") in bytes per second."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", rate.lower())
    if m is None or m.group(2) not in _RATE_UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"netshape: {rate!r} is not a tc rate (e.g. 1gbit, 100mbit, 10mbps)")
    return float(m.group(1)) * _RATE_UNITS[m.group(2)]


def bucket(rate_bps: float) -> tuple[int, int]:
    """tbf's (burst, limit) in bytes for a rate in bytes/s.

    burst: 2 ms of tokens, at least 16 KiB (well above one MTU frame; larger offloaded packets are
    split by tbf itself): small enough that a short transfer cannot outrun the rate by much.
    limit: 30 ms of queue, at least 256 KiB, so a sender's burst waits instead of being dropped."""
    return max(16 << 10, int(rate_bps * 0.002)), max(256 << 10, int(rate_bps * 0.030))


# -- commands --------------------------------------------------------------------------------------


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=CMD_TIMEOUT_S, check=False)
    if check and done.returncode != 0:
        msg = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(f"netshape: `{' '.join(argv)}` failed: {msg[-1] if msg else f'exit {done.returncode}'}")
    return done


def in_ns(link: Link, cmd: Sequence[str]) -> list[str]:
    """`cmd` as run inside the namespace."""
    return ["ip", "netns", "exec", link.ns, *cmd]


def missing_tools() -> list[str]:
    """The Debian packages whose commands are missing (empty when the shaper can run)."""
    return sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})


def namespace_exists(link: Link) -> bool:
    return link.ns in _run(["ip", "netns", "list"]).stdout.split()


def _host_if_exists(link: Link) -> bool:
    return _run(["ip", "link", "show", "dev", link.host_if], check=False).returncode == 0


def _overlaps(link: Link) -> list[str]:
    """Addresses and routes on the host that already cover part of the link's subnet."""
    net = link.network
    found = []
    for iface in json.loads(_run(["ip", "-j", "-4", "addr", "show"]).stdout or "[]"):
        for a in iface.get("addr_info", []):
            if ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False).overlaps(net):
                found.append(f"address {a['local']}/{a['prefixlen']} on {iface['ifname']}")
    for r in json.loads(_run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout or "[]"):
        dst = r.get("dst", "")
        if dst in ("default", "") or r.get("type") in ("local", "broadcast"):
            continue
        with contextlib.suppress(ValueError):
            if ipaddress.IPv4Network(dst, strict=False).overlaps(net):
                found.append(f"route {dst} via {r.get('dev', '?')}")
    return found


# -- the delay line's process ----------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time since boot), or None when the PID is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the thread that started it dies (tests, the suite)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _start_delayline(link: Link, shape: Shape, tied: bool) -> int:
    link.run_dir.mkdir(parents=True, exist_ok=True)
    cmd = in_ns(link, [sys.executable, "-I", str(DELAYLINE), "--queue", str(link.queue),
                       "--delay-us", str(shape.delay_us), "--pidfile", str(link.pidfile)])  # fmt: skip
    with open(link.log, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if tied else None,
        )
    _children[proc.pid] = proc
    started = None
    deadline = time.monotonic() + READY_WAIT_S
    while started is None and proc.poll() is None and time.monotonic() < deadline:
        started = _start_time(proc.pid)
        time.sleep(0 if started else 0.01)
    tmp = link.pidfile.with_suffix(".tmp")
    tmp.write_text(f"{proc.pid} {started}\n")
    tmp.replace(link.pidfile)
    while time.monotonic() < deadline:
        if b" ready" in link.log.read_bytes():
            return proc.pid
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    tail = link.log.read_text(errors="replace").strip().splitlines()
    raise RuntimeError(f"netshape: the delay line did not start: {tail[-1] if tail else 'no output'}")


def _reap(pid: int) -> None:
    proc = _children.get(pid)
    if proc is not None and proc.poll() is not None:
        del _children[pid]


def _stop_delayline(link: Link) -> str | None:
    try:
        pid_s, started = link.pidfile.read_text().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        link.pidfile.unlink(missing_ok=True)
        return None
    said = None
    if _start_time(pid) == started:
        said = f"stopped the delay line (pid {pid})"
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + STOP_WAIT_S
            while _start_time(pid) == started and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.02)
            if _start_time(pid) != started:
                break
        else:
            raise RuntimeError(f"netshape: the delay line (pid {pid}) survived SIGKILL")
    _reap(pid)
    link.pidfile.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        counts = [ln for ln in link.log.read_text(errors="replace").splitlines() if "exit packets=" in ln]
        if said and counts:
            said += f": {counts[-1].partition('exit ')[2]}"
    return said


def delayline_pid(link: Link) -> int | None:
    """The running delay line's PID, or None."""
    try:
        pid_s, started = link.pidfile.read_text().split()
    except (OSError, ValueError):
        return None
    return int(pid_s) if _start_time(int(pid_s)) == started else None


# -- up / down -------------------------------------------------------------------------------------


def up(link: Link = BENCH_LINK, shape: Shape | None = None, tied: bool = False) -> None:
    """Create the namespace and start shaping. `tied`: the delay line gets SIGTERM when the calling
    thread dies (a crashed caller then leaves a link that passes nothing rather than an unshaped one;
    :func:`down` removes it). Raises RuntimeError with one line on failure, after rolling back."""
    shape = shape or Shape()
    link.check()
    if shape.delay_ms < 0:
        raise ValueError("netshape: the delay must be >= 0 ms")
    rate = rate_bytes_per_s(shape.rate) if shape.rate else None
    if missing := missing_tools():
        raise RuntimeError(f"netshape needs the apt packages {' '.join(missing)}")
    if namespace_exists(link) or _host_if_exists(link):
        raise RuntimeError(f"netshape: {link.ns} (or {link.host_if}) already exists: `python -m bench.netshape down`")
    if clash := _overlaps(link):
        raise RuntimeError(f"netshape: {link.network} is already in use on this host ({'; '.join(clash)})")
    try:
        _run(["ip", "netns", "add", link.ns])
        _run(["ip", "link", "add", link.host_if, "type", "veth", "peer", "name", link.ns_if, "netns", link.ns])
        _run(["ip", "addr", "add", f"{link.host_ip}/{link.prefix}", "dev", link.host_if])
        _run(["ip", "link", "set", link.host_if, "up"])
        _run(in_ns(link, ["ip", "addr", "add", f"{link.ns_ip}/{link.prefix}", "dev", link.ns_if]))
        _run(in_ns(link, ["ip", "link", "set", link.ns_if, "up"]))
        _run(in_ns(link, ["ip", "link", "set", "lo", "up"]))
        if rate is not None:
            burst, limit = bucket(rate)
            _run(in_ns(link, ["tc", "qdisc", "add", "dev", link.ns_if, "root", "tbf",
                              "rate", f"{rate:.0f}bps", "burst", str(burst), "limit", str(limit)]))  # fmt: skip
        if shape.delay_us > 0:
            _start_delayline(link, shape, tied)
            _run(in_ns(link, ["iptables", "-w", "10", "-t", "raw", "-A", "PREROUTING", "-i", link.ns_if,
                              "-j", "NFQUEUE", "--queue-num", str(link.queue)]))  # fmt: skip
    except BaseException:
        down(link)
        raise


def down(link: Link = BENCH_LINK) -> list[str]:
    """Remove everything :func:`up` made for `link` (whatever is left of it); returns what it did.
    Idempotent; raises RuntimeError only if something could not be removed."""
    done: list[str] = []
    ns = namespace_exists(link)
    if ns:  # the queue rule first: no packet is left waiting on a listener that is going away
        _run(in_ns(link, ["iptables", "-w", "10", "-t", "raw", "-F", "PREROUTING"]), check=False)
    if said := _stop_delayline(link):
        done.append(said)
    if _host_if_exists(link):
        _run(["ip", "link", "del", link.host_if])  # takes its peer in the namespace with it
        done.append(f"deleted {link.host_if}")
    if ns:
        _run(["ip", "netns", "del", link.ns])
        done.append(f"deleted namespace {link.ns}")
    deadline = time.monotonic() + GONE_WAIT_S
    while _host_if_exists(link) or namespace_exists(link):
        if time.monotonic() > deadline:
            raise RuntimeError(f"netshape: {link.ns} / {link.host_if} still present {GONE_WAIT_S:.0f} s after removal")
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        link.log.unlink(missing_ok=True)
        link.run_dir.rmdir()
    return done


def status(link: Link = BENCH_LINK) -> str:
    """A few lines saying what exists of `link` right now."""
    if not namespace_exists(link):
        left = f"; {link.host_if} exists" if _host_if_exists(link) else ""
        return f"{link.ns}: down{left}"
    lines = [f"{link.ns}: up, host {link.host_ip} <-> namespace {link.ns_ip} (/{link.prefix})"]
    lines.append(_run(in_ns(link, ["tc", "qdisc", "show", "dev", link.ns_if]), check=False).stdout.strip())
    rules = _run(in_ns(link, ["iptables", "-w", "10", "-t", "raw", "-S", "PREROUTING"]), check=False).stdout
    lines += [r for r in rules.splitlines() if "NFQUEUE" in r] or ["no delay rule"]
    pid = delayline_pid(link)
    lines.append(f"delay line pid {pid}" if pid else "no delay line running")
    return "\n".join(lines)
