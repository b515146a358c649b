"""`blobmount cp` from the real registry: whole archives and subtrees, the shared chunk cache (a
second copy fetches nothing), an integrity failure through the fault proxy (exit 5, no file under
its name), a fault that clears (read again from the origin), and range reads that really overlap
(counted at the proxy, never timed)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blobmount.cli import main
from blobmount.index import IndexView
from tests.support.faults import Fault, FaultProxy, Kind, blob
from tests.support.helpers import FIXTURES, tree_files
from tests.support.servers import QuirkProxy, Registry

DATA_DIGEST = json.loads((FIXTURES / "mixed" / "oci-manifest.json").read_bytes())["layers"][1]["digest"]
HOLD_S = 0.05  # each data request is held this long at the proxy, so that concurrent ones meet


def _files_under(root: Path) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    base = os.fsencode(root)
    for dirpath, _dirs, filenames in os.walk(base):
        for name in filenames:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, base)] = f.read()
    return out


def _data_gets(seen: list[tuple[str, str, dict[str, str]]]) -> list[str]:
    return [h.get("range", "") for m, p, h in seen if m == "GET" and f"/blobs/{DATA_DIGEST}" in p]


@pytest.mark.parametrize("name", ["mixed", "unicode"])
def test_cp_of_a_whole_archive_by_reference(name: str, pushed: dict[str, str], tmp_path: Path) -> None:
    dest = tmp_path / "out"
    assert main(["cp", pushed[name], ".", str(dest), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert _files_under(dest) == {p: f.data for p, f in tree_files(name).items()}


def test_cp_of_a_subtree_and_of_files_by_digest(pushed: dict[str, str], tmp_path: Path) -> None:
    files = tree_files("basic")
    dest = tmp_path / "sub"
    assert main(["cp", pushed["basic@"], "a", str(dest), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert _files_under(dest) == {p[2:]: f.data for p, f in files.items() if p.startswith(b"a/")}
    dest = tmp_path / "files"
    assert main(["cp", pushed["basic"], "top.md", "a/x.json", str(dest), "--cache-dir", str(tmp_path / "c2")]) == 0
    assert _files_under(dest) == {p: files[p].data for p in (b"top.md", b"a/x.json")}


def test_a_missing_path_fetches_no_data_and_writes_nothing(
    quirk_proxy: QuirkProxy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "out"
    ref = f"{quirk_proxy.host}/fixtures/mixed:v1"
    assert main(["cp", ref, "d00-directory", "nope.txt", str(dest), "--cache-dir", str(tmp_path / "c")]) in (2, 3)
    assert main(["cp", ref, "nope.txt", str(dest), "--cache-dir", str(tmp_path / "c")]) == 3
    assert "'nope.txt': no such file" in capsys.readouterr().err
    assert not dest.exists()
    assert [r for r in _data_gets(quirk_proxy.state.seen) if r != "bytes=0-0"] == []  # only the open's probe


def test_a_directorys_first_half_buffer_is_one_request_started_before_any_piece(
    quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    """The plan starts fetching a directory's data (half --buffer, one request) while it validates
    the entries; the pieces, which start at one chunk, join that request instead of their own."""
    ref = f"{quirk_proxy.host}/fixtures/mixed:v1"
    args = ["--cache-dir", str(tmp_path / "c"), "--buffer", "2M", "--chunk-size", "64K"]
    assert main(["cp", ref, ".", str(tmp_path / "out"), *args]) == 0
    gets = [r for r in _data_gets(quirk_proxy.state.seen) if r != "bytes=0-0"]
    assert gets[0] == f"bytes=0-{(1 << 20) - 1}", gets
    assert not [r for r in gets[1:] if int(r.split("=")[1].split("-")[0]) < 1 << 20]  # nothing in it again
    assert _files_under(tmp_path / "out") == {p: f.data for p, f in tree_files("mixed").items()}


def test_a_hostile_entry_found_while_the_data_is_fetched_is_exit_4_and_dest_is_never_created(
    registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory whose first and last entries are sound: the plan starts fetching its data
    (on_span), then meets the '..' entry between them. One line, exit 4, DEST never created."""
    import functools

    import trio

    from blobmount.reference import Reference
    from blobmount.registry.client import RegistryOptions
    from blobmount.registry.push import push_archive
    from tests.support.corpus import Spec, write_archive

    arc = tmp_path / "arc"
    specs = [Spec(b"a/a.txt", b"a" * 5000), Spec(b"a/b/../../escape", b"out"), Spec(b"a/c.txt", b"c" * 5000)]
    write_archive(arc, specs)
    view = IndexView((arc / "index.blob").read_bytes())
    assert view.data_span(b"a") is not None  # so on_span fires before the bad entry is met
    ref = Reference.parse(f"{registry.host}/cp/hostile:v1")
    trio.run(functools.partial(push_archive, arc, ref, RegistryOptions()))
    dest = tmp_path / "out"
    assert main(["cp", str(ref), "a", str(dest), "--cache-dir", str(tmp_path / "c")]) == 4
    err = capsys.readouterr().err
    assert err.startswith("blobmount: entry ")
    assert "'..'" in err
    assert err.count("\n") == 1
    assert not dest.exists()
    assert not (tmp_path / "escape").exists()


def test_a_second_copy_is_served_by_the_cache(quirk_proxy: QuirkProxy, tmp_path: Path) -> None:
    ref = f"{quirk_proxy.host}/fixtures/mixed:v1"
    cache = str(tmp_path / "cache")
    assert main(["cp", ref, ".", str(tmp_path / "one"), "--cache-dir", cache]) == 0
    first = [r for r in _data_gets(quirk_proxy.state.seen) if r != "bytes=0-0"]
    assert first
    mark = len(quirk_proxy.state.seen)
    assert main(["cp", ref, ".", str(tmp_path / "two"), "--cache-dir", cache]) == 0
    assert [r for r in _data_gets(quirk_proxy.state.seen[mark:]) if r != "bytes=0-0"] == []
    assert _files_under(tmp_path / "two") == {p: f.data for p, f in tree_files("mixed").items()}


@pytest.fixture
def faults(registry: Registry, pushed: dict[str, str]) -> Iterator[FaultProxy]:
    p = FaultProxy(registry.host)
    try:
        yield p
    finally:
        p.stop()


def _victim() -> tuple[bytes, int]:
    view = IndexView((FIXTURES / "mixed" / "index.blob").read_bytes())
    entry = max(view.entries(), key=lambda e: e.data_size)  # streamed in pieces
    return entry.path, entry.data_offset + entry.data_size // 2


@pytest.mark.expect_log(
    r"^blobmount\.(extract\.copy|reader): .*(corrupt zstd frame|sha256 mismatch)", r"; retry \d+ in "
)
def test_an_integrity_failure_through_the_proxy_is_exit_5_and_leaves_no_file(
    faults: FaultProxy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, at = _victim()
    fault = faults.add(Fault(Kind.FLIP, blob(DATA_DIGEST, at, at + 1), at=at))
    dest = tmp_path / "out"
    ref = f"{faults.host}/fixtures/mixed:v1"
    args = ["cp", ref, ".", str(dest), "--cache-dir", str(tmp_path / "cache"), "--buffer", "1M"]
    assert main(args) == 5
    err = capsys.readouterr().err
    assert os.fsdecode(path) in err
    assert "failed verification" not in err or "more files" in err
    assert fault.hits >= 2  # read again from the origin before giving up
    assert not os.path.lexists(os.path.join(os.fsencode(dest), path))
    written = _files_under(dest)
    assert not [p for p in written if os.path.basename(p).startswith(b".blobmount-cp.")]
    files = tree_files("mixed")
    assert len(written) == len(files) - 1  # every other file is there, and right
    assert all(files[p].data == d for p, d in written.items())


@pytest.mark.expect_log(r"; retry \d+ in ", r"^blobmount\.(fetch|extract\.copy): ")
def test_a_fault_that_clears_is_read_again_and_the_copy_succeeds(
    faults: FaultProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, at = _victim()
    fault = faults.add(Fault(Kind.FLIP, blob(DATA_DIGEST, at, at + 1), at=at, times=1))
    dest = tmp_path / "out"
    ref = f"{faults.host}/fixtures/mixed:v1"
    assert main(["cp", ref, ".", str(dest), "--cache-dir", str(tmp_path / "cache"), "--buffer", "1M"]) == 0
    assert fault.hits == 1
    assert "reading it again from the origin" in caplog.text
    assert _files_under(dest) == {p: f.data for p, f in tree_files("mixed").items()}


class _CountingProxy(QuirkProxy):
    """Counts the data blob's range requests in flight at once (each held HOLD_S, so that
    requests sent together are seen together)."""

    def __init__(self, upstream: str, **kwargs: Any) -> None:
        self.inflight = 0
        self.peak = 0
        self.count = 0
        self._count_lock = threading.Lock()
        super().__init__(upstream, **kwargs)

    def handle(self, h: Any) -> None:
        counted = h.command == "GET" and f"/blobs/{DATA_DIGEST}" in h.path and h.headers.get("Range") != "bytes=0-0"
        if counted:
            with self._count_lock:
                self.inflight += 1
                self.count += 1
                self.peak = max(self.peak, self.inflight)
        try:
            if counted:
                time.sleep(HOLD_S)
            super().handle(h)
        finally:
            if counted:
                with self._count_lock:
                    self.inflight -= 1


@pytest.mark.parametrize("concurrency", [1, 4])
def test_concurrent_range_reads_overlap(
    concurrency: int, registry: Registry, pushed: dict[str, str], tmp_path: Path
) -> None:
    p = _CountingProxy(registry.host)
    try:
        dest = tmp_path / "out"
        args = ["cp", f"{p.host}/fixtures/mixed:v1", ".", str(dest), "--cache-dir", str(tmp_path / "cache")]
        args += ["--chunk-size", "64K", "--buffer", "1M", "--concurrency", str(concurrency)]
        assert main(args) == 0
    finally:
        p.stop()
    assert p.count >= 4  # 4.7 MB in pieces of 1 MiB (one reader) or 256 KiB (four)
    if concurrency == 1:
        assert p.peak == 1
    else:
        assert p.peak >= 2
        assert p.peak <= concurrency
    assert _files_under(dest) == {p: f.data for p, f in tree_files("mixed").items()}


@pytest.mark.expect_log(r"; retry \d+ in ", r"^blobmount\.(fetch|extract\.copy): ")
def test_a_network_failure_names_a_file_and_leaves_no_temporaries(
    faults: FaultProxy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    size = (FIXTURES / "mixed" / "data.blob").stat().st_size
    fault = faults.add(Fault(Kind.RESET, blob(DATA_DIGEST, 1, size)))  # every read but the open's probe
    dest = tmp_path / "out"
    ref = f"{faults.host}/fixtures/mixed:v1"
    assert main(["cp", ref, ".", str(dest), "--cache-dir", str(tmp_path / "cache"), "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "blobmount: 'd0" in err  # the first file of the read that failed
    assert fault.hits >= 1
    # the reset comes mid-body: files whose bytes landed before it are written, verified; the
    # others are not there at all (no partial file under a final name, no temporary)
    whole = {p: f.data for p, f in tree_files("mixed").items()}
    written = _files_under(dest)
    assert len(written) < len(whole)
    assert all(whole[p] == data for p, data in written.items())


def test_the_buffer_bounds_fetched_bytes_beyond_what_the_readers_hold(
    registry: Registry, pushed: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight readers of 64 KiB pieces could hold 512 KiB; --buffer 256K keeps them to 256 KiB (the
    proxy holds each request, so all eight readers are waiting at once if the budget lets them)."""
    from blobmount.extract import pieces

    peak = 0
    acquire = pieces.Budget.acquire

    async def counting(self: pieces.Budget, n: int) -> None:
        nonlocal peak
        await acquire(self, n)
        peak = max(peak, self.used)

    monkeypatch.setattr(pieces.Budget, "acquire", counting)
    p = _CountingProxy(registry.host)
    try:
        args = ["cp", f"{p.host}/fixtures/mixed:v1", ".", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]
        args += ["--chunk-size", "4K", "--buffer", "256K", "--concurrency", "8", "--max-connections", "8"]
        assert main(args) == 0
    finally:
        p.stop()
    assert p.peak >= 2
    assert 0 < peak <= 256 << 10
    assert _files_under(tmp_path / "out") == {p: f.data for p, f in tree_files("mixed").items()}
