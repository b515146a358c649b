"""Mount lifecycle: source -> index -> cache -> reader -> fs -> pyfuse3 main -> clean close.

The parent process does everything that can fail with a clear message (mountpoint checks, opening
the source, parsing the index) before it forks, so those errors print once and nothing is mounted.
The child mounts, proves the mount answers (``stat`` of the mountpoint through the kernel), then
reports readiness to the parent over a pipe: the parent's exit status says whether it worked.
SIGINT/SIGTERM unmount (lazily, so open files do not keep the daemon alive) and exit 0; so does an
external ``fusermount3 -u``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from blobmount.cache import ContentStore, default_cache_dir
from blobmount.config import MountConfig
from blobmount.errors import EXIT_ERROR, EXIT_OK, BlobmountError, SourceError, UsageError, exit_code_for
from blobmount.fs import BlobFS
from blobmount.index import IndexView
from blobmount.notify import notify, watchdog
from blobmount.reader import Reader, ReaderConfig
from blobmount.source import Archive
from blobmount.sources import Opening, open_archive

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0  # the first stat of a fresh mount is answered in milliseconds


@dataclass(slots=True)
class Prepared:
    config: MountConfig
    archive: Archive
    view: IndexView
    store: ContentStore


def check_mountpoint(path: Path) -> None:
    """Refuse a missing or live mountpoint; lazily unmount a stale one (ENOTCONN after a crash).

    A dead FUSE mount can still answer ``stat`` from attributes the kernel cached, so liveness is
    probed with ``statvfs``, which always reaches the daemon."""
    try:
        os.stat(path)
        stale = False
        if os.path.ismount(path):
            os.statvfs(path)
            raise UsageError(f"mountpoint {path}: something is already mounted there")
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            if exc.errno == errno.ENOENT:
                raise UsageError(f"mountpoint {path}: does not exist") from exc
            raise UsageError(f"mountpoint {path}: {exc.strerror}") from exc
        stale = True
    if stale:
        log.warning("%s: stale FUSE mount (its daemon died); unmounting it lazily", path)
        _lazy_unmount(path)
    if not os.path.isdir(path):
        raise UsageError(f"mountpoint {path}: not a directory")
    if not os.path.exists("/dev/fuse"):
        raise UsageError("/dev/fuse does not exist: load the fuse module or pass --device /dev/fuse to the container")


def _lazy_unmount(path: Path) -> None:
    result = subprocess.run(
        ["fusermount3", "-u", "-z", str(path)], capture_output=True, text=True, check=False, timeout=30
    )
    if result.returncode != 0:
        raise UsageError(f"mountpoint {path}: stale mount could not be unmounted: {result.stderr.strip()}")


def prepare(config: MountConfig, opening: Opening | None = None) -> Prepared:
    """`opening`: the source already being opened on a thread (cli.py starts it before importing
    this module); None opens it here."""
    check_mountpoint(config.mountpoint)
    cache_dir = config.cache_dir or default_cache_dir()
    store = ContentStore(cache_dir, config.cache_size)
    notify(f"STATUS=opening {config.source}")
    if opening is not None:
        archive = opening.result()
    else:
        archive = open_archive(config.source, config.registry, cache_dir=cache_dir, cache_size=config.cache_size)
    notify(f"STATUS=checking the index of {archive.name}")
    view = IndexView(archive.index_bytes, blob_size=archive.data.size)
    log.info(
        "%s: %d entries, %d-byte data blob, order %s",
        archive.name,
        len(view),
        view.blob_size,
        view.order.value,
    )
    return Prepared(config, archive, view, store)


def fuse_options(config: MountConfig, source_name: str) -> set[str]:
    opts = set(pyfuse3.default_options)  # default_permissions: the kernel checks the mode bits
    opts |= {"ro", "subtype=blobmount", f"fsname={source_name.replace(',', '_')}"}
    for opt in config.fuse_options:
        key = opt.partition("=")[0]
        opts = {o for o in opts if o.partition("=")[0] != key}
        opts.add(opt)
    if config.debug:
        opts.add("debug")
    return opts


async def _serve(prep: Prepared, fs: BlobFS, ready_fd: int | None) -> None:
    """Run the FUSE loop until unmounted or signalled."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.invalidator)
            nursery.start_soon(_signals, nursery.cancel_scope)
            nursery.start_soon(_report_ready, prep.config.mountpoint, ready_fd, prep.archive.name)
            nursery.start_soon(watchdog)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()  # main() returned: unmounted from outside
            notify("STOPPING=1", "STATUS=unmounted")
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await prep.archive.data.aclose()


async def _signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s; unmounting", signal.Signals(signum).name)
            notify("STOPPING=1", "STATUS=unmounting")
            scope.cancel()
            return


async def _report_ready(mountpoint: Path, ready_fd: int | None, name: str) -> None:
    """READY only once the mount answers a stat through the kernel, not when it was merely set up."""
    with trio.fail_after(READY_TIMEOUT_S):
        await trio.to_thread.run_sync(os.stat, mountpoint)
    log.info("mounted at %s", mountpoint)
    notify("READY=1", f"STATUS=serving {name} at {mountpoint}")
    if ready_fd is not None:
        os.write(ready_fd, b"ok\n")
        os.close(ready_fd)


def _daemon_logging(config: MountConfig) -> None:
    """After the parent has gone, stderr may be a closed pipe: log to syslog when there is one."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if os.path.exists("/dev/log"):
        syslog = logging.handlers.SysLogHandler(address="/dev/log")
        syslog.setFormatter(logging.Formatter("blobmount[%(process)d]: %(levelname)s: %(message)s"))
        root.addHandler(syslog)
    else:
        root.addHandler(logging.NullHandler())


def serve(prep: Prepared, ready_fd: int | None) -> int:
    config = prep.config
    reader = Reader(prep.archive.data, prep.store, ReaderConfig(config.verify, config.verify_threshold))  # type: ignore[arg-type]
    fs = BlobFS(prep.view, reader, uid=config.uid, gid=config.gid, timeout_s=config.attr_timeout_s)
    try:
        pyfuse3.init(fs, str(config.mountpoint), fuse_options(config, prep.archive.name))
    except RuntimeError as exc:
        raise SourceError(f"mount {config.mountpoint}: {exc}") from exc
    try:
        trio.run(_serve, prep, fs, ready_fd)
    finally:
        pyfuse3.close(unmount=True)
        prep.archive.data.close()
    log.info("unmounted %s", config.mountpoint)
    return EXIT_OK


def run_mount(config: MountConfig, opening: Opening | None = None) -> int:
    prep = prepare(config, opening)
    if config.foreground:
        return serve(prep, None)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            answer = pipe.readline()  # "ok" or one error line; EOF if the child died
        if answer.startswith(b"ok"):
            return EXIT_OK
        message = answer.decode(errors="replace").strip() or "the daemon exited before the mount was ready"
        print(f"blobmount: {message}", file=sys.stderr)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        return code if code > 0 else EXIT_ERROR
    # child: never returns into the caller's stack
    os.close(read_fd)
    os.setsid()
    code = EXIT_ERROR
    try:
        code = _child(prep, write_fd)
    finally:
        os._exit(code)


def _child(prep: Prepared, pipe_fd: int) -> int:
    """The daemon: serve; a failure before readiness is reported as one line on the pipe."""
    err_fd = os.dup(pipe_fd)
    try:
        _daemon_logging(prep.config)
        return serve(prep, pipe_fd)
    except BlobmountError as exc:
        log.error("%s", exc)
        _try_write(err_fd, f"{exc}\n".encode())
        return exit_code_for(exc)
    except BaseException as exc:
        log.exception("daemon failed")
        _try_write(err_fd, f"daemon failed: {exc!r}\n".encode())
        return EXIT_ERROR


def _try_write(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, data)
