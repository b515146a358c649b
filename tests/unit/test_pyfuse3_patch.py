"""The patched pyfuse3 (patches/, built by `make venv`) is what this checkout runs on: without it the
kernel's no-open / no-opendir mode cannot be used (every read would arrive as fh 0, file unknown)
and a warm walk or read-all goes back to a request per file."""

from __future__ import annotations

import inspect

import pyfuse3

from blobmount.fs import BlobFS


def test_pyfuse3_has_pass_inode_patch() -> None:
    assert "pass_inode" in vars(pyfuse3.Operations), (
        "pyfuse3 is not the patched build: run `make venv` (patches/pyfuse3-3.5.0-pass-inode.patch)"
    )
    assert pyfuse3.Operations.pass_inode is False  # opt-in: other file systems see no change


def test_blobfs_opts_in_and_takes_the_inode() -> None:
    assert BlobFS.pass_inode is True
    for name in ("read", "release", "readdir", "releasedir"):
        assert "inode" in inspect.signature(getattr(BlobFS, name)).parameters, name
