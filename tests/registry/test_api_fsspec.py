"""The Python API (blobmount.open) and the blob:// fsspec filesystem, against the real registry."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pandas
import pytest
import trio

import blobmount
from blobmount.cli import main
from blobmount.create import create_archive
from blobmount.errors import IntegrityError
from blobmount.filesystem import BlobFileSystem, split_url
from blobmount.reference import Reference
from blobmount.registry.client import RegistryOptions
from blobmount.registry.push import push_archive
from tests.support.faults import Fault, FaultProxy, Kind, blob
from tests.support.servers import Registry

BIG = 3 << 20  # over the threshold the tests set: served lazily by range
THRESHOLD = 256 << 10
CSV = b"name,count\nalpha,1\nbeta,22\ngamma,333\n"


def _tree(root: Path) -> dict[str, bytes]:
    rng = __import__("random").Random(7)
    files = {
        "data/table.csv": CSV,
        "data/notes:v2.txt": b"a colon in the name\n" * 50,  # ':' after the reference is a name
        "data/deep/er/leaf.txt": b"leaf\n",
        "lines.txt": b"".join(b"line %d\n" % i for i in range(2000)),
        "big/raw.bin": rng.randbytes(BIG),
        "top.md": b"# top\n",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


class Pushed:
    def __init__(self, registry: Registry, root: Path) -> None:
        src = root / "src"
        self.files = _tree(src)
        self.archive_dir = root / "archive"
        create_archive(src, self.archive_dir)
        ref = Reference.parse(f"{registry.host}/api/tree:v1")
        self.digest = trio.run(push_archive, self.archive_dir, ref, RegistryOptions())
        self.tag_ref = str(ref)
        self.digest_ref = f"{registry.host}/api/tree@{self.digest}"
        self.oci = root / "layout"
        assert main(["push", "--archive", str(self.archive_dir), f"oci:{self.oci}:v1"]) == 0
        self.data_digest = "sha256:" + hashlib.sha256((self.archive_dir / "data.blob").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pushed_tree(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    return Pushed(registry, tmp_path_factory.mktemp("api-tree"))


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[BlobFileSystem]:
    f = BlobFileSystem(cache_dir=str(tmp_path / "cache"), verify_threshold=THRESHOLD, skip_instance_cache=True)
    try:
        yield f
    finally:
        f.close_archives()


def _roots(p: Pushed) -> dict[str, str]:
    return {
        "tag": p.tag_ref,
        "digest": p.digest_ref,
        "oci": f"oci:{p.oci}:v1",
        "local": str(p.archive_dir),
    }


# -- URL grammar -------------------------------------------------------------------------------------


def test_url_grammar_ends_the_reference_at_its_tag_or_digest() -> None:
    assert split_url("blob://127.0.0.1:5000/team/data:v1/dir/file.csv") == (
        "127.0.0.1:5000/team/data:v1",
        "dir/file.csv",
    )
    assert split_url("127.0.0.1:5000/a/b/c:v1/x:y/z:w") == ("127.0.0.1:5000/a/b/c:v1", "x:y/z:w")
    d = "sha256:" + "ab" * 32
    assert split_url(f"reg.example/team/data@{d}/f") == (f"reg.example/team/data@{d}", "f")
    assert split_url("reg.example/team/data:v1") == ("reg.example/team/data:v1", "")
    assert split_url("oci:/srv/layout:v1/a/b:c") == ("oci:/srv/layout:v1", "a/b:c")
    with pytest.raises(ValueError, match="must end in :TAG"):
        split_url("reg.example/team/data/file.csv")
    with pytest.raises(ValueError, match="oci: layout URL needs"):
        split_url("oci:/srv/layout/file")


def test_a_local_url_finds_the_archive_above_the_path(pushed_tree: Pushed) -> None:
    root = str(pushed_tree.archive_dir)
    assert split_url(f"blob://{root}/data/table.csv") == (root, "data/table.csv")
    assert split_url(f"blob://{root}") == (root, "")
    with pytest.raises(FileNotFoundError):
        split_url("blob:///nonexistent/place/file")


def test_the_protocol_is_registered_by_entry_point() -> None:
    assert fsspec.get_filesystem_class("blob") is BlobFileSystem


# -- fsspec, every URL form ----------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["tag", "digest", "oci", "local"])
def test_every_url_form_reads_every_file(form: str, pushed_tree: Pushed, fs: BlobFileSystem) -> None:
    root = _roots(pushed_tree)[form]
    for rel, data in pushed_tree.files.items():
        assert fs.cat_file(f"blob://{root}/{rel}") == data, rel
        with fs.open(f"{root}/{rel}", "rb") as f:
            assert f.read() == data
    assert sorted(fs.find(root)) == sorted(f"{root}/{rel}" for rel in pushed_tree.files)


def test_ls_detail_info_and_missing_paths(pushed_tree: Pushed, fs: BlobFileSystem) -> None:
    root = pushed_tree.tag_ref
    rows = {r["name"]: r for r in fs.ls(f"{root}/data", detail=True)}
    assert set(rows) == {f"{root}/data/table.csv", f"{root}/data/notes:v2.txt", f"{root}/data/deep"}
    csv = rows[f"{root}/data/table.csv"]
    assert csv["type"] == "file"
    assert csv["size"] == len(CSV)
    assert csv["sha256"] == hashlib.sha256(CSV).hexdigest()
    assert {"name", "size", "type", "mode", "uid", "gid", "mtime", "compression", "stored_size"} <= set(csv)
    assert rows[f"{root}/data/deep"]["type"] == "directory"
    assert fs.info(f"{root}/data")["type"] == "directory"
    assert fs.ls(f"{root}/top.md", detail=False) == [f"{root}/top.md"]
    with pytest.raises(FileNotFoundError):
        fs.info(f"{root}/data/missing.csv")
    with pytest.raises(FileNotFoundError):
        fs.ls(f"{root}/nowhere")
    assert not fs.exists(f"{root}/data/missing.csv")
    assert fs.exists(f"{root}/data/table.csv")
    assert fs.isdir(f"{root}/data")
    assert fs.isfile(f"{root}/top.md")


def test_cat_file_ranges_including_negative(pushed_tree: Pushed, fs: BlobFileSystem) -> None:
    path = f"{pushed_tree.tag_ref}/lines.txt"
    data = pushed_tree.files["lines.txt"]
    for start, end in [(0, 10), (5, None), (-20, None), (-20, -5), (None, 7), (100, 50), (0, 10**9), (-(10**9), 3)]:
        want = data[slice(start, end)]
        assert fs.cat_file(path, start, end) == want, (start, end)


def test_open_seek_read_readline(pushed_tree: Pushed, fs: BlobFileSystem) -> None:
    data = pushed_tree.files["lines.txt"]
    with fs.open(f"{pushed_tree.digest_ref}/lines.txt") as f:
        assert f.readline() == b"line 0\n"
        f.seek(-8, io.SEEK_END)
        assert f.read() == data[-8:]
        f.seek(100)
        assert f.read(50) == data[100:150]
        assert f.tell() == 150
    with fs.open(f"{pushed_tree.tag_ref}/lines.txt", "r") as text:  # fsspec's text mode over ours
        assert text.readline() == "line 0\n"
    with pytest.raises(OSError, match="read-only"):
        fs.open(f"{pushed_tree.tag_ref}/new.txt", "wb")


def test_find_glob_walk_du(pushed_tree: Pushed, fs: BlobFileSystem) -> None:
    root = pushed_tree.tag_ref
    assert fs.glob(f"{root}/data/*.csv") == [f"{root}/data/table.csv"]
    assert sorted(fs.glob(f"{root}/**/*.txt")) == sorted(f"{root}/{r}" for r in pushed_tree.files if r.endswith(".txt"))
    walked = {d: (sorted(ds), sorted(fs_)) for d, ds, fs_ in fs.walk(root)}
    assert walked[root] == (["big", "data"], ["lines.txt", "top.md"])
    assert walked[f"{root}/data/deep/er"] == ([], ["leaf.txt"])
    assert fs.du(root) == sum(len(d) for d in pushed_tree.files.values())
    assert fs.du(f"{root}/data", total=False)[f"{root}/data/table.csv"] == len(CSV)


def test_get_to_a_local_directory(pushed_tree: Pushed, fs: BlobFileSystem, tmp_path: Path) -> None:
    out = tmp_path / "out"
    fs.get(f"{pushed_tree.tag_ref}/data", str(out), recursive=True)
    got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert got == {rel.removeprefix("data/"): d for rel, d in pushed_tree.files.items() if rel.startswith("data/")}


def test_pandas_reads_a_blob_url(pushed_tree: Pushed, tmp_path: Path) -> None:
    frame = pandas.read_csv(
        f"blob://{pushed_tree.tag_ref}/data/table.csv",
        storage_options={"cache_dir": str(tmp_path / "cache")},
    )
    assert list(frame["name"]) == ["alpha", "beta", "gamma"]
    assert list(frame["count"]) == [1, 22, 333]


def test_the_filesystem_pickles(pushed_tree: Pushed, tmp_path: Path) -> None:
    fs = BlobFileSystem(cache_dir=str(tmp_path / "cache"), verify="strict", skip_instance_cache=True)
    try:
        assert fs.cat_file(f"{pushed_tree.tag_ref}/top.md") == b"# top\n"
        clone = pickle.loads(pickle.dumps(fs))
        try:
            assert clone is not fs or clone._open_kwargs == fs._open_kwargs
            assert clone._open_kwargs["verify"] == "strict"
            assert clone.cat_file(f"{pushed_tree.tag_ref}/top.md") == b"# top\n"
        finally:
            clone.close_archives()
    finally:
        fs.close_archives()


def test_the_cache_directory_is_the_mounts(pushed_tree: Pushed, registry: Registry, tmp_path: Path) -> None:
    """A second filesystem over the same cache directory reads the big file without the network."""
    cache = str(tmp_path / "cache")
    first = BlobFileSystem(cache_dir=cache, skip_instance_cache=True)
    try:
        assert first.cat_file(f"{pushed_tree.digest_ref}/big/raw.bin") == pushed_tree.files["big/raw.bin"]
    finally:
        first.close_archives()
    proxy = FaultProxy(registry.host)
    try:
        ref = pushed_tree.digest_ref.replace(registry.host, proxy.host)
        second = BlobFileSystem(cache_dir=cache, skip_instance_cache=True)
        try:
            assert second.info(f"{ref}/big/raw.bin")["size"] == BIG  # opened (its range probe is a data GET)
            with proxy.fault(Fault(Kind.STATUS, match=blob(pushed_tree.data_digest), status=500)) as refusing:
                assert second.cat_file(f"{ref}/big/raw.bin") == pushed_tree.files["big/raw.bin"]
            assert refusing.hits == 0  # every chunk came from the shared cache
        finally:
            second.close_archives()
    finally:
        proxy.stop()


# -- integrity ----------------------------------------------------------------------------------------


@pytest.fixture
def flipping(registry: Registry, pushed_tree: Pushed) -> Iterator[tuple[FaultProxy, str]]:
    proxy = FaultProxy(registry.host)
    try:
        yield proxy, pushed_tree.digest_ref.replace(registry.host, proxy.host)
    finally:
        proxy.stop()


def _big_offset(p: Pushed) -> int:
    with blobmount.open(p.archive_dir) as a:
        return int(a._entry("big/raw.bin").data_offset) + BIG // 2


@pytest.mark.parametrize("verify", ["lazy", "strict"])
@pytest.mark.expect_log(r"^blobmount\.reader: .*(corrupt zstd frame|sha256 mismatch)", r"; retry \d+ in ")
def test_an_integrity_failure_raises_and_never_returns_wrong_bytes(
    verify: str, pushed_tree: Pushed, flipping: tuple[FaultProxy, str], tmp_path: Path
) -> None:
    proxy, ref = flipping
    proxy.add(Fault(Kind.FLIP, match=blob(pushed_tree.data_digest), at=_big_offset(pushed_tree)))
    fs = BlobFileSystem(
        cache_dir=str(tmp_path / "cache"), verify=verify, verify_threshold=THRESHOLD, skip_instance_cache=True
    )
    try:
        with pytest.raises(IntegrityError):
            fs.cat_file(f"{ref}/big/raw.bin")  # whole file: verified before it is returned
        with pytest.raises(IntegrityError), fs.open(f"{ref}/big/raw.bin") as f:
            while f.read(1 << 20):  # reading to the end: the read that completes it raises
                pass
        assert fs.cat_file(f"{ref}/top.md") == b"# top\n"  # the rest of the archive still serves
    finally:
        fs.close_archives()


# -- the Python API: sync, trio, asyncio ----------------------------------------------------------------


def test_api_sync(pushed_tree: Pushed, tmp_path: Path) -> None:
    with blobmount.open(pushed_tree.tag_ref, cache_dir=tmp_path / "cache") as a:
        assert [s.path for s in a.ls("data")] == ["data/deep", "data/notes:v2.txt", "data/table.csv"]
        st = a.stat("data/table.csv")
        assert (st.type, st.size, st.sha256) == ("file", len(CSV), hashlib.sha256(CSV).hexdigest())
        assert a.stat("data").is_dir
        assert a.read_bytes("big/raw.bin") == pushed_tree.files["big/raw.bin"]
        assert a.verified("big/raw.bin") == "verified"
        assert a.read_range("lines.txt", 7, 14) == pushed_tree.files["lines.txt"][7:14]
        assert sorted(s.path for s in a.entries("data")) == sorted(
            r for r in pushed_tree.files if r.startswith("data/")
        )
        assert next(d for d, _, _ in a.walk()) == ""
        with pytest.raises(FileNotFoundError):
            a.stat("nope")
        with pytest.raises(IsADirectoryError):
            a.read_bytes("data")
        with pytest.raises(NotADirectoryError):
            a.walk("top.md")
        with a.open("lines.txt") as f:
            assert f.readline() == b"line 0\n"


def test_api_from_trio(pushed_tree: Pushed, tmp_path: Path) -> None:
    async def main() -> list[bytes]:
        archive = await blobmount.aopen(pushed_tree.tag_ref, cache_dir=tmp_path / "cache")
        try:
            got: list[bytes] = []
            async with trio.open_nursery() as nursery:  # several reads at once, the loop never blocked
                for rel in pushed_tree.files:

                    async def one(rel: str = rel) -> None:
                        got.append(await archive.aread_bytes(rel))

                    nursery.start_soon(one)
            return got
        finally:
            await archive.aclose()

    assert sorted(trio.run(main)) == sorted(pushed_tree.files.values())


def test_api_from_asyncio(pushed_tree: Pushed, tmp_path: Path) -> None:
    async def main() -> list[bytes]:
        archive = await blobmount.aopen(pushed_tree.oci.as_posix() and f"oci:{pushed_tree.oci}:v1")
        try:
            return list(await asyncio.gather(*(archive.aread_bytes(rel) for rel in pushed_tree.files)))
        finally:
            await archive.aclose()

    assert asyncio.run(main()) == list(pushed_tree.files.values())


def test_api_rejects_a_bad_policy(pushed_tree: Pushed) -> None:
    with pytest.raises(blobmount.errors.UsageError, match="verify="):
        blobmount.open(pushed_tree.archive_dir, verify="bogus")  # type: ignore[arg-type]


def test_api_path_objects_are_local(pushed_tree: Pushed, tmp_path: Path) -> None:
    copy = tmp_path / "relative-looking"
    shutil.copytree(pushed_tree.archive_dir, copy)
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        with blobmount.open(Path("relative-looking")) as a:  # a Path is never a registry name
            assert a.read_bytes("top.md") == b"# top\n"
    finally:
        os.chdir(here)


# -- the README's Python blocks are true -------------------------------------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"
SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample"


def test_the_readme_python_blocks_run(registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every ```python block of the README, with the example registry and /tmp/ replaced as the
    README test does for its sh blocks, runs against the real registry (sample pushed first)."""
    import re

    assert main(["push", str(SAMPLE), f"{registry.host}/demo/sample:v1"]) == 0
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    assert len(blocks) >= 2
    for block in blocks:
        code = block.replace("localhost:5000", registry.host).replace("/tmp/", f"{tmp_path}/")
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "docs/lorem.txt" in out
    assert f"{registry.host}/demo/sample:v1/docs/table.csv" in out
    assert "['Lisbon', 'Oslo', 'Turin']" in out
