"""The one progress line (blobmount/progress.py) that create, push, cp and prefetch draw."""

from __future__ import annotations

import threading

import pytest

from blobmount.progress import ProgressLine


def test_disabled_draws_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    line = ProgressLine("create", 100, enabled=False)
    line.advance(50)
    line.reach(100)
    line.close()
    assert capsys.readouterr().err == ""


def test_the_line_names_the_work_and_ends_once(capsys: pytest.CaptureFixture[str]) -> None:
    line = ProgressLine("cp", 4 << 20, enabled=True, files=2)
    line.advance(2 << 20, files=1)
    line.advance(2 << 20, files=1)  # the last file: drawn whatever the interval
    line.close()
    err = capsys.readouterr().err
    assert err.startswith("\rcp [")
    assert err.rstrip("\n").rsplit("\r", 1)[-1].startswith("cp [#########################] 100% 2/2 files 4 MiB ")
    assert err.endswith(" MB/s\n")
    assert err.count("\n") == 1


def test_it_never_moves_backwards(capsys: pytest.CaptureFixture[str]) -> None:
    line = ProgressLine("push data", 100 << 20, enabled=True)
    line.reach(60 << 20)
    line.reach(10 << 20)  # a restarted chunk re-sends bytes already counted
    assert line.done == 60 << 20
    assert " 60% 60 MiB" in line.line(line.started + 1)


def test_workers_may_advance_it_at_once() -> None:
    line = ProgressLine("create", 8 * 1000, enabled=True)

    def work() -> None:
        for _ in range(1000):
            line.advance(1)

    workers = [threading.Thread(target=work) for _ in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert line.done == 8000
