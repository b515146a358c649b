"""Logging set-up: one line per event, in text or JSON, journald-aware.

Owns how log records look, never what is logged (modules log through
``logging.getLogger(__name__)`` with %-style arguments). Three shapes:

- text (default): ``blobmount: WARNING: message`` on stderr, as people read it in a terminal.
- text under systemd (``$JOURNAL_STREAM`` names our stderr): ``<4>blobmount.fs: message``. journald
  reads the ``<N>`` prefix as the syslog priority, so ``journalctl -p warning`` works, and adds the
  time and unit itself; a traceback is folded onto the same line (journald would otherwise store
  each traceback line as its own entry at the default priority).
- json: one object per line (``ts``, ``level``, ``logger``, ``msg``, ``pid``, ``exc`` when an
  exception is attached), for log shippers in containers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import TextIO

__all__ = [
    "FORMATS",
    "LEVELS",
    "ONE_SHOT_QUIET",
    "RETRY_LOGGER",
    "JournalFormatter",
    "JsonFormatter",
    "level_for",
    "quiet_one_shot",
    "setup",
    "stream_is_journal",
    "syslog_formatter",
]

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
# syslog priorities (sd-daemon.h): what journald reads from a `<N>` line prefix
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
TEXT_FORMAT = "blobmount: %(levelname)s: %(message)s"
_HANDLER_NAME = "blobmount"
_format = "text"  # what setup() chose, for the daemon's syslog handler
RETRY_LOGGER = "blobmount.registry.client.retry"  # the registry client's "...; retry N in S s" lines
# What a one-shot command (ls, cat, inspect, a mount until its daemon serves) does not show at the
# default level: retries, and the reader's verification reports. A daemon logs them (in a long
# life they are news); a command's own error line says how it ended, and printing them as well
# made one unreachable registry four lines, one corrupt file three.
ONE_SHOT_QUIET = (RETRY_LOGGER, "blobmount.reader")


def level_for(level: str | None, verbose: int = 0) -> int:
    """`--log-level` wins; else -v/-vv raise the default WARNING to INFO/DEBUG."""
    if level:
        return int(getattr(logging, level.upper()))
    return logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING


def _priority(levelno: int) -> int:
    for threshold in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= threshold:
            return _PRIORITY[threshold]
    return _PRIORITY[logging.DEBUG]


def stream_is_journal(stream: TextIO) -> bool:
    """True when `$JOURNAL_STREAM` ("DEV:INODE") names this stream's file, as systemd sets it for
    a service whose stderr goes to the journal (a child that redirected stderr is not fooled)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


class JournalFormatter(logging.Formatter):
    """``<N>logger: message``, one line per record (tracebacks folded with `` | ``)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"<{_priority(record.levelno)}>" + " | ".join(line for line in text.splitlines() if line)

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; newlines inside messages are escaped by json itself."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup(
    level: str | None = None, fmt: str = "text", verbose: int = 0, stream: TextIO | None = None, force: bool = False
) -> None:
    """Configure the root logger (cli/ calls it after parsing arguments). Like logging.basicConfig,
    it leaves alone a process whose root logger already has someone else's handlers (an embedding
    program, pytest's capture) unless `force` is given."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {FORMATS}")
    root = logging.getLogger()
    if not force and any(h.get_name() != _HANDLER_NAME for h in root.handlers):
        return
    out = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(out)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif stream_is_journal(out):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.set_name(_HANDLER_NAME)
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:  # ours from an earlier call; others (pytest's) stay
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_for(level, verbose))
    global _format
    _format = fmt


def quiet_one_shot(quiet: bool) -> None:
    """`quiet`: the ONE_SHOT_QUIET loggers are silenced unless -v/--log-level asked for more than
    the default; False: they log as ever (cli/ once a command ends, mount.py once it serves)."""
    level = logging.CRITICAL if quiet and logging.getLogger().getEffectiveLevel() >= logging.WARNING else 0
    for name in ONE_SHOT_QUIET:
        logging.getLogger(name).setLevel(level)


def syslog_formatter() -> logging.Formatter:
    """For the backgrounded daemon's syslog handler (mount.py): JSON if asked, else the text line
    with the process id syslog expects."""
    if _format == "json":
        return JsonFormatter()
    return logging.Formatter("blobmount[%(process)d]: %(levelname)s: %(message)s")
