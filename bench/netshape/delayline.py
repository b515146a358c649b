"""A fixed delay for every packet of one NFQUEUE queue, spoken over raw netlink (stdlib only).

Why this exists: the kernel here is built without ``sch_netem``, so ``tc … netem delay`` cannot add
latency. What it does have is the NFQUEUE target: a firewall rule hands each matching packet to a
user-space listener, and the packet stays in the kernel until the listener gives a verdict. Holding
every verdict back by the same amount of time is a delay line. Because the delay is the same for
every packet, packets fall due in the order they arrived; one ``VERDICT_BATCH`` message ("accept
every id up to N") releases all of those that are due, so the cost per packet is one ``recv``.

Only metadata crosses to user space (``COPY_META``): the payload never leaves the kernel. The queue
takes segmentation-offloaded packets whole (``F_GSO``): a 64 KiB super-packet costs one message,
not forty. There is no fail-open flag on purpose: if this process dies, traffic through the rule
stops (loudly) instead of flowing undelayed (silently wrong figures).

The file runs as a script inside the namespace (``ip netns exec NS python3 delayline.py …``),
without the project on ``sys.path``. It stops on SIGTERM/SIGINT, or by itself once its pid file no
longer names it (the shaper that started it is gone); either way it first accepts every packet it
still holds, then prints one line of counts.
"""

from __future__ import annotations

import argparse
import collections
import errno
import gc
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_GSO = 4
NF_ACCEPT = 1
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLA_TYPE_MASK = 0x3FFF
SO_RCVBUFFORCE = 33

RCVBUF_BYTES = 32 << 20  # ~400k queued-packet messages of metadata before the kernel drops
QUEUE_MAXLEN = 200_000  # the kernel's default (1024) is less than 10 ms of ACKs at 1 Gbit
RECV_BATCH = 512  # messages read before due packets are released again: bounds the added jitter
IDLE_WAKE_S = 0.5  # how often an idle line looks at its pid file
ACK_WAIT_S = 5.0

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, portid (host order)
_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (the queue number, big-endian)
_NLATTR = struct.Struct("=HH")  # len, type
_U32_BE = struct.Struct("!I")
_HDR_OFF = _NLMSGHDR.size + _NFGENMSG.size


def _attr(kind: int, payload: bytes) -> bytes:
    head = _NLATTR.pack(_NLATTR.size + len(payload), kind)
    pad = b"\0" * (-len(payload) % 4)
    return head + payload + pad


class DelayLine:
    """One bound queue, its held packets (due time, id) and its counters."""

    def __init__(self, queue: int, delay_ns: int) -> None:
        self.queue = queue
        self.delay_ns = delay_ns
        self.held: collections.deque[tuple[int, int]] = collections.deque()
        self.packets = 0
        self.max_held = 0
        self.overruns = 0  # ENOBUFS: the kernel could not deliver some messages (their packets drop)
        self.refused = 0  # error answers from the kernel (a verdict it did not take)
        self.seq = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_BYTES)
        except PermissionError:  # not root: the ordinary limit, fine for light traffic
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)

    def _message(self, kind: int, body: bytes, flags: int = NLM_F_REQUEST) -> bytes:
        self.seq += 1
        payload = _NFGENMSG.pack(socket.AF_UNSPEC, 0, self.queue) + body
        head = _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, self.seq, 0)
        return head + payload

    def _configure(self, body: bytes) -> None:
        """Send one CONFIG message and wait for its acknowledgement (the kernel's errno, if any)."""
        self.sock.send(self._message(NFQNL_MSG_CONFIG, body, NLM_F_REQUEST | NLM_F_ACK))
        seq = self.seq
        deadline = time.monotonic() + ACK_WAIT_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            data = self.sock.recv(65536)
            for kind, mseq, body_off, end in _messages(data):
                if kind == NLMSG_ERROR and mseq == seq:
                    (code,) = struct.unpack_from("=i", data, body_off)
                    if code:
                        raise OSError(-code, f"NFQUEUE config of queue {self.queue}: {os.strerror(-code)}")
                    return
                del end
        raise TimeoutError(f"no answer from the kernel to the NFQUEUE config of queue {self.queue}")

    def bind(self) -> None:
        self._configure(_attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET)))
        self._configure(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)))
        self._configure(_attr(NFQA_CFG_QUEUE_MAXLEN, _U32_BE.pack(QUEUE_MAXLEN)))
        flags = _U32_BE.pack(NFQA_CFG_F_GSO)
        self._configure(_attr(NFQA_CFG_FLAGS, flags) + _attr(NFQA_CFG_MASK, flags))
        self.sock.setblocking(False)

    def _take(self, data: bytes, now: int) -> None:
        due = now + self.delay_ns
        for kind, _seq, body_off, end in _messages(data):
            if kind == NLMSG_ERROR:
                self.refused += struct.unpack_from("=i", data, body_off)[0] != 0
                continue
            if kind != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                continue
            off = body_off + _NFGENMSG.size
            while off + _NLATTR.size <= end:
                alen, atype = _NLATTR.unpack_from(data, off)
                if alen < _NLATTR.size:
                    break
                if atype & NLA_TYPE_MASK == NFQA_PACKET_HDR:
                    (pid,) = _U32_BE.unpack_from(data, off + _NLATTR.size)
                    self.held.append((due, pid))
                    self.packets += 1
                    break
                off += (alen + 3) & ~3
        self.max_held = max(self.max_held, len(self.held))

    def _release(self, upto: int) -> None:
        body = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, upto))
        self.sock.send(self._message(NFQNL_MSG_VERDICT_BATCH, body))

    def release_due(self, now: int) -> None:
        last = None
        held = self.held
        while held and held[0][0] <= now:
            last = held.popleft()[1]
        if last is not None:
            self._release(last)

    def release_all(self) -> None:
        if self.held:
            self._release(self.held[-1][1])
            self.held.clear()

    def read_some(self) -> None:
        for _ in range(RECV_BATCH):
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue
                raise
            self._take(data, time.monotonic_ns())

    def timeout_s(self, now: int) -> float:
        if not self.held:
            return IDLE_WAKE_S
        return max(0.0, (self.held[0][0] - now) / 1e9)


def _messages(data: bytes) -> list[tuple[int, int, int, int]]:
    """(type, seq, body offset, end) of each netlink message in one datagram."""
    out = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, kind, _flags, seq, _port = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            break
        out.append((kind, seq, off + _NLMSGHDR.size, off + length))
        off += (length + 3) & ~3
    return out


def _owner(pidfile: Path) -> str | None:
    """The PID the pid file names, or None when it is missing or empty."""
    try:
        words = pidfile.read_text().split()
    except OSError:
        return None
    return words[0] if words else None


def run(queue: int, delay_us: int, pidfile: Path | None) -> int:
    stop = False

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    line = DelayLine(queue, delay_us * 1000)
    line.bind()
    gc.disable()  # the loop makes no cycles; a collection pause would be a latency spike
    print(f"delayline: queue {queue} delay {delay_us} us ready", flush=True)
    checked = time.monotonic()
    me = str(os.getpid())
    seen = False  # the shaper writes the pid file just after starting us: absent at first is fine
    try:
        while not stop:
            # select, not poll: its timeout has microsecond resolution (poll's is a millisecond)
            readable, _, _ = select.select([line.sock], [], [], line.timeout_s(time.monotonic_ns()))
            if readable:
                line.read_some()
            line.release_due(time.monotonic_ns())
            if time.monotonic() - checked > IDLE_WAKE_S:
                checked = time.monotonic()
                owner = _owner(pidfile) if pidfile is not None else me
                seen = seen or owner == me
                if owner != me and (seen or owner is not None):
                    print("delayline: the pid file no longer names this process; stopping", flush=True)
                    break
    finally:
        line.release_all()
        print(
            f"delayline: exit packets={line.packets} max_held={line.max_held} overruns={line.overruns}"
            f" refused={line.refused}",
            flush=True,
        )
        line.sock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="hold every packet of an NFQUEUE queue for a fixed time")
    ap.add_argument("--queue", type=int, required=True, help="NFQUEUE number (per network namespace)")
    ap.add_argument("--delay-us", type=int, required=True, help="microseconds each packet is held")
    ap.add_argument("--pidfile", type=Path, default=None, help="stop once this file no longer names us")
    args = ap.parse_args(argv)
    if not 0 <= args.queue <= 65535 or args.delay_us < 0:
        ap.error("queue 0..65535 and a delay >= 0")
    try:
        return run(args.queue, args.delay_us, args.pidfile)
    except OSError as e:
        print(f"delayline: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
