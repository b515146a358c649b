"""Programs people point at a mount, run against archives pushed to the test registry with the CLI's
own `push`: git on a repository with history, sqlite3 on a ~100 MB database (and what one indexed
query costs on the network, raw and zstd), an ELF program and its shared library, unzip and tar on
archives inside the archive, rsync of the whole mount, and the directory times those programs see.

Every program runs under a subprocess timeout (a hang fails the test, it never blocks the run);
none is skipped."""

from __future__ import annotations

import hashlib
import io
import os
import random
import sqlite3
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.support.mounts import blobmount_cmd, mounted
from tests.support.servers import QuirkProxy, Registry

pytestmark = pytest.mark.fuse

RUN_TIMEOUT_S = 120.0  # hang guard per program; each takes well under a second to a few seconds
CREATED = "2025-05-06T07:08:09Z"  # the archives' creation time: no file in the trees has it
CREATED_NS = int(datetime(2025, 5, 6, 7, 8, 9, tzinfo=UTC).timestamp()) * 1_000_000_000
FILE_TIME_NS = 1_700_000_000_123_456_789  # mtimes given to the trees' files (git's own are newer)
MIB = 1 << 20
DB_ROWS = 25_000
DB_VALUE_BYTES = 4000  # ~100 MB of random values: one overflow page per row
DB_QUERIES = 20
GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_AUTHOR_NAME": "Test Author",
    "GIT_AUTHOR_EMAIL": "author@example.invalid",
    "GIT_COMMITTER_NAME": "Test Committer",
    "GIT_COMMITTER_EMAIL": "committer@example.invalid",
}
OBJECT_COUNTS = ("count", "in-pack", "packs")  # count-objects lines that do not depend on st_blocks
GIT_FLAGS = ("-c", "safe.directory=*", "-c", "gc.auto=0", "-c", "maintenance.auto=false")


def run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a program with a hang guard; a non-zero exit fails with its output."""
    full_env = {**os.environ, **GIT_ENV, **(env or {})}
    try:
        done = subprocess.run(
            cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{cmd[0]} hung for {RUN_TIMEOUT_S:.0f} s: {' '.join(map(str, cmd))}")
    if done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def git(repo: Path, *args: str) -> str:
    return run(["git", *GIT_FLAGS, "-C", str(repo), *args])


# -- the source trees ---------------------------------------------------------------------------


def _build_git_repo(repo: Path) -> None:
    """A repository with history: commits packed by `git gc`, then more as loose objects and a tag."""
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    rng = random.Random(7)
    for n in range(4):
        (repo / "src").mkdir(exist_ok=True)
        (repo / "src" / f"mod{n}.py").write_text(f"def f{n}():\n    return {n}\n" * (n + 1))
        (repo / "README.md").write_text(f"# project\n\nrevision {n}\n")
        (repo / "data.bin").write_bytes(rng.randbytes(20_000 + n))
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", f"commit {n}", "--date", f"2024-03-0{n + 1}T10:00:00Z")
    git(repo, "gc", "-q")
    (repo / "src" / "late.py").write_text("LATE = True\n")
    (repo / "README.md").write_text("# project\n\nafter gc\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "after gc: loose objects", "--date", "2024-03-09T10:00:00Z")
    git(repo, "tag", "v1")
    assert list((repo / ".git" / "objects" / "pack").glob("*.pack")), "git gc wrote no packfile"
    loose = [p for p in (repo / ".git" / "objects").iterdir() if len(p.name) == 2]
    assert loose, "no loose objects after the last commit"
    # The format stores files only: git's empty directories (branches/, refs/tags before a tag,
    # objects/info ...) would not survive. Git does without them; drop them from the source.
    for dirpath, _dirnames, _files in sorted(os.walk(repo), key=lambda t: -len(t[0])):
        if not os.listdir(dirpath):
            os.rmdir(dirpath)
    git(repo, "fsck", "--full")  # the source itself is sound without them


def _build_elf(src: Path) -> None:
    c = src / "c"
    c.mkdir()
    (c / "greet.c").write_text('const char *greeting(void) { return "hello from a library in the mount"; }\n')
    (c / "main.c").write_text(
        '#include <stdio.h>\nconst char *greeting(void);\nint main(void) { printf("%s\\n", greeting()); return 0; }\n'
    )
    (src / "lib").mkdir()
    (src / "bin").mkdir()
    run(["gcc", "-shared", "-fPIC", "-o", str(src / "lib" / "libgreet.so"), str(c / "greet.c")])
    run(["gcc", "-o", str(src / "bin" / "greet"), str(c / "main.c"), "-L", str(src / "lib"), "-lgreet"])


def _build_archives(src: Path) -> dict[str, bytes]:
    """A zip (python zipfile) and a tar (tarfile) with the same members; returns the members."""
    rng = random.Random(9)
    members = {
        "notes.txt": b"archived text\n" * 200,
        "nested/random.bin": rng.randbytes(50_000),
        "nested/deeper/small.txt": b"small\n",
    }
    arch = src / "arch"
    arch.mkdir()
    with zipfile.ZipFile(arch / "bundle.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with tarfile.open(arch / "bundle.tar", "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return members


def _vary_owners_and_modes(src: Path) -> None:
    """Owners, modes and mtimes rsync -a must carry over (the tests run as root)."""
    (src / "misc").mkdir()
    for name, mode, owner in (
        ("private.txt", 0o600, (1234, 5678)),
        ("readonly.txt", 0o444, (0, 0)),
        ("script.sh", 0o755, (4321, 8765)),
        ("group.txt", 0o640, (0, 5678)),
    ):
        path = src / "misc" / name
        path.write_text(f"{name}\n")
        os.chown(path, *owner)
        path.chmod(mode)
    for dirpath, _dirs, files in os.walk(src / "misc"):
        for f in files:
            os.utime(Path(dirpath, f), ns=(FILE_TIME_NS, FILE_TIME_NS))


def build_database(path: Path) -> list[tuple[str, int, bytes]]:
    """~100 MB: a table of random values with an index on `key`; returns DB_QUERIES keys to look up
    with their expected (id, value) rows."""
    rng = random.Random(11)
    keys = [f"{rng.getrandbits(64):016x}" for _ in range(DB_ROWS)]
    con = sqlite3.connect(path)
    try:
        con.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
            "CREATE TABLE t (id INTEGER PRIMARY KEY, key TEXT NOT NULL, value BLOB NOT NULL);"
        )
        con.executemany(
            "INSERT INTO t (id, key, value) VALUES (?, ?, ?)",
            ((i, keys[i], rng.randbytes(DB_VALUE_BYTES)) for i in range(DB_ROWS)),
        )
        con.execute("CREATE INDEX t_key ON t (key)")
        con.commit()
        picks = rng.sample(range(DB_ROWS), DB_QUERIES)
        rows = []
        for i in picks:
            (rid, value) = con.execute("SELECT id, value FROM t WHERE key = ?", (keys[i],)).fetchone()
            rows.append((keys[i], rid, value))
    finally:
        con.close()
    return rows


@dataclass(frozen=True)
class Pushed:
    src: Path  # the source tree
    ref: str  # repository:tag on the session registry (without the host)
    head: str  # the git repository's HEAD in the source
    members: dict[str, bytes]  # what the zip and the tar hold


@dataclass(frozen=True)
class PushedDb:
    db: Path  # the source database
    rows: list[tuple[str, int, bytes]]  # (key, id, value) to look up
    raw: str  # db pushed with --compression none
    zstd: str  # db pushed with zstd
    stored_zstd: int  # bytes of the zstd copy in its data blob


def push(src: Path, registry: Registry, repo: str, *args: str) -> str:
    ref = f"{repo}:v1"
    run([*blobmount_cmd("push", str(src), f"{registry.host}/{ref}", "--created", CREATED, *args)])
    return ref


@pytest.fixture(scope="session")
def real_tree(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    """The tree of programs, pushed once for the session (default compression: zstd with the skip
    rule, so raw and zstd files are both exercised)."""
    src = tmp_path_factory.mktemp("real-src") / "tree"
    src.mkdir()
    _build_git_repo(src / "repo")
    _build_elf(src)
    members = _build_archives(src)
    _vary_owners_and_modes(src)
    head = git(src / "repo", "rev-parse", "HEAD").strip()
    return Pushed(src, push(src, registry, "real/tree"), head, members)


@pytest.fixture(scope="session")
def real_db(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> PushedDb:
    """The database alone, pushed raw and with zstd."""
    src = tmp_path_factory.mktemp("real-db") / "tree"
    (src / "db").mkdir(parents=True)
    db = src / "db" / "data.sqlite"
    rows = build_database(db)
    raw = push(src, registry, "real/db-raw", "--compression", "none")
    zstd = push(src, registry, "real/db-zstd")
    from blobmount.index import COMPRESSION_ZSTD, IndexView
    from blobmount.sources import open_archive

    archive = open_archive(f"{registry.host}/{zstd}")
    try:
        view = IndexView(archive.index_bytes, blob_size=archive.data.size)
        entry = view.entry(view.resolve(b"db/data.sqlite"))
        assert entry.compression == COMPRESSION_ZSTD
        stored = entry.data_size
    finally:
        archive.data.close()
    return PushedDb(db, rows, raw, zstd, stored)


@pytest.fixture(scope="module")
def tree_mount(real_tree: Pushed, registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One mount of the tree for the module's read-only programs."""
    base = tmp_path_factory.mktemp("real-mnt")
    with mounted(f"{registry.host}/{real_tree.ref}", base / "mnt", "--timeout", "20") as m:
        yield m.path


# -- git ------------------------------------------------------------------------------------------


def test_git_reads_a_repository_with_history_from_the_mount(real_tree: Pushed, tree_mount: Path) -> None:
    src, mnt = real_tree.src / "repo", tree_mount / "repo"
    assert git(mnt, "rev-parse", "HEAD").strip() == real_tree.head
    assert git(mnt, "rev-parse", "v1^{commit}").strip() == real_tree.head
    fsck = subprocess.run(
        ["git", *GIT_FLAGS, "-C", str(mnt), "fsck", "--full", "--strict"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env={**os.environ, **GIT_ENV},
        check=False,
    )
    assert fsck.returncode == 0, fsck.stderr
    assert "error" not in fsck.stderr.lower(), fsck.stderr
    assert git(mnt, "log", "--stat") == git(src, "log", "--stat")
    counts = [x for x in git(mnt, "count-objects", "-v").splitlines() if x.split(":")[0] in OBJECT_COUNTS]
    assert counts == [x for x in git(src, "count-objects", "-v").splitlines() if x.split(":")[0] in OBJECT_COUNTS]
    assert len(counts) == len(OBJECT_COUNTS)
    assert "count: 0" not in counts  # loose objects ...
    assert "packs: 0" not in counts  # ... and packs
    assert git(mnt, "--no-optional-locks", "status", "--porcelain") == ""
    assert "nothing to commit, working tree clean" in git(mnt, "--no-optional-locks", "status")
    assert git(mnt, "show", "HEAD~3:README.md") == git(src, "show", "HEAD~3:README.md") == "# project\n\nrevision 1\n"


# -- sqlite3 --------------------------------------------------------------------------------------

QUERY_SCRIPT = """
import sqlite3, sys
con = sqlite3.connect("file:" + sys.argv[1] + "?immutable=1", uri=True)
row = con.execute("SELECT id, length(value), hex(substr(value, 1, 16)) FROM t WHERE key = ?", (sys.argv[2],)).fetchone()
plan = con.execute("EXPLAIN QUERY PLAN SELECT id FROM t WHERE key = ?", (sys.argv[2],)).fetchall()
print(row[0], row[1], row[2], "t_key" in str(plan))
"""


def _ranges(proxy: QuirkProxy) -> list[tuple[int, int]]:
    out = []
    for method, _path, headers in list(proxy.state.seen):
        value = headers.get("range")
        if method == "GET" and value:
            first, last = (int(x) for x in value.removeprefix("bytes=").split("-"))
            out.append((first, last + 1))
    return out


def _count_one_query(db: PushedDb, proxy: QuirkProxy, path: Path) -> tuple[int, int]:
    """Run one indexed query in a fresh process against the mounted `path` and return (bytes asked
    for in range requests, body bytes the proxy sent) for that query alone."""
    key, rid, value = db.rows[0]
    time.sleep(0.2)  # let anything the mount started settle before counting
    with proxy.state.lock:
        proxy.state.seen.clear()
        proxy.state.body_bytes_sent = 0
    out = run([sys.executable, "-c", QUERY_SCRIPT, str(path), key]).split()
    assert out == [str(rid), str(len(value)), value[:16].hex().upper(), "True"]  # True: through t_key
    time.sleep(0.3)  # read-ahead in flight is counted too
    asked = sum(b - a for a, b in _ranges(proxy))
    with proxy.state.lock:
        return asked, proxy.state.body_bytes_sent


@pytest.mark.parametrize("stored", ["raw", "zstd"])
def test_sqlite_reads_an_immutable_database_from_the_mount(
    stored: str, real_db: PushedDb, quirk_proxy: QuirkProxy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One indexed query on a fresh mount, counted at a proxy: raw, the chunks under the b-tree
    pages it visits; zstd, the whole stored file (README: a zstd file is decoded whole for random
    access). Then integrity_check and every lookup against the original, in the same mount."""
    ref = real_db.raw if stored == "raw" else real_db.zstd
    size = real_db.db.stat().st_size
    with mounted(f"{quirk_proxy.host}/{ref}", tmp_path / "mnt", "--timeout", "20") as m:
        path = m.path / "db" / "data.sqlite"
        assert path.stat().st_size == size
        asked, sent = _count_one_query(real_db, quirk_proxy, path)
        with capsys.disabled():
            print(
                f"\none indexed query, {size / MIB:.1f} MiB sqlite database pushed {stored}, empty cache:"
                f" {asked} bytes in range requests, {sent} body bytes sent"
                + (f" (the zstd file stores {real_db.stored_zstd})" if stored == "zstd" else "")
            )
        if stored == "raw":
            assert 0 < asked <= 16 * MIB  # a few 1 MiB chunks: the b-tree pages on the way
        else:
            assert asked >= real_db.stored_zstd  # the whole stored file, decoded for random access
        check = run(["sqlite3", "-readonly", f"file:{path}?immutable=1", "PRAGMA integrity_check;"])
        assert check.strip() == "ok"
        con = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
        try:
            for key, rid, value in real_db.rows:
                assert con.execute("SELECT id, value FROM t WHERE key = ?", (key,)).fetchall() == [(rid, value)]
            assert con.execute("SELECT count(*) FROM t").fetchone() == (DB_ROWS,)
        finally:
            con.close()


# -- ELF programs, archives inside the archive ----------------------------------------------------


def test_a_program_and_its_shared_library_run_from_the_mount(tree_mount: Path) -> None:
    env = {"LD_LIBRARY_PATH": str(tree_mount / "lib")}
    out = run([str(tree_mount / "bin" / "greet")], env=env)
    assert out == "hello from a library in the mount\n"
    ldd = run(["ldd", str(tree_mount / "bin" / "greet")], env=env)
    line = next(x for x in ldd.splitlines() if "libgreet.so" in x)
    assert str(tree_mount / "lib" / "libgreet.so") in line, ldd  # resolved inside the mount


def test_unzip_and_tar_read_archives_inside_the_mount(real_tree: Pushed, tree_mount: Path) -> None:
    tested = run(["unzip", "-t", str(tree_mount / "arch" / "bundle.zip")])
    assert "No errors detected" in tested, tested
    for name in real_tree.members:
        assert f"testing: {name}" in tested, tested
    listed = run(["tar", "-tf", str(tree_mount / "arch" / "bundle.tar")]).splitlines()
    assert listed == list(real_tree.members)
    got = subprocess.run(
        ["tar", "-xOf", str(tree_mount / "arch" / "bundle.tar"), "nested/random.bin"],
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
        check=True,
    ).stdout
    assert got == real_tree.members["nested/random.bin"]


# -- rsync ----------------------------------------------------------------------------------------


def _tree(root: Path) -> tuple[dict[str, tuple[int, int, int, int, str]], set[str], list[str]]:
    """Regular files (mode bits, uid, gid, mtime_ns, sha256), non-empty directories, and anything
    else (symlinks, empty directories, special files) under `root`."""
    files: dict[str, tuple[int, int, int, int, str]] = {}
    dirs: set[str] = set()
    other: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if not dirnames and not filenames:
            other.append(f"empty directory {rel_dir}")
        elif rel_dir != ".":
            dirs.add(rel_dir)
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                files[rel] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, digest)
            elif not stat.S_ISDIR(st.st_mode):
                other.append(f"{rel}: mode {st.st_mode:o}")
    return files, dirs, other


def test_rsync_copies_the_whole_mount_faithfully(real_tree: Pushed, tree_mount: Path, tmp_path: Path) -> None:
    src_files, src_dirs, src_other = _tree(real_tree.src)
    assert src_other == [], "the source must hold no symlinks or empty directories (not archived)"
    dest = tmp_path / "copy"
    run(["rsync", "-a", "--checksum", f"{tree_mount}/", f"{dest}/"])
    got_files, got_dirs, got_other = _tree(dest)
    assert got_other == []
    assert got_files == src_files  # bytes, permission bits, uid/gid, nanosecond mtime
    assert got_dirs == src_dirs
    assert sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) == sum(
        p.stat().st_size for p in real_tree.src.rglob("*") if p.is_file()
    )
    # directories arrive with the mount's times (a 1970 date was what rsync -t copied before)
    for rel in got_dirs:
        assert (dest / rel).stat().st_mtime_ns == (tree_mount / rel).stat().st_mtime_ns, rel


# -- directory times ------------------------------------------------------------------------------


def _newest_direct_file_ns(src: Path, rel: str) -> int | None:
    times = [p.stat().st_mtime_ns for p in (src / rel).iterdir() if p.is_file()]
    return max(times) if times else None


def test_directories_are_dated_by_their_newest_file_else_the_archive(real_tree: Pushed, tree_mount: Path) -> None:
    _files, dirs, _other = _tree(real_tree.src)
    with_files = only_dirs = 0
    for rel in [".", *sorted(dirs)]:
        st = os.stat(tree_mount / rel)
        newest = _newest_direct_file_ns(real_tree.src, rel)
        want = CREATED_NS if newest is None else newest
        assert (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns) == (want, want, want), rel
        with_files += newest is not None
        only_dirs += newest is None
        info = zipfile.ZipInfo.from_file(tree_mount / rel, arcname=rel)  # raised ValueError before 1980
        assert info.is_dir()
        assert info.date_time == time.localtime(st.st_mtime)[:6]
    assert with_files  # both halves of the rule were seen
    assert only_dirs  # (the root holds only directories)
    assert os.stat(tree_mount / "misc").st_mtime_ns == FILE_TIME_NS


def test_a_local_archive_dates_file_less_directories_by_its_index(tmp_path: Path) -> None:
    """`dir:` sources have no manifest: a directory without files of its own takes index.blob's mtime."""
    arc = tmp_path / "arc"
    nested = tmp_path / "nested"
    (nested / "only").mkdir(parents=True)
    (nested / "only" / "f.txt").write_text("x\n")
    os.utime(nested / "only" / "f.txt", ns=(FILE_TIME_NS, FILE_TIME_NS))
    run([*blobmount_cmd("create", str(nested), str(arc / "nested"))])
    os.utime(arc / "nested" / "index.blob", ns=(CREATED_NS, CREATED_NS))
    with mounted(f"dir:{arc / 'nested'}", tmp_path / "mnt") as m:
        assert os.stat(m.path).st_mtime_ns == CREATED_NS
        assert os.stat(m.path / "only").st_mtime_ns == FILE_TIME_NS
        zipfile.ZipInfo.from_file(m.path, arcname="root")
