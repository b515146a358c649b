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
import logging
import logging.handlers
import math
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from blobmount import __version__, profile
from blobmount.cache import CacheDir, ContentStore, default_cache_dir
from blobmount.cache.meta import MetaStore
from blobmount.config import MountConfig
from blobmount.daemon import control, http, logs, metrics
from blobmount.daemon.notify import notify, watchdog
from blobmount.errors import EXIT_ERROR, EXIT_OK, BlobmountError, SourceError, exit_code_for
from blobmount.follow import Follower, cached_bytes_of, check_followable, index_view
from blobmount.fs import BlobFS
from blobmount.index import IndexView
from blobmount.kernel import PageDrops
from blobmount.mountpoint import check_mountpoint, fuse_fd
from blobmount.prefetch import ranges_for
from blobmount.reader import Reader, ReaderConfig
from blobmount.sources import Opening, RemoteSettings, open_archive
from blobmount.sources.base import Archive, Fetching

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0  # the first stat of a fresh mount is answered in milliseconds
# pyfuse3 starts a worker task whenever it takes a request and no other worker is waiting for one,
# up to MAX_WORKERS; idle ones beyond MIN_WORKERS end. A request that finds none waits in the kernel's
# queue, where its age counts against the kernel's request timeout, so the ceiling is far above what
# a mount meets (each blocked caller holds one request; read-ahead at most the kernel's
# max_background, 12): a worker costs a trio task and a mostly untouched receive buffer.
MIN_WORKERS = 1
MAX_WORKERS = 1024
PROGRESS_INTERVAL_S = 0.5  # STATUS= lines while prefetching: enough for systemctl status


@dataclass(slots=True)
class Prepared:
    config: MountConfig
    archive: Archive
    view: IndexView
    store: ContentStore
    cache: CacheDir
    prefetch: list[tuple[int, int]]  # data-blob ranges of the --prefetch paths
    metrics_socket: socket.socket | None = None  # --metrics, bound before the fork
    recorder: profile.Recorder | None = None  # --record-profile


def prepare(config: MountConfig, opening: Opening | None = None) -> Prepared:
    """`opening`: the source already being opened on a thread (cli/mounts.py starts it before importing
    this module); None opens it here."""
    if config.follow.enabled:
        check_followable(config.source, config.remote.offline)
    check_mountpoint(config.mountpoint, config.kernel.nonempty)
    metrics_socket = http.open_metrics_socket(config.daemon.metrics) if config.daemon.metrics else None
    notify(f"STATUS=opening {config.source}")
    if opening is not None:
        archive, cache = opening.result()
    else:
        cache = CacheDir(config.cache.dir or default_cache_dir(), config.cache.size_bytes)
        settings = RemoteSettings(cache, config.cache.chunk_size, config.remote.offline, config.remote.stale_tag)
        archive = open_archive(config.source, config.registry, settings)
    store = ContentStore(cache)
    notify(f"STATUS=checking the index of {archive.name}")
    view = index_view(archive, cache)
    log.info(
        "%s: %d entries, %d-byte data blob, order %s",
        archive.name,
        len(view),
        view.blob_size,
        view.order.value,
    )
    prefetch = ranges_for(view, config.prefetch.paths)  # a typo is a one-line error now, not a log line later
    return Prepared(config, archive, view, store, cache, prefetch, metrics_socket)


def _introspection(prep: Prepared) -> control.DaemonState:
    """What `status` (daemon/control.py) and the metrics endpoint report about this mount."""
    config, view = prep.config, prep.view
    data_digest = f"sha256:{view.data_hash.hex()}" if view.data_hash else None
    metrics.INFO.labels(version=__version__, source=prep.archive.name, digest=prep.archive.index_digest).set(1)
    metrics.CACHE_BYTES.set_function(prep.cache.accounted_bytes, store="disk")
    metrics.CACHE_LIMIT_BYTES.labels(store="disk").set(config.cache.size_bytes)
    return control.DaemonState(
        mountpoint=config.mountpoint,
        source=config.source,
        pinned=prep.archive.name,
        index_digest=prep.archive.index_digest,
        data_digest=data_digest,
        entries=len(view),
        data_size=view.blob_size,
        cache_dir=prep.cache.root,
        cache_limit=config.cache.size_bytes,
        profile=_profile_document(prep),
    )


def _profile_document(prep: Prepared) -> Callable[[], dict[str, Any]] | None:
    """`blobmount profile save`'s answer: the profile recorded so far (None: not recording)."""
    recorder = prep.recorder
    if recorder is None:
        return None
    return lambda: recorder.document(prep.archive.index_digest)


def _save_profile(prep: Prepared) -> None:
    """On unmount: the recorded profile into the cache's meta store (MetaStore.profile_path)."""
    if prep.recorder is None:
        return
    meta = MetaStore(prep.cache)
    index_hex = prep.archive.index_digest.removeprefix("sha256:")
    try:
        path = meta.put_profile(index_hex, profile.dumps(prep.recorder.document(prep.archive.index_digest)))
    except OSError as exc:
        log.warning("prefetch profile: cannot write %s: %s", meta.profile_path(index_hex), exc.strerror)
        return
    log.info("prefetch profile: %d entries written to %s", len(prep.recorder.entries), path)


def fuse_options(config: MountConfig, source_name: str) -> set[str]:
    opts = set(pyfuse3.default_options)  # default_permissions: the kernel checks the mode bits
    opts |= {"ro", "subtype=blobmount", f"fsname={source_name.replace(',', '_')}"}
    for opt in config.kernel.fuse_options:
        key = opt.partition("=")[0]
        opts = {o for o in opts if o.partition("=")[0] != key}
        opts.add(opt)
    if config.kernel.debug:
        opts.add("debug")
    return opts


async def _serve(prep: Prepared, fs: BlobFS, ready_fd: int | None) -> None:
    """Run the FUSE loop until unmounted or signalled."""
    state = _introspection(prep)
    follower = Follower(prep.config, prep.cache, prep.store, fs, state) if prep.config.follow.enabled else None
    try:
        async with trio.open_nursery() as nursery:
            data = prep.archive.data
            if isinstance(data, Fetching):
                data.attach(nursery)
            fs.reader.attach(nursery)
            await nursery.start(control.serve_control, state)
            if prep.metrics_socket is not None:
                nursery.start_soon(http.serve_metrics, state, prep.metrics_socket)
            nursery.start_soon(fs.invalidator)
            nursery.start_soon(fs.decide_opens)  # the kernel's no-open mode, if no file is verified lazily
            nursery.start_soon(_signals, nursery.cancel_scope, follower)
            if follower is not None:
                nursery.start_soon(follower.run)
            nursery.start_soon(_report_ready, prep, ready_fd)
            nursery.start_soon(watchdog)
            nursery.start_soon(trio.to_thread.run_sync, prep.cache.resync)  # recount, drop dead temp files
            await pyfuse3.main(min_tasks=MIN_WORKERS, max_tasks=MAX_WORKERS)
            nursery.cancel_scope.cancel()  # main() returned: unmounted from outside
            metrics.READY.set(0)
            notify("STOPPING=1", "STATUS=unmounted")
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            for archive in _archives(fs):
                await archive.data.aclose()


def _archives(fs: BlobFS) -> list[Archive]:
    """Every archive the mount still has open (more than one after a --follow switch)."""
    gens = [*fs.generations.values(), *fs.take_retired()]
    return [g.archive for g in gens if g.archive is not None]


async def _signals(scope: trio.CancelScope, follower: Follower | None = None) -> None:
    """SIGINT and SIGTERM unmount; so does SIGHUP, except under --follow: there it checks the tag now."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP and follower is not None:
                log.info("received SIGHUP; checking %s now (--follow)", follower.config.source)
                follower.wake()
                continue
            log.info("received %s; unmounting", signal.Signals(signum).name)
            metrics.READY.set(0)
            notify("STOPPING=1", "STATUS=unmounting")
            scope.cancel()
            return


async def _report_ready(prep: Prepared, ready_fd: int | None) -> None:
    """READY only once the mount answers a stat through the kernel, not when it was merely set up
    (with a /dev/fd/N mountpoint the path is the helper's to know: ready once serving); then the
    --prefetch paths, if any, with STATUS lines."""
    mountpoint, name = prep.config.mountpoint, prep.archive.name
    if fuse_fd(mountpoint) is None:
        with trio.fail_after(READY_TIMEOUT_S):
            st = await trio.to_thread.run_sync(os.stat, mountpoint)
        if prep.config.kernel.read_ahead_kb:
            _set_read_ahead(st.st_dev, prep.config.kernel.read_ahead_kb)
    log.info("mounted at %s", mountpoint)
    metrics.READY.set(1)
    notify("READY=1", f"STATUS=serving {name} at {mountpoint}")
    if ready_fd is not None:
        os.write(ready_fd, b"ok\n")
        os.close(ready_fd)
    data = prep.archive.data
    if prep.prefetch and isinstance(data, Fetching):
        shown = 0.0

        def progress(done: int, total: int) -> None:
            nonlocal shown
            if trio.current_time() - shown >= PROGRESS_INTERVAL_S or done == total:
                shown = trio.current_time()
                notify(f"STATUS=prefetching: {done >> 20} of {total >> 20} MiB")

        try:
            fetched = await data.fill(prep.prefetch, progress)
        except BlobmountError as exc:
            log.warning("--prefetch stopped: %s", exc)
        else:
            log.info("--prefetch: %d bytes fetched", fetched)
        notify(f"STATUS=serving {name} at {mountpoint}")
    if prep.config.prefetch.profile != "none":  # after READY: the mount never waits for it
        room = int((prep.config.cache.size_bytes - prep.cache.accounted_bytes()) * profile.BUDGET_FRACTION)
        await profile.use(prep.config.prefetch.profile, name, prep.view, data, prep.config.registry, room)


def _set_read_ahead(dev: int, kb: int) -> None:
    """Let the kernel read ahead `kb` KiB per FUSE request (its default is 128): with 1 MiB, a
    sequential reader costs the daemon 8x fewer requests, and a cold 1 GiB read through the
    registry measured 5.8 -> 4.7 CPU-s. Needs root (the sysfs file); otherwise the default stays."""
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError as exc:
        log.debug("%s: %s; keeping the kernel's read-ahead", path, exc.strerror)


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
        syslog.setFormatter(logs.syslog_formatter())
        root.addHandler(syslog)
    else:
        root.addHandler(logging.NullHandler())


def serve(prep: Prepared, ready_fd: int | None) -> int:
    config = prep.config
    logs.quiet_one_shot(False)  # the daemon's log is where a failing registry or file shows
    if config.prefetch.record:
        prep.recorder = profile.Recorder(seconds=config.prefetch.record_seconds)
    pages = PageDrops()  # the kernel's pages of files the reader distrusts
    reader = Reader(
        prep.archive.data,
        prep.store,
        ReaderConfig(config.verify.policy, config.verify.threshold_bytes, config.registry.timeout_s),  # type: ignore[arg-type]
        drop_pages=pages.for_archive(0),
        dir_span=prep.view.data_span,
        recorder=prep.recorder.read if prep.recorder is not None else None,
    )
    fs = BlobFS(
        prep.view,
        reader,
        uid=config.kernel.uid,
        gid=config.kernel.gid,
        timeout_s=config.kernel.attr_timeout_s,
        dir_time_ns=prep.archive.created_ns,
        deadline_s=config.kernel.request_bound_s,
        archive=prep.archive,
        pages=pages,
        cached_bytes=cached_bytes_of(prep.archive.data),
        keep=config.follow.keep,
        follows=config.follow.enabled,
    )
    if config.kernel.request_bound_s < math.inf:
        log.info(
            "every FUSE request is answered within %g s (the kernel's request timeout less a margin)",
            config.kernel.request_bound_s,
        )
    try:
        pyfuse3.init(fs, str(config.mountpoint), fuse_options(config, prep.archive.name))
    except RuntimeError as exc:
        raise SourceError(f"mount {config.mountpoint}: {exc}") from exc
    try:
        trio.run(_serve, prep, fs, ready_fd)
    finally:
        pyfuse3.close(unmount=True)
        for archive in _archives(fs):
            archive.data.close()
        _save_profile(prep)
    log.info("unmounted %s", config.mountpoint)
    return EXIT_OK


def run_mount(config: MountConfig, opening: Opening | None = None) -> int:
    prep = prepare(config, opening)
    if config.daemon.foreground:
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
