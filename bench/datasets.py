"""The data every peer reads: real content nobody here wrote, built once and cached in bench/.cache.

- **tree** (small files): the first 24,000 regular files, in the tarball's order, of Debian's
  ``linux-source`` package (/usr/src/linux-source-*.tar.xz: Documentation/ and most of arch/, ~24k
  files of .c/.h/.rst/.yaml/.dts). ``--quick`` takes 800 files of this Python's standard library
  instead (no 140 MB package in CI). Both get ``py/``: the installed ``hypothesis`` package and what
  it imports (attrs, sortedcontainers) with precompiled bytecode, for the ``import`` workload; and
  the whole tree is a git repository (one commit, objects packed, so .git adds a few files only)
  for the ``git status`` workload.
- **big** (throughput): ``big.bin``, 1 GiB made of the linux-source tarball (an incompressible real
  binary, 131 MiB) repeated end to end; ``par/p0..p7.bin``, 64 MiB each, cut from the same bytes at
  different offsets (so no two files are equal) for the 8 parallel readers; ``small/s00..s63.bin``,
  64 KiB each, for time-to-first-byte and "bytes fetched for one 64 KiB file". ``--quick``: 64 MiB,
  4 MiB and 64 KiB pieces of /usr/bin/docker-registry.

Each dataset exists as plain files (the "plain" peer and nginx's root), a blobmount archive
directory (tree: the default zstd; big: ``--compression none``, as one stores incompressible data),
a squashfs image (tree: ``-comp zstd``; big: uncompressed), and a tar for ratarmount. Everything is
keyed by a recipe digest (this file, the sources' identity, the Python and package versions); the
blobmount archives also by the digest of blobmount's writer code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "bench" / ".cache"
TREE_FILES_FULL = 24_000  # >= 20,000 (the issues' floor), enough that per-mount costs do not dominate
TREE_FILES_QUICK = 800  # + ~700 of py/ and .git: the smoke run stays under 3 minutes
BIG_BYTES = {"full": 1 << 30, "quick": 64 << 20}
PAR_FILES = 8
PAR_BYTES = {"full": 64 << 20, "quick": 4 << 20}
SMALL_FILES = 64
SMALL_BYTES = 64 << 10
PAR_SHIFT_BYTES = 12_345_679  # offsets of the parallel files into the repeated source: no two alike
WRITE_BLOCK_BYTES = 8 << 20
IMPORT_MODULE = "hypothesis"  # imported from the mount by the `import` workload
PROBE_MIN_BYTES, PROBE_MAX_BYTES = 1 << 10, 16 << 10  # the small file time-to-first-byte reads
WRITER_CODE = ("blobmount/create", "blobmount/index", "blobmount/manifest.py", "blobmount/__init__.py")
MKSQUASHFS_COMMON = ("-noappend", "-quiet", "-no-progress")
MKSQUASHFS_NONE = ("-noI", "-noD", "-noF", "-noX")
GIT_ENV = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@localhost",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@localhost",
    "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z",
}


@dataclass
class Dataset:
    """One dataset in all its forms. Paths are absolute; `probe` is relative to the dataset root."""

    name: str
    plain: Path  # the plain directory (also what nginx serves, as /<name>/)
    archive: Path  # blobmount archive directory (index.blob + data.blob)
    squashfs: Path
    tar: Path
    files: int
    bytes: int
    probe: str  # the small file of time-to-first-byte
    source: str  # where the bytes came from, for the report

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def _run(cmd: list[str], **kwargs: Any) -> None:
    done = subprocess.run(cmd, capture_output=True, check=False, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr.decode(errors='replace')}")


def _digest_paths(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for root in paths:
        for p in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def linux_source() -> Path | None:
    found = sorted(Path("/usr/src").glob("linux-source-*.tar.xz"))
    return found[-1] if found else None


def _identity(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _import_closure(module: str) -> list[Path]:
    """The top-level packages and modules under site-packages that importing `module` loads."""
    code = (
        "import importlib, json, sys, sysconfig; importlib.import_module(sys.argv[1]);"
        "site = sysconfig.get_paths()['purelib'];"
        "print(json.dumps(sorted({m.__file__ for m in list(sys.modules.values())"
        " if getattr(m, '__file__', None) and m.__file__.startswith(site)})))"
    )
    done = subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"cannot import {module} to copy it into the tree: {done.stderr.strip()}")
    site = Path(sysconfig.get_paths()["purelib"])
    tops = {site / Path(f).relative_to(site).parts[0] for f in json.loads(done.stdout)}
    return sorted(tops)


def _copy_import_closure(dest: Path) -> None:
    dest.mkdir(parents=True)
    for top in _import_closure(IMPORT_MODULE):
        if top.is_dir():
            shutil.copytree(top, dest / top.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(top, dest / top.name)
    # bytecode next to the sources (mtimes kept by copy2/copytree), so a read-only mount need not compile
    _run([sys.executable, "-m", "compileall", "-q", str(dest)])


def extract_linux(
    tarball: Path, dest: Path, limit: int | None = None, keep: Callable[[str], bool] | None = None
) -> None:
    """The regular files of the tarball that `keep` takes (by their path below linux-source-X.Y/),
    in its order, the first `limit` of them (a streaming read: stops early)."""
    taken = 0
    with tarfile.open(tarball, "r|xz") as tar:
        for member in tar:
            if not member.isreg():
                continue
            parts = Path(member.name).parts[1:]  # drop linux-source-X.Y/
            if not parts or any(p in ("..", "") for p in parts):
                continue
            if keep is not None and not keep("/".join(parts)):
                continue
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            with open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            os.chmod(target, member.mode & 0o755 | 0o644)
            os.utime(target, (member.mtime, member.mtime))
            taken += 1
            if limit is not None and taken >= limit:
                break


def _copy_stdlib(dest: Path, limit: int) -> None:
    stdlib = sysconfig.get_paths()["stdlib"]
    taken = 0
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for name in sorted(filenames):
            src = os.path.join(dirpath, name)
            if not stat.S_ISREG(os.lstat(src).st_mode):
                continue
            target = dest / os.path.relpath(src, stdlib)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
            taken += 1
            if taken >= limit:
                return


def _git_commit(tree: Path) -> None:
    env = dict(os.environ, **GIT_ENV)
    _run(["git", "init", "-q", "-b", "main", str(tree)], env=env)
    _run(["git", "-C", str(tree), "add", "-A"], env=env)
    _run(["git", "-C", str(tree), "commit", "-q", "-m", "bench dataset"], env=env)
    # loose objects into one pack; refs stay loose files: an archive of regular files keeps no empty
    # refs/heads, and git does not take a directory without refs/ for a repository
    _run(["git", "-C", str(tree), "-c", "gc.packRefs=false", "gc", "-q"], env=env)


def _repeat_into(path: Path, src: bytes, start: int, length: int) -> None:
    """`length` bytes of `src` repeated end to end, beginning at offset `start` of the repetition."""
    with open(path, "wb") as f:
        pos = start % len(src)
        left = length
        while left:
            n = min(left, len(src) - pos, WRITE_BLOCK_BYTES)
            f.write(src[pos : pos + n])
            left -= n
            pos = (pos + n) % len(src)


def _tree_stats(root: Path) -> tuple[int, int, str]:
    files = size = 0
    probes: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            st = os.lstat(os.path.join(dirpath, name))
            files += 1
            size += st.st_size
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if PROBE_MIN_BYTES <= st.st_size <= PROBE_MAX_BYTES and "/" in rel and not rel.startswith((".git", "py")):
                probes.append(rel)
    return files, size, probes[len(probes) // 2] if probes else ""


def _build_plain(mode: str, data: Path) -> dict[str, str]:
    tree, big = data / "tree", data / "big"
    if mode == "full":
        tarball = linux_source()
        if tarball is None:
            raise SystemExit("the full datasets need Debian's linux-source package (apt-get install linux-source)")
        extract_linux(tarball, tree / "linux", TREE_FILES_FULL)
        tree_source = f"first {TREE_FILES_FULL:,} regular files of {tarball.name}"
        binary = tarball
    else:
        _copy_stdlib(tree / "stdlib", TREE_FILES_QUICK)
        tree_source = f"first {TREE_FILES_QUICK:,} files of Python {sys.version.split()[0]}'s stdlib"
        binary = Path("/usr/bin/docker-registry")
    _copy_import_closure(tree / "py")
    _git_commit(tree)
    src = binary.read_bytes()
    big.mkdir()
    _repeat_into(big / "big.bin", src, 0, BIG_BYTES[mode])
    (big / "par").mkdir()
    for i in range(PAR_FILES):
        _repeat_into(big / "par" / f"p{i}.bin", src, (i + 1) * PAR_SHIFT_BYTES, PAR_BYTES[mode])
    (big / "small").mkdir()
    for i in range(SMALL_FILES):
        _repeat_into(big / "small" / f"s{i:02d}.bin", src, i * 7 * SMALL_BYTES + 4096, SMALL_BYTES)
    return {
        "tree": f"{tree_source} + py/ ({IMPORT_MODULE} and its imports from this venv) + .git",
        "big": f"{binary} ({len(src):,} bytes) repeated: big.bin {BIG_BYTES[mode] >> 20} MiB,"
        f" {PAR_FILES} x {PAR_BYTES[mode] >> 20} MiB par/, {SMALL_FILES} x 64 KiB small/",
    }


def recipe(mode: str) -> dict[str, str]:
    """What the plain datasets depend on; a change rebuilds everything."""
    binary = linux_source() if mode == "full" else Path("/usr/bin/docker-registry")
    version = subprocess.run(
        [sys.executable, "-c", f"import {IMPORT_MODULE}; print({IMPORT_MODULE}.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "generator": _digest_paths([Path(__file__)]),
        "binary": _identity(binary) if binary is not None and binary.exists() else "missing",
        "python": sys.version.split()[0],
        IMPORT_MODULE: version,
    }


def ensure(mode: str, with_tar: bool, log: Any = print) -> tuple[dict[str, Dataset], dict[str, Any]]:
    """The datasets of `mode` ("full" or "quick"), built if the cache does not hold them."""
    data = CACHE / f"data-{mode}"
    stamp_path = CACHE / f"data-{mode}.json"
    want = recipe(mode)
    stamp: dict[str, Any] = {}
    if stamp_path.exists():
        stamp = json.loads(stamp_path.read_text())
    timings: dict[str, float] = {}
    if stamp.get("recipe") != want or not (data / "tree").is_dir():
        log(f"building the {mode} datasets in {data} (cached afterwards)")
        if data.exists():
            shutil.rmtree(data)
        (data).mkdir(parents=True)
        t = time.monotonic()
        sources = _build_plain(mode, data)
        timings["plain_s"] = time.monotonic() - t
        stamp = {"recipe": want, "sources": sources}
        stamp_path.write_text(json.dumps(stamp, indent=2))
    arcs = CACHE / f"archives-{mode}"
    arcs.mkdir(exist_ok=True)
    writer = _digest_paths([REPO / p for p in WRITER_CODE])
    bm = [sys.executable, "-m", "blobmount.cli", "create", "--no-progress"]
    datasets: dict[str, Dataset] = {}
    for name, create_opts, sqfs_opts in (
        ("tree", [], ("-comp", "zstd")),
        ("big", ["--compression", "none"], MKSQUASHFS_NONE),
    ):
        plain = data / name
        key = f"{stamp['recipe']['generator']}-{stamp['recipe']['binary']}"
        arc = arcs / f"{name}-arc"
        arc_key = arcs / f"{name}-arc.key"
        if not arc_key.exists() or arc_key.read_text() != key + writer:
            shutil.rmtree(arc, ignore_errors=True)
            t = time.monotonic()
            _run([*bm, *create_opts, str(plain), str(arc)])
            timings[f"{name}_blobmount_create_s"] = time.monotonic() - t
            arc_key.write_text(key + writer)
        sqfs = arcs / f"{name}.sqfs"
        sqfs_key = arcs / f"{name}.sqfs.key"
        if not sqfs_key.exists() or sqfs_key.read_text() != key:
            t = time.monotonic()
            _run(["mksquashfs", str(plain), str(sqfs), *MKSQUASHFS_COMMON, *sqfs_opts])
            timings[f"{name}_mksquashfs_s"] = time.monotonic() - t
            sqfs_key.write_text(key)
        tar = arcs / f"{name}.tar"
        tar_key = arcs / f"{name}.tar.key"
        if with_tar and (not tar_key.exists() or tar_key.read_text() != key):
            for stale in arcs.glob(f"{name}.tar*"):
                stale.unlink()
            t = time.monotonic()
            _run(["tar", "-C", str(plain), "-cf", str(tar), "."])
            timings[f"{name}_tar_s"] = time.monotonic() - t
            tar_key.write_text(key)
        files, size, probe = _tree_stats(plain)
        if name == "big":
            probe = "small/s07.bin"
        datasets[name] = Dataset(name, plain, arc, sqfs, tar, files, size, probe, stamp["sources"][name])
    return datasets, {"built_s": timings, "cache": str(CACHE)}
