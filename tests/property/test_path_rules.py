"""path_problem's shortcut for the common path (issue 17: one check per entry of a cold walk)
answers exactly as the rules checked one by one."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from blobmount.index.paths import NAME_MAX_BYTES, _path_problem, path_problem

PIECES = [b"a", b"b.c", b".", b"..", b".x", b"/", b"//", b"\x00", b"\xff", b"x" * 200, b"y" * (NAME_MAX_BYTES + 1)]


@settings(max_examples=2000, deadline=None, derandomize=True)
@given(parts=st.lists(st.sampled_from(PIECES), max_size=8))
def test_the_shortcut_agrees_with_every_rule(parts: list[bytes]) -> None:
    path = b"".join(parts)
    assert path_problem(path) == _path_problem(path), path


def test_the_shortcut_takes_ordinary_paths() -> None:
    for path in (b"a", b"drivers/net/ethernet/intel/e1000e/netdev.c", b"a.b/c_d-e", b".git/config"):
        assert path_problem(path) is None
    for path in (b"a/./b", b".", b"a/../b", b"a//b", b"/a", b"a/", b"", b"a\x00b"):
        assert path_problem(path) is not None, path
