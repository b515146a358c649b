"""The filesystems compared, and how each is mounted, timed to ready, and taken down.

Every peer is a foreground daemon the suite starts itself (so it owns the PID and can read its peak
RSS), mounted at the same mount point, with a fresh cache directory for a cold run. blobmount is a
black box here: only its CLI (``blobmount mount -f SOURCE MNT --cache-dir DIR [--plain-http H:P]``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench._common import proc_number
from bench.datasets import Dataset
from bench.janitor import Janitor, fresh_dir, unmount
from bench.servers import NS_IP, Server

MOUNT_WAIT_S = 120.0  # the slowest peer (rclone over a shaped link) answers in seconds; 2 min is broken
EXIT_AFTER_UNMOUNT_S = 20.0
POLL_S = 0.002  # mount-ready is polled this often; finer than any figure reported (ms)
REGISTRY_REPO = "bench"
LOCAL = "local"


@dataclass(frozen=True)
class Peer:
    """`kind` selects the command; `network` is local, loopback or netns; `option` a variant
    (rclone's --vfs-cache-mode)."""

    name: str
    kind: str
    network: str
    option: str = ""

    @property
    def mounts(self) -> bool:
        return self.kind != "plain"

    @property
    def persistent_cache(self) -> bool:
        """Whether a remount can be served from what an earlier mount cached on disk."""
        return self.kind == "blobmount-registry" or (self.kind == "rclone" and self.option == "full")

    @property
    def is_blobmount(self) -> bool:
        return self.kind.startswith("blobmount")

    def serves(self, dataset: str, workload: str) -> bool:
        if self.kind == "httpfs2":  # one file per mount: big.bin
            return dataset == "big" and workload in ("ready", "seq", "rand4k")
        return True


def local_peers(with_ratarmount: bool) -> list[Peer]:
    peers = [
        Peer("plain", "plain", LOCAL),
        Peer("blobmount-dir", "blobmount-dir", LOCAL),
        Peer("squashfuse", "squashfuse", LOCAL),
    ]
    if with_ratarmount:
        peers.append(Peer("ratarmount", "ratarmount", LOCAL))
    return peers


def remote_peers(network: str, with_rclone: bool) -> list[Peer]:
    peers = [Peer("blobmount-reg", "blobmount-registry", network)]
    if with_rclone:
        peers += [Peer("rclone-full", "rclone", network, "full"), Peer("rclone-off", "rclone", network, "off")]
    peers.append(Peer("httpfs2", "httpfs2", network))
    return peers


def blobmount_cmd() -> list[str]:
    script = Path(sys.executable).with_name("blobmount")
    return [str(script)] if script.exists() else [sys.executable, "-m", "blobmount.cli"]


def ratarmount_cmd() -> list[str]:
    script = Path(sys.executable).with_name("ratarmount")
    return [str(script)] if script.exists() else ["ratarmount"]


def registry_ref(registry: Server, dataset: str) -> str:
    return f"{registry.addr}/{REGISTRY_REPO}/{dataset}:v1"


@dataclass
class Mounted:
    root: Path  # where the dataset's files are (the mount point, or the plain directory)
    pid: int | None  # the daemon, None for plain files
    ready_s: float

    def peak_rss(self) -> int | None:
        if self.pid is None:
            return None
        with contextlib.suppress(OSError, RuntimeError):
            return proc_number(self.pid, "status", "VmHWM") * 1024
        return None


class Mounter:
    """Mounts peers at `work`/mnt; `servers[network]` = (registry, nginx) for remote peers."""

    def __init__(self, janitor: Janitor, work: Path) -> None:
        self.janitor = janitor
        self.work = work
        self.mnt = work / "mnt"
        self.logs = work / "logs"
        self.caches = work / "cache"
        self.servers: dict[str, tuple[Server, Server]] = {}
        self.count = 0
        for d in (self.mnt, self.logs, self.caches):
            d.mkdir(parents=True, exist_ok=True)
        (work / "rclone.conf").touch()

    def command(self, peer: Peer, ds: Dataset, cache: Path) -> list[str]:
        mnt = str(self.mnt)
        if peer.kind == "blobmount-dir":
            return [*blobmount_cmd(), "mount", "-f", str(ds.archive), mnt, "--cache-dir", str(cache)]
        if peer.kind == "squashfuse":
            return ["squashfuse", "-f", str(ds.squashfs), mnt]
        if peer.kind == "ratarmount":
            return [*ratarmount_cmd(), "-f", str(ds.tar), mnt]
        registry, nginx = self.servers[peer.network]
        if peer.kind == "blobmount-registry":
            cmd = [*blobmount_cmd(), "mount", "-f", registry_ref(registry, ds.name), mnt, "--cache-dir", str(cache)]
            if registry.host == NS_IP:
                cmd += ["--plain-http", registry.addr]
            return cmd
        if peer.kind == "rclone":
            return [
                "rclone", "mount", ":http:", mnt, "--http-url", f"http://{nginx.addr}/{ds.name}/", "--read-only",
                "--vfs-cache-mode", peer.option, "--cache-dir", str(cache), "--config", str(self.work / "rclone.conf"),
            ]  # fmt: skip
        if peer.kind == "httpfs2":
            return ["httpfs2", "-f", f"http://{nginx.addr}/{ds.name}/big.bin", mnt]
        raise ValueError(f"unknown peer kind {peer.kind}")

    @contextlib.contextmanager
    def mount(self, peer: Peer, ds: Dataset, fresh_cache: bool = True) -> Iterator[Mounted]:
        """A live mount of `ds` by `peer`, ready (the mount point answers stat); always taken down.
        `fresh_cache` False keeps the peer's cache directory from the previous mount (a remount)."""
        if not peer.mounts:
            yield Mounted(ds.plain, None, 0.0)
            return
        cache = self.caches / f"{peer.network}-{peer.name}-{ds.name}"
        if fresh_cache or not cache.exists():
            fresh_dir(cache)
        if os.path.ismount(self.mnt):
            unmount(self.mnt)
        cmd = self.command(peer, ds, cache)
        self.count += 1
        log = self.logs / f"{self.count:05d}-{peer.network}-{peer.name}-{ds.name}.log"
        t = time.perf_counter()
        proc = self.janitor.spawn(cmd, log)
        try:
            deadline = time.monotonic() + MOUNT_WAIT_S
            while True:
                if os.path.ismount(self.mnt):
                    os.stat(self.mnt)  # the daemon answers a request
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{peer.name}: {' '.join(cmd)} did not mount:\n{tail}")
                time.sleep(POLL_S)
            ready_s = time.perf_counter() - t
            yield Mounted(self.mnt, proc.pid, ready_s)
        finally:
            if os.path.ismount(self.mnt):
                unmount(self.mnt)
            self.janitor.wait_exit(proc, EXIT_AFTER_UNMOUNT_S)

    def drop_cache_dirs(self) -> None:
        shutil.rmtree(self.caches, ignore_errors=True)
        self.caches.mkdir()
