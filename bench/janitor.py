"""Everything the suite starts, it stops: daemons by PID, mounts by path, the netshape namespace.

A benchmark that dies half-way must not leave FUSE mounts, servers or a network namespace behind on
a shared machine, and the next run must start clean. Three layers do that:
- every child is started with PR_SET_PDEATHSIG, so a SIGKILLed suite still takes its daemons down;
- the live PIDs (with their start times, so a recycled PID is never signalled), and whether the
  namespace is up, are written to a state file after every change; the next run reads it first;
- every mount lives under one work root, so leftovers are found by path in /proc/self/mountinfo.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

WORK_ROOT = Path(os.environ.get("BENCH_WORK_ROOT", "/var/tmp/blobmount-bench"))
STATE_NAME = "state.json"
STOP_WAIT_S = 20.0  # a daemon exits within a second of its unmount; 20 s means it is stuck
UNMOUNT_TIMEOUT_S = 60.0
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM it when the suite's thread dies."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[19])


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below `root`, deepest first (so nested mounts come off before their parent)."""
    prefix = str(root.resolve()) if root.exists() else str(root)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4].encode().decode("unicode_escape")  # mountinfo escapes spaces as \040
            if target == prefix or target.startswith(prefix + "/"):
                found.append(Path(target))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def unmount(path: Path) -> None:
    """fusermount3 -u; when busy or the daemon is gone, detach lazily (-z)."""
    for args in (["-u"], ["-u", "-z"]):
        done = subprocess.run(["fusermount3", *args, str(path)], capture_output=True, timeout=UNMOUNT_TIMEOUT_S)
        if done.returncode == 0 or not os.path.ismount(path):
            return
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=UNMOUNT_TIMEOUT_S, check=False)


class Janitor:
    """The children and the namespace of one run, mirrored into `root`/state.json."""

    def __init__(self, root: Path = WORK_ROOT) -> None:
        self.root = root
        self.state_path = root / STATE_NAME
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.netns_up = False

    # -- state ---------------------------------------------------------------------------------

    def save(self) -> None:
        live = {str(pid): start_time(pid) for pid in self.procs}
        state = {"suite_pid": os.getpid(), "procs": live, "netns_up": self.netns_up}
        tmp = self.state_path.with_name(STATE_NAME + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_path)

    def recover(self, netns_down: Callable[[], None] | None) -> list[str]:
        """Undo what a crashed run left: its mounts, its processes, its namespace. `netns_down` is
        called (with the netshape lock held by the caller's implementation) when the state says the
        namespace was up. Returns what was done, one line per action."""
        done: list[str] = []
        for mnt in mounts_under(self.root):
            unmount(mnt)
            done.append(f"unmounted leftover {mnt}")
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(self.state_path.read_text())
            for pid_s, started in state.get("procs", {}).items():
                pid = int(pid_s)
                if started is not None and start_time(pid) == started:
                    self._kill_pid(pid)
                    done.append(f"stopped leftover process {pid}")
            if state.get("netns_up") and netns_down is not None:
                netns_down()
                done.append("tore down the leftover netshape namespace")
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        return done

    # -- processes -----------------------------------------------------------------------------

    def spawn(self, cmd: Sequence[str], log: Path | None = None, **kwargs: object) -> subprocess.Popen[bytes]:
        """Start `cmd` (stdout and stderr to `log`), recorded so it is stopped whatever happens."""
        out: IO[bytes] | int = subprocess.DEVNULL
        if log is not None:
            out = open(log, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            proc: subprocess.Popen[bytes] = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
                start_new_session=True,  # a ^C to the suite reaches the suite only; it stops them in order
                **kwargs,  # type: ignore[call-overload]
            )
        finally:
            if not isinstance(out, int):
                out.close()
        self.procs[proc.pid] = proc
        self.save()
        return proc

    def stop(self, proc: subprocess.Popen[bytes], first: signal.Signals = signal.SIGTERM) -> None:
        """`first`, then SIGKILL, to this PID only; waits for it."""
        for sig in (first, signal.SIGKILL):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
            try:
                proc.wait(STOP_WAIT_S)
                break
            except subprocess.TimeoutExpired:
                continue
        self.procs.pop(proc.pid, None)
        self.save()

    def wait_exit(self, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
        """Wait for a process that was asked to exit some other way (an unmount); escalate after."""
        try:
            proc.wait(timeout_s)
            self.procs.pop(proc.pid, None)
            self.save()
        except subprocess.TimeoutExpired:
            self.stop(proc)

    @staticmethod
    def _kill_pid(pid: int) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + STOP_WAIT_S
            while time.monotonic() < deadline:
                if start_time(pid) is None:
                    return
                time.sleep(0.05)

    def stop_all(self) -> None:
        """Unmount everything under the root, then stop every child still alive."""
        for mnt in mounts_under(self.root):
            with contextlib.suppress(Exception):
                unmount(mnt)
        for proc in list(self.procs.values()):
            with contextlib.suppress(Exception):
                self.stop(proc)


def fresh_dir(path: Path) -> Path:
    """An empty directory at `path` (mode 0700: blobmount refuses a group-writable cache)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, mode=0o700)
    return path
