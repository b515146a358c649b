"""The shipped units: no directive that would give the service its own mount namespace (the FUSE
mount would vanish from the host), and `systemd-analyze verify` accepts them."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"
# Each of these makes systemd set up a private mount namespace for the service.
NAMESPACE_DIRECTIVES = {
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "PrivateMounts",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ReadOnlyPaths",
    "ReadWritePaths",
    "InaccessiblePaths",
    "TemporaryFileSystem",
    "BindPaths",
    "BindReadOnlyPaths",
    "RootDirectory",
    "RootImage",
    "ProtectProc",
    "ProcSubset",
    "MountAPIVFS",
    "PrivateUsers",
    "PrivateNetwork",
    "NetworkNamespacePath",
}


def parse(path: Path) -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(path.read_text())
    return cp


def test_units_exist_and_use_notify() -> None:
    service = parse(UNITS / "blobmount@.service")
    assert service["Service"]["Type"] == "notify"
    assert "--foreground" in service["Service"]["ExecStart"]
    assert "fusermount3 -u" in service["Service"]["ExecStop"]
    assert service["Service"]["CacheDirectory"] == "blobmount"
    mount = parse(UNITS / "mnt-assets.mount")
    assert mount["Mount"]["Type"] == "fuse.blobmount"


@pytest.mark.parametrize("name", sorted(p.name for p in UNITS.glob("*") if p.suffix in (".service", ".mount")))
def test_no_mount_namespace_directives(name: str) -> None:
    cp = parse(UNITS / name)
    for section in cp.sections():
        bad = NAMESPACE_DIRECTIVES & set(cp[section])
        assert not bad, f"{name} [{section}] sets {sorted(bad)}: the mount would be invisible to the host"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: apt-get install systemd (make test does)"
    blobmount = str(Path(sys.executable).parent / "blobmount")  # the venv's, PATH or not
    assert Path(blobmount).exists()
    units = tmp_path / "units"
    units.mkdir()
    text = (UNITS / "blobmount@.service").read_text().replace("/usr/local/bin/blobmount", blobmount)
    (units / "blobmount@example.service").write_text(text)
    shutil.copy(UNITS / "mnt-assets.mount", units / "mnt-assets.mount")
    out = subprocess.run(
        [analyze, "verify", "--man=no", str(units / "blobmount@example.service"), str(units / "mnt-assets.mount")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    problems = [line for line in out.stderr.splitlines() if "blobmount" in line or "mnt-assets" in line]
    assert out.returncode == 0, out.stderr
    assert not problems, "\n".join(problems)
