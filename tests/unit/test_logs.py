"""logs.py: one line per event in every format, `<N>` priority prefixes only when $JOURNAL_STREAM
names our stderr (checked in-process and through a real CLI process), --log-level/-v thresholds."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobmount.daemon import logs
from tests.support.helpers import FIXTURES


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """setup() replaces only its own handler; restore the root logger's level and handlers after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def _emit(log: logging.Logger) -> None:
    log.debug("hidden at info")
    log.info("mounted at %s", "/mnt/x")
    log.warning("two\nlines in one message")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("unexpected error in read; answered EIO")


@pytest.mark.expect_log(r"^blobmount\.test: ")
def test_json_is_one_object_per_event(root_logger: logging.Logger) -> None:
    out = io.StringIO()
    logs.setup("info", "json", stream=out, force=True)
    _emit(logging.getLogger("blobmount.test"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    docs = [json.loads(line) for line in lines]
    assert [d["level"] for d in docs] == ["info", "warning", "error"]
    assert docs[0]["msg"] == "mounted at /mnt/x"
    assert docs[0]["logger"] == "blobmount.test"
    assert docs[1]["msg"] == "two\nlines in one message"
    assert "ValueError: boom" in docs[2]["exc"]
    assert docs[0]["ts"].endswith("Z")


@pytest.mark.expect_log(r"^blobmount\.test: ")
def test_journal_prefixes_only_when_journal_stream_names_the_stream(
    tmp_path: Path, root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "stderr"
    with open(path, "w") as out:
        st = os.fstat(out.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logs.stream_is_journal(out)
        logs.setup("debug", "text", stream=out, force=True)
        _emit(logging.getLogger("blobmount.test"))
    lines = path.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>"]
    assert lines[1] == "<6>blobmount.test: mounted at /mnt/x"
    assert "ValueError: boom" in lines[3]  # the traceback folded onto the event's line

    other = io.StringIO()
    assert not logs.stream_is_journal(other)
    with open(tmp_path / "elsewhere", "w") as f:
        assert not logs.stream_is_journal(f)  # a redirected stderr is not the journal
        logs.setup("info", "text", stream=f, force=True)
        logging.getLogger("blobmount.test").warning("plain")
    assert (tmp_path / "elsewhere").read_text() == "blobmount: WARNING: plain\n"


def test_the_cli_writes_journal_lines_under_systemd(tmp_path: Path) -> None:
    """A real process: stderr is a file whose dev:ino is in $JOURNAL_STREAM, as systemd arranges."""
    err = tmp_path / "stderr"
    with open(err, "w") as f:
        st = os.fstat(f.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}", BLOBMOUNT_NO_SUCH_SETTING="1")
        out = subprocess.run(
            [sys.executable, "-m", "blobmount.cli", "ls", f"dir:{FIXTURES / 'basic'}", "--log-level", "info"],
            stdout=subprocess.PIPE,
            stderr=f,
            env=env,
            timeout=60,
        )
    assert out.returncode == 0
    assert err.read_text().splitlines() == [
        "<4>blobmount: BLOBMOUNT_NO_SUCH_SETTING is not a blobmount setting; ignored"
    ]
    env.pop("JOURNAL_STREAM")
    out = subprocess.run(
        [sys.executable, "-m", "blobmount.cli", "ls", f"dir:{FIXTURES / 'basic'}", "--log-format", "json"],
        capture_output=True,
        env=env,
        timeout=60,
    )
    doc = json.loads(out.stderr)
    assert doc["level"] == "warning"
    assert "BLOBMOUNT_NO_SUCH_SETTING" in doc["msg"]


def test_levels() -> None:
    assert logs.level_for(None, 0) == logging.WARNING
    assert logs.level_for(None, 1) == logging.INFO
    assert logs.level_for(None, 2) == logging.DEBUG
    assert logs.level_for("error", 2) == logging.ERROR  # --log-level wins over -v


@pytest.mark.expect_log(r"; retry \d+ in ", r"^blobmount\.remote: still shown")
def test_one_shot_commands_quiet_retries_and_reader_reports_at_the_default_level_only(
    root_logger: logging.Logger,
) -> None:
    """A one-shot command's error line says how it ended; the retries and verification reports
    that led there are shown only when -v/--log-level asks for more (the daemon always logs them)."""
    out = io.StringIO()
    logs.setup("warning", stream=out, force=True)
    try:
        logs.quiet_one_shot(True)
        logging.getLogger(logs.RETRY_LOGGER).warning("refused; retry 3 in 1.00 s")
        logging.getLogger("blobmount.reader").error("'a': sha256 mismatch")
        logging.getLogger("blobmount.remote").warning("still shown")
        assert out.getvalue() == "blobmount: WARNING: still shown\n"
        logs.quiet_one_shot(False)
        logging.getLogger(logs.RETRY_LOGGER).warning("refused; retry 3 in 1.00 s")
        assert "retry 3" in out.getvalue()
        logs.setup("info", stream=out, force=True)  # -v: the user asked to see what happens
        logs.quiet_one_shot(True)
        logging.getLogger(logs.RETRY_LOGGER).warning("refused; retry 4 in 2.00 s")
        assert "retry 4" in out.getvalue()
    finally:
        logs.quiet_one_shot(False)
    assert logs.RETRY_LOGGER.startswith("blobmount.registry.client.")  # caplog on the client sees it


def test_the_client_logs_its_retries_on_the_retry_logger() -> None:
    from blobmount.registry import retry

    assert retry.retry_log.name == logs.RETRY_LOGGER
