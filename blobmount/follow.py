"""``--follow``: re-resolve the mount's tag at an interval and switch to a new archive in one step.

Each check is one conditional HEAD of the tag (an ``oci:`` layout: one read of its index.json).
When the digest moved, the new archive is opened with every check a mount makes (the manifest
against its digest, the index against the manifest's digest and size, the index header, then every
entry of the new index, validated while it is compared with the old one), all in the background
while the old archive serves. Only then does fs.py switch (no await in between), and the kernel's
caches of what changed are invalidated. A new archive that fails a check is refused with one log
line and the ``refused`` count of ``blobmount_follow_checks_total``; the old one keeps serving and
that digest is not tried again. The digest served is published to ``blobmount status``, the
``blobmount_info`` metric, systemd's ``STATUS=`` and the root's ``user.blobmount.digest`` xattr.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from blobmount import __version__, generations
from blobmount.cache import CacheDir, ContentStore, MetaStore
from blobmount.config import MountConfig
from blobmount.daemon import metrics
from blobmount.daemon.control import DaemonState
from blobmount.daemon.notify import notify
from blobmount.errors import BlobmountError, IntegrityError, InvalidArchive, LimitExceeded, SourceError, UsageError
from blobmount.fs import BlobFS
from blobmount.index import Entry, IndexView
from blobmount.reader import Reader, ReaderConfig
from blobmount.reference import Digest, Reference
from blobmount.sources.base import Archive, Fetching, RangeSource

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 60.0
# what refuses a new archive for good (its digest is not tried again); other errors (the registry
# down, a timeout) are retried at the next check
REFUSALS = (InvalidArchive, IntegrityError, LimitExceeded)


def check_followable(source: str, offline: bool) -> None:
    """--follow needs something that can move: a registry tag, or an oci: layout's index.json."""
    from blobmount.sources import kind

    if offline:
        raise UsageError("--follow needs the network; it cannot be combined with --offline")
    if kind(source) == "oci":
        return
    if kind(source) == "dir":
        raise UsageError(f"--follow: {source} is a local directory, which has no tag to follow (oci:PATH:TAG has)")
    if Reference.parse(source).digest is not None:
        raise UsageError(f"--follow: {source} names a digest, which never moves; name a tag")


def index_view(archive: Archive, cache: CacheDir) -> IndexView:
    """The archive's index checked and parsed (the order of its entries remembered in the cache
    by index digest, so a remount does not scan it again)."""
    meta = MetaStore(cache)
    digest_hex = archive.index_digest.removeprefix("sha256:")
    known = meta.get_derived("order", digest_hex)
    view = IndexView(archive.index_bytes, blob_size=archive.data.size, known_order=known)
    if known is None:
        meta.put_derived("order", digest_hex, view.order_record())
    return view


def cached_bytes_of(data: RangeSource) -> Callable[[Entry], int] | None:
    """The user.blobmount.cached_bytes hook for a data source (None: not a chunk cache)."""
    if isinstance(data, Fetching):
        return lambda e: data.cached_bytes(e.data_offset, e.data_offset + e.data_size)
    return None


def publish(state: DaemonState, archive: Archive, view: IndexView, mountpoint: Path) -> None:
    """Say which archive is served: status, the info metric, systemd's STATUS= line."""
    state.pinned = archive.name
    state.index_digest = archive.index_digest
    state.data_digest = f"sha256:{view.data_hash.hex()}" if view.data_hash else None
    state.entries = len(view)
    state.data_size = view.blob_size
    metrics.INFO.clear()
    metrics.INFO.labels(version=__version__, source=archive.name, digest=archive.index_digest).set(1)
    notify(f"STATUS=serving {archive.name} at {mountpoint}")


class Follower:
    """The follow task of one mount (mount.py starts :meth:`run` in its nursery)."""

    def __init__(
        self, config: MountConfig, cache: CacheDir, store: ContentStore, fs: BlobFS, state: DaemonState
    ) -> None:
        self.config = config
        self.cache = cache
        self.store = store
        self.fs = fs
        self.state = state
        self.interval_s = config.follow.interval_s
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._refused: str | None = None  # a digest (or index.json hash) that failed its checks
        self._waiting: str | None = None  # a digest seen while too many archives were in use
        self._last_error: str | None = None
        self._seen_layout: bytes | None = None  # oci: sha256 of the index.json last read
        self._endpoints: Any = None  # registry/mirrors.Endpoints, created in the loop
        self.info: dict[str, Any] = {
            "interval_s": self.interval_s,
            "checks": 0,
            "switches": 0,
            "last_check": None,
            "refused": None,
            "waiting": None,
        }
        state.follow = self.info
        metrics.FOLLOW_ARCHIVES.set(1)
        metrics.FOLLOW_INDEX_BYTES.set_function(self._index_bytes)

    def _index_bytes(self) -> float:
        return float(sum(len(g.archive.index_bytes) for g in self.fs.generations.values() if g.archive is not None))

    def wake(self) -> None:
        """Check now (SIGHUP)."""
        self._wake.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                while True:
                    with trio.move_on_after(self.interval_s):
                        await self._wake.wait()
                    self._wake = trio.Event()
                    try:
                        await self.check()
                        await self._close_retired()
                    except Exception:  # a bug here must not take the mount down: it keeps serving
                        metrics.FOLLOW_CHECKS.labels(result="error").inc()
                        log.exception("--follow: the check failed; still serving %s", self.fs.current.digest)
            finally:
                if self._endpoints is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(5):
                        await self._endpoints.aclose()

    async def check(self) -> bool:
        """One check; whether it switched."""
        self.info["checks"] += 1
        self.info["last_check"] = time.time()
        try:
            with trio.fail_after(self.config.registry.timeout_s * 2):
                found = await self._poll()
        except (BlobmountError, trio.TooSlowError) as exc:
            why = str(exc) if isinstance(exc, BlobmountError) else "no answer within --timeout"
            metrics.FOLLOW_CHECKS.labels(result="error").inc()
            if why != self._last_error:  # once per distinct failure, not once per interval
                source, served = self.config.source, self.fs.current.digest
                log.warning("--follow: checking %s: %s; still serving %s", source, why, served)
                self._last_error = why
            return False
        if found is None:
            self._last_error = None  # the registry answers again (kept while opening a new one fails)
        if found is None or found == self._refused:
            metrics.FOLLOW_CHECKS.labels(result="unchanged").inc()
            return False
        if not self.fs.room_for_switch():
            metrics.FOLLOW_CHECKS.labels(result="waiting").inc()
            if self._waiting != found:
                log.info(
                    "--follow: %s moved to %s; the switch waits until fewer than %d archives are in use (open files)",
                    self.config.source,
                    found,
                    self.fs.keep,
                )
                self._waiting = self.info["waiting"] = found
            return False
        return await self._switch(found)

    async def _poll(self) -> str | None:
        """What the source names now if it moved from what is served, else None."""
        from blobmount.sources import kind

        if kind(self.config.source) == "oci":
            return await trio.to_thread.run_sync(self._poll_layout)
        from blobmount.registry.mirrors import Endpoints

        ref = Reference.parse(self.config.source)
        if self._endpoints is None:
            self._endpoints = Endpoints(ref, self.config.registry)
        known = Digest.parse(self.fs.current.digest)
        from blobmount.sources.remote import first_answer

        moved = await first_answer(self._endpoints, lambda c: c.resolve_changed(known), resolve=True)
        return None if moved is None else str(moved)

    def _layout_path(self) -> Path:
        from blobmount.sources.oci_layout import layout_and_tag

        return layout_and_tag(self.config.source.removeprefix("oci:"))[0]

    def _poll_layout(self) -> str | None:
        """An oci: layout: a new index.json (by content) is a candidate; opening it says more."""
        try:
            body = (self._layout_path() / "index.json").read_bytes()
        except OSError as exc:
            raise SourceError(f"{self.config.source}: cannot read index.json: {exc.strerror}") from exc
        seen = hashlib.sha256(body).digest()
        if seen == self._seen_layout:  # the first look is a candidate: opening it says if it moved
            return None
        self._seen_layout = seen
        return "index.json:" + seen.hex()

    async def _open(self, found: str) -> Archive:
        from blobmount.sources import RemoteSettings, kind, open_source

        if kind(self.config.source) == "oci":
            return await open_source(self.config.source)

        ref = Reference.parse(self.config.source)
        settings = RemoteSettings(self.cache, self.config.cache.chunk_size, False, False)
        archive = await open_source(f"{ref.registry}/{ref.repository}@{found}", self.config.registry, settings)
        key = f"{ref.registry}/{ref.repository}:{ref.ref_for_manifest}"
        MetaStore(self.cache).put_tag(key, found)  # a remount (or a stale-tag fallback) starts here
        return archive

    async def _switch(self, found: str) -> bool:
        fs, old = self.fs, self.fs.current
        archive: Archive | None = None
        try:
            archive = await self._open(found)
            if old.archive is not None and archive.index_digest == old.archive.index_digest:
                archive.data.close()  # an oci: index.json rewritten to the same archive
                metrics.FOLLOW_CHECKS.labels(result="unchanged").inc()
                return False
            view = await trio.to_thread.run_sync(index_view, archive, self.cache)
            changed = await trio.to_thread.run_sync(generations.changes, old.view, view)
        except BlobmountError as exc:
            if archive is not None:
                await _close(archive)
            if not isinstance(exc, REFUSALS):  # the registry failed, not the archive: next time again
                metrics.FOLLOW_CHECKS.labels(result="error").inc()
                if str(exc) != self._last_error:
                    log.warning("--follow: opening %s: %s; still serving %s", found, exc, old.digest)
                    self._last_error = str(exc)
                return False
            metrics.FOLLOW_CHECKS.labels(result="refused").inc()
            log.error(
                "--follow: %s moved to %s, which is refused: %s; still serving %s",
                self.config.source,
                found,
                exc,
                old.digest,
            )
            self._refused = self.info["refused"] = found
            return False
        if fs.current is not old or not fs.room_for_switch():  # changed while it was being checked
            await _close(archive)
            return False
        # In the kernel's no-open mode (fs.py: decided for the first archive, for the life of the
        # mount) no open reaches the daemon, so no file of a later archive may be served before it
        # is verified whole: per-open distrust needs opens ("Trust first" wins over the lever).
        verify = "strict" if fs.skip_open else self.config.verify.policy
        reader = Reader(
            archive.data,
            self.store,
            ReaderConfig(verify, self.config.verify.threshold_bytes, self.config.registry.timeout_s),  # type: ignore[arg-type]
            drop_pages=fs.pages_of_next(),
            dir_span=view.data_span,
        )
        assert self._nursery is not None
        if isinstance(archive.data, Fetching):
            archive.data.attach(self._nursery)
        reader.attach(self._nursery)
        gen = fs.switch(archive, view, reader, cached_bytes_of(archive.data))  # one step
        metrics.FOLLOW_CHECKS.labels(result="switched").inc()
        metrics.FOLLOW_ARCHIVES.set(len(fs.generations))
        self.info["switches"] += 1
        self._waiting = self.info["waiting"] = None
        self._last_error = None
        publish(self.state, archive, view, self.config.mountpoint)
        invalidated = await fs.invalidate_switch(old, changed)
        log.info(
            "--follow: %s: switched from %s to %s (%d added, %d removed, %d changed; %d kernel entries invalidated)",
            self.config.source,
            old.digest,
            gen.digest,
            changed.added,
            changed.removed,
            changed.changed,
            invalidated,
        )
        return True

    async def _close_retired(self) -> None:
        for gen in self.fs.take_retired():
            if gen.archive is not None:
                await _close(gen.archive)
        metrics.FOLLOW_ARCHIVES.set(len(self.fs.generations))


async def _close(archive: Archive) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(5):
        await archive.data.aclose()
    archive.data.close()
