"""Where a setting comes from: flag > ``-o`` > ``BLOBMOUNT_*`` environment > config file > default
(DESIGN §8), decided in one function, :func:`resolve`.

The one place that maps ``-o`` keys, environment variables and config-file keys onto the CLI's options. It reads
the argparse parser cli/parser.py builds, so every option, including ones added later, gets its variable
and key without a second table: ``--cache-size`` is ``BLOBMOUNT_CACHE_SIZE`` and ``cache_size`` (or
``cache-size``) in the config file; ``mount``'s SOURCE and MOUNTPOINT are ``BLOBMOUNT_SOURCE`` and
``BLOBMOUNT_MOUNTPOINT`` (so a container needs no arguments at all). Repeatable options take a
comma- or space-separated list from the environment and a TOML array from the file; switches take
``1/true/yes/on`` or ``0/false/no/off`` (a TOML boolean in the file).

Secrets never come from ``BLOBMOUNT_*`` (the environment leaks: ``/proc/PID/environ``, ``docker
inspect``, crash reports): a variable that looks like one is refused. The config file may carry
``password`` only when nobody but its owner can read it (mode 0600 or stricter).

One setting has a ceiling outside blobmount: Linux 6.15+ aborts a whole FUSE mount when one request
goes unanswered past its request timeout (``/proc/sys/fs/fuse/default_request_timeout`` and
``max_request_timeout``, read once, when the mount's INIT completes). :func:`kernel_request_timeout`
reads them as the kernel will and :func:`clamp_timeout` keeps ``--timeout`` under what they leave.

How it works: every layered option's argparse default is replaced by None before parsing, so a
value still None afterwards was not on the command line; it is then filled from the environment,
the file, or the option's real default, in that order. Values from the environment and file are
converted by the option's own ``type`` and checked against its ``choices``. ``-o key=value``
(mount(8), fstab; keys are option dests, config.O_KEYS) comes right after the flag itself: it beats
the environment and the file, and a repeatable option's ``-o`` value joins its flags' values.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import stat
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blobmount.errors import UsageError

__all__ = [
    "DEFAULT_CONFIG",
    "ENV_PREFIX",
    "Resolved",
    "clamp_timeout",
    "env_name",
    "kernel_request_timeout",
    "request_bound",
    "resolve",
    "subparsers",
]

log = logging.getLogger(__name__)

ENV_PREFIX = "BLOBMOUNT_"
DEFAULT_CONFIG = Path("/etc/blobmount/config.toml")  # read when it exists and no --config is given
# dests never layered: they are the command itself or one-shot actions
_NOT_LAYERED = frozenset({"help", "version", "command", "config"})
# positionals that the environment and file may supply (mount's, for containers and units)
_LAYERED_POSITIONALS = frozenset({"source", "mountpoint"})
# BLOBMOUNT_* variables with other owners: the unit's extra arguments, the property tests' knob
_OTHER_VARIABLES = frozenset({"BLOBMOUNT_ARGS", "BLOBMOUNT_CONFIG", "BLOBMOUNT_FUZZ_EXAMPLES"})
_SECRET_WORDS = ("PASSWORD", "TOKEN", "SECRET")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
CONFIG_PASSWORD_KEY = "password"
FUSE_SYSCTL_DIR = Path("/proc/sys/fs/fuse")  # default_request_timeout, max_request_timeout (Linux 6.15+)
# What a request's age may include besides our handler: its wait in the kernel's queues before a
# worker takes it, the trio loop's lag on a busy CPU, the reply's write. The kernel measures from the
# request's creation and aborts at its first check (every 15 s) past the timeout, so the reply must
# simply come before the timeout: the margin is at least 2 s, a fifth of longer timeouts.
REQUEST_MARGIN_MIN_S = 2.0
REQUEST_MARGIN_SHARE = 0.2


def env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


@dataclass(slots=True)
class Resolved:
    """The parsed arguments plus where each layered value came from (for `--help`-style tracing
    and tests) and the warnings to log once logging is set up."""

    args: argparse.Namespace
    origin: dict[str, str] = field(default_factory=dict)  # dest -> flag | option | env | config | default
    warnings: list[str] = field(default_factory=list)
    config_path: Path | None = None


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _layered(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if action.dest in _NOT_LAYERED or isinstance(action, argparse._SubParsersAction):
            continue
        if action.default is argparse.SUPPRESS:  # shared options' copies in subparsers
            continue
        if not action.option_strings and action.dest not in _LAYERED_POSITIONALS:
            continue
        yield action


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parser and its subcommands', nested ones too (`profile push` takes registry options)."""
    out = [parser]
    for sub in subparsers(parser).values():
        out += _all_parsers(sub)
    return out


def _chosen_nested(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[argparse.ArgumentParser]:
    """The nested subcommand parsers `args` went through below `parser` (`profile` -> `push`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            name = getattr(args, action.dest, None)
            if name in action.choices:
                sub = action.choices[name]
                return [sub, *_chosen_nested(sub, args)]
    return []


def _is_switch(action: argparse.Action) -> bool:
    return action.nargs == 0 and not isinstance(action, argparse._CountAction)


def _is_list(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction)


def _convert_one(action: argparse.Action, text: str, where: str) -> Any:
    try:
        value = action.type(text) if callable(action.type) else text
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where}: invalid value {text!r}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise UsageError(f"{where}: invalid value {text!r} (choose from {choices})")
    return value


def _from_env(action: argparse.Action, text: str, where: str) -> Any:
    if isinstance(action, argparse._CountAction):
        try:
            return int(text or "0")
        except ValueError:
            raise UsageError(f"{where}: expected a number, got {text!r}") from None
    if _is_switch(action):
        word = text.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise UsageError(f"{where}: expected 1/true/yes/on or 0/false/no/off, got {text!r}")
    if _is_list(action):
        items = [item for item in text.replace(",", " ").split() if item]
        if action.dest == "options":  # -o values are comma lists themselves: keep them whole
            items = [text] if text.strip() else []
        return [_convert_one(action, item, where) for item in items]
    return _convert_one(action, text, where)


def _from_file(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(action, argparse._CountAction):
        if not isinstance(value, int) or isinstance(value, bool):
            raise UsageError(f"{where}: expected a number")
        return value
    if _is_switch(action):
        if not isinstance(value, bool):
            raise UsageError(f"{where}: expected true or false")
        return value
    if _is_list(action):
        values = value if isinstance(value, list) else [value]
        return [_convert_one(action, _scalar_text(v, where), where) for v in values]
    return _convert_one(action, _scalar_text(value, where), where)


def _scalar_text(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise UsageError(f"{where}: expected a string or a number")
    return str(value)


def _check_environment(environ: Mapping[str, str], known: set[str]) -> list[str]:
    warnings = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known or name in _OTHER_VARIABLES:
            continue
        if any(word in name for word in _SECRET_WORDS) and not name.endswith(("_FILE", "_STDIN")):
            raise UsageError(
                f"{name}: secrets are never read from BLOBMOUNT_* variables; "
                "use --password-file (systemd LoadCredential=, a mounted secret) or --password-stdin"
            )
        warnings.append(f"{name} is not a blobmount setting; ignored")
    return warnings


def _load_config(path: Path, explicit: bool) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            doc = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise UsageError(f"config file {path}: does not exist") from None
        return {}
    except OSError as exc:
        raise UsageError(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path}: {exc}") from None
    if CONFIG_PASSWORD_KEY in doc and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(
            f"config file {path} holds a password but others may read it "
            f"(mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it, or use --password-file"
        )
    return {key.replace("-", "_"): value for key, value in doc.items()}


def _config_path(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[Path, bool]:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1]), True
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1]), True
        if arg == "--":
            break
    if environ.get("BLOBMOUNT_CONFIG"):
        return Path(environ["BLOBMOUNT_CONFIG"]), True
    return DEFAULT_CONFIG, False


def resolve(parser: argparse.ArgumentParser, argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Resolved:
    """Parse `argv` with `parser`, then fill every option not given from the environment, the
    config file (``--config``, ``$BLOBMOUNT_CONFIG``, else /etc/blobmount/config.toml when present)
    and the option's default. Raises UsageError for bad values; argparse's own errors exit 2."""
    env = os.environ if environ is None else environ
    parsers = _all_parsers(parser)
    defaults: dict[int, Any] = {}
    known: set[str] = set()
    for p in parsers:
        for action in _layered(p):  # parents' actions are shared by several subparsers: once each
            defaults.setdefault(id(action), action.default)
            action.default = None
            known.add(env_name(action.dest))
    try:
        args = parser.parse_args(list(argv))
    finally:
        for p in parsers:
            for action in _layered(p):
                action.default = defaults[id(action)]
    path, explicit = _config_path(argv, env)
    config = _load_config(path, explicit)
    resolved = Resolved(args, warnings=_check_environment(env, known), config_path=path if config else None)
    if config:
        config_keys = {a.dest for p in parsers for a in _layered(p)} | {CONFIG_PASSWORD_KEY}
        unknown = sorted(set(config) - config_keys)
        if unknown:
            raise UsageError(f"config file {path}: unknown key(s) {', '.join(unknown)}")
    chosen = [parser]
    command = getattr(args, "command", None)
    if command is not None:
        chosen.append(subparsers(parser)[command])
        chosen += _chosen_nested(chosen[-1], args)
    for p in chosen:
        for action in _layered(p):
            dest = action.dest
            if getattr(args, dest, None) is not None:
                resolved.origin[dest] = "flag"
                continue
            name = env_name(dest)
            if name in env:
                value = _from_env(action, env[name], name)
                resolved.origin[dest] = "env"
            elif dest in config:
                value = _from_file(action, config[dest], f"config file {path}: {dest}")
                resolved.origin[dest] = "config"
            else:
                value = defaults[id(action)]
                if isinstance(value, str) and action.type is not None and callable(action.type):
                    value = action.type(value)
                resolved.origin[dest] = "default"
            setattr(args, dest, value)
    _apply_o_options(resolved, chosen)
    args.config_password = config.get(CONFIG_PASSWORD_KEY)
    if args.config_password is not None and not isinstance(args.config_password, str):
        raise UsageError(f"config file {path}: password must be a string")
    return resolved


def _apply_o_options(resolved: Resolved, chosen: Sequence[argparse.ArgumentParser]) -> None:
    """`-o key[=value]`, once `-o` itself is known (it may come from the environment or the file
    too): second only to the option's own flag; a repeatable option's value joins its flags'."""
    from blobmount.config import split_o_options

    args = resolved.args
    ours, _ = split_o_options(getattr(args, "options", None) or [])
    actions = {a.dest: a for p in chosen for a in _layered(p)}
    for dest, text in ours.items():
        action = actions[dest]
        where = f"-o {dest}"
        if _is_list(action):
            setattr(args, dest, [*(getattr(args, dest) or []), _convert_one(action, text, where)])
            if resolved.origin.get(dest) != "flag":
                resolved.origin[dest] = "option"
        elif resolved.origin.get(dest) != "flag":
            setattr(args, dest, _from_env(action, text, where))
            resolved.origin[dest] = "option"


# -- the kernel's FUSE request timeout -----------------------------------------------------------


def _read_seconds(path: Path) -> int:
    try:
        return max(0, int(path.read_text().strip() or "0"))
    except (OSError, ValueError):
        return 0  # a kernel before 6.15 has neither file: no timeout


def kernel_request_timeout(sysctl_dir: Path = FUSE_SYSCTL_DIR) -> int:
    """The request timeout (seconds; 0: none) the kernel gives a mount whose INIT completes now,
    as fs/fuse's init_server_timeout() computes it for a daemon that asks for none (libfuse 3.14
    and pyfuse3 do not): the default, lowered to the maximum when that is set, or the maximum alone.
    The value is copied into the connection at INIT, so a later change of the sysctls does not
    reach a running mount."""
    timeout = _read_seconds(sysctl_dir / "default_request_timeout")
    ceiling = _read_seconds(sysctl_dir / "max_request_timeout")
    if ceiling:
        timeout = min(timeout, ceiling) if timeout else ceiling
    return timeout


def request_bound(kernel_s: int) -> float:
    """The time every FUSE request gets, from a worker taking it off the kernel's queue to the
    reply: the kernel's timeout less the margin (never less than half of it); infinite without one."""
    if kernel_s <= 0:
        return math.inf
    margin = max(REQUEST_MARGIN_MIN_S, kernel_s * REQUEST_MARGIN_SHARE)
    return max(kernel_s - margin, kernel_s / 2)


def clamp_timeout(timeout_s: float, kernel_s: int) -> tuple[float, str | None]:
    """`--timeout` lowered to :func:`request_bound` when it would pass it, with the warning to log
    (None when it fits): one network wait must end in time for the request that waits."""
    bound = request_bound(kernel_s)
    if timeout_s <= bound:
        return timeout_s, None
    return bound, (
        f"--timeout {timeout_s:g} s is longer than the kernel lets a FUSE request wait "
        f"({kernel_s} s, {FUSE_SYSCTL_DIR}/default_request_timeout and max_request_timeout): "
        f"using --timeout {bound:g} s"
    )
