"""systemd's notify protocol without a dependency: one datagram per message on $NOTIFY_SOCKET.

READY=1 is sent once the mount answers (mount.py), STATUS= lines while loading, STOPPING=1 on
shutdown, WATCHDOG=1 every half $WATCHDOG_USEC. Outside systemd ($NOTIFY_SOCKET unset) every call
is a no-op, so the daemon never needs to know how it was started.
"""

from __future__ import annotations

import logging
import os
import socket

import trio

log = logging.getLogger(__name__)


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):  # abstract namespace
        return "\0" + addr[1:]
    return addr


def notify(*lines: str) -> bool:
    """Send `lines` as one message; True when there was a socket to send to."""
    addr = _address()
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), addr)
    except OSError as exc:  # the manager went away: nothing to tell, nothing to fail
        log.debug("sd_notify %s: %s", lines, exc)
        return False
    return True


def watchdog_interval_s() -> float | None:
    """Half the watchdog timeout when systemd asked for pings (and they are meant for us)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None


async def watchdog() -> None:
    """Long-lived task: WATCHDOG=1 at half the interval while the event loop is alive."""
    interval = watchdog_interval_s()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval)
