"""Install what the suite needs on a fresh Debian machine (as root), or say exactly what is missing.

System tools come from Debian's packages (apt-get), Python ones from PyPI into the running venv (the
``bench`` extra of pyproject.toml). ``--no-install`` (what the CI smoke test uses) only checks: a
missing piece is an error naming the package, never a skipped peer.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from bench import netshape

REPO = Path(__file__).resolve().parent.parent

# what must exist -> the Debian package that provides it
QUICK_TOOLS = {
    "fusermount3": "fuse3",
    "squashfuse": "squashfuse",
    "mksquashfs": "squashfs-tools",
    "httpfs2": "httpfs2",
    "nginx": "nginx-light",
    "/usr/bin/docker-registry": "docker-registry",
    "curl": "curl",
    "git": "git",
    "tar": "tar",
}
FULL_TOOLS = {
    **QUICK_TOOLS,
    "rclone": "rclone",
    **netshape.TOOLS,
    "/usr/src/linux-source-*.tar.xz": "linux-source",
}
NETNS_TOOLS = dict(netshape.TOOLS)  # the shaper's delay line is pure Python: no compiler, no library
QUICK_MODULES = ("matplotlib",)
FULL_MODULES = ("matplotlib", "ratarmount")
APT_TIMEOUT_S = 1800.0


def _present(tool: str) -> bool:
    if tool.startswith("/"):
        return bool(glob.glob(tool))
    return shutil.which(tool) is not None


def _module_present(name: str) -> bool:
    if name == "ratarmount":  # a console script in the venv, not only a module
        return Path(sys.executable).with_name("ratarmount").exists() or shutil.which("ratarmount") is not None
    return importlib.util.find_spec(name) is not None


def bench_extra() -> list[str]:
    """The requirement strings of pyproject's `bench` extra."""
    doc = tomllib.loads((REPO / "pyproject.toml").read_text())
    extra: list[str] = doc["project"]["optional-dependencies"]["bench"]
    return extra


def ensure(tools: dict[str, str], modules: tuple[str, ...], install: bool) -> list[str]:
    """Make sure `tools` and `modules` are there; returns what was installed."""
    missing_pkgs = sorted({pkg for tool, pkg in tools.items() if not _present(tool)})
    missing_mods = [m for m in modules if not _module_present(m)]
    installed: list[str] = []
    if (missing_pkgs or missing_mods) and not install:
        raise SystemExit(
            "missing for the benchmark suite: "
            + ", ".join([*(f"apt package {p}" for p in missing_pkgs), *(f"Python package {m}" for m in missing_mods)])
            + " (run without --no-install as root, or `make bench`)"
        )
    if missing_pkgs:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise SystemExit(f"need apt packages {' '.join(missing_pkgs)}: run as root on Debian")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        print(f"installing apt packages: {' '.join(missing_pkgs)}", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=APT_TIMEOUT_S)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing_pkgs], check=True, env=env, timeout=APT_TIMEOUT_S)
        installed += missing_pkgs
    if missing_mods:
        reqs = [r for r in bench_extra() if any(r.startswith(m) for m in missing_mods)]
        print(f"installing into {sys.prefix}: {' '.join(reqs)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *reqs], check=True, timeout=APT_TIMEOUT_S)
        installed += reqs
    still = [t for t in tools if not _present(t)] + [m for m in modules if not _module_present(m)]
    if still:
        raise SystemExit(f"still missing after installing: {', '.join(still)}")
    return installed
