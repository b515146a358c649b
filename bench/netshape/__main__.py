"""python -m bench.netshape up [--delay-ms 10] [--rate 1gbit] | down | status | exec CMD…

Drives the benchmark's namespace (bench.netshape.BENCH_LINK: host 10.200.0.1, namespace
10.200.0.2) by hand. `up` and `down` take the same lock the suite holds while it uses the
namespace, and refuse to wait for it: a running benchmark owns the link."""

from __future__ import annotations

import argparse
import fcntl
import os
import sys

from bench import netshape


def _locked() -> int:
    fd = os.open(netshape.LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"{netshape.LOCK_PATH} is held: a benchmark is using the namespace") from None
    return fd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.netshape", description=(__doc__ or "").split("\n\n")[0])
    sub = ap.add_subparsers(dest="action", required=True)
    p_up = sub.add_parser("up", help="create the namespace and shape its link")
    p_up.add_argument("--delay-ms", type=float, default=10.0, help="added to every round trip (default 10)")
    p_up.add_argument("--rate", default="1gbit", help="cap on namespace -> host, tc syntax, or none (default 1gbit)")
    sub.add_parser("down", help="remove the namespace, its link and its delay line")
    sub.add_parser("status", help="say what exists")
    p_exec = sub.add_parser("exec", help="run a command inside the namespace")
    p_exec.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    link = netshape.BENCH_LINK
    if args.action == "status":
        print(netshape.status(link))
        return 0
    if args.action == "exec":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            ap.error("exec: which command?")
        os.execvp("ip", netshape.in_ns(link, cmd))
    if os.geteuid() != 0:
        raise SystemExit("netshape needs root (namespaces, veth, tc, iptables)")
    fd = _locked()
    try:
        if args.action == "up":
            rate = None if args.rate.lower() == "none" else args.rate
            netshape.up(link, netshape.Shape(args.delay_ms, rate))
            print(
                f"{link.ns} up: {link.host_ip} <-> {link.ns_ip}, +{args.delay_ms:g} ms a round trip, rate {args.rate}"
            )
        else:
            for line in netshape.down(link) or [f"{link.ns} was not up"]:
                print(line)
    except (RuntimeError, ValueError) as e:
        print(e, file=sys.stderr)
        return 1
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
