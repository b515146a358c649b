"""argv -> frozen config -> subcommand; logging set-up; one-line errors and documented exit codes.

The package: parser.py builds the parser, options.py turns flags into the library's settings,
archives.py and mounts.py hold the commands (thin calls into the library), runner.py runs their
trio work; this module dispatches and owns the process's exit.

Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 invalid archive, 5 verification failed,
6 authentication refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from blobmount.cli.parser import build_parser, normalize_argv
from blobmount.cli.runner import unwrapped
from blobmount.errors import EXIT_OK, EXIT_USAGE, BlobmountError, UsageError, exit_code_for

log = logging.getLogger("blobmount")


def main(argv: Sequence[str] | None = None) -> int:
    from blobmount.daemon import logs
    from blobmount.settings import resolve

    parser = build_parser()
    args_list = normalize_argv(list(sys.argv[1:] if argv is None else argv), parser)
    try:
        resolved = resolve(parser, args_list)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    except UsageError as exc:
        print(f"blobmount: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args = resolved.args
    logs.setup(args.log_level, args.log_format, args.verbose + (2 if getattr(args, "debug", False) else 0))
    for warning in resolved.warnings:
        log.warning("%s", warning)
    if args.command is None:
        parser.print_usage(sys.stderr)
        return EXIT_USAGE
    from blobmount.cli.archives import cmd_cat, cmd_cp, cmd_create, cmd_inspect, cmd_ls, cmd_push
    from blobmount.cli.mounts import cmd_cache, cmd_mount, cmd_prefetch, cmd_profile, cmd_status

    handlers = {
        "create": cmd_create,
        "ls": cmd_ls,
        "cat": cmd_cat,
        "cp": cmd_cp,
        "mount": cmd_mount,
        "push": cmd_push,
        "inspect": cmd_inspect,
        "prefetch": cmd_prefetch,
        "cache": cmd_cache,
        "status": cmd_status,
        "profile": cmd_profile,
    }
    logs.quiet_one_shot(args.command in _ONE_SHOT)
    try:
        try:
            code: int = handlers[args.command](args)
        except BaseExceptionGroup as group:  # a nursery's: the error inside is what happened
            raise unwrapped(group) from None
        return code
    except BlobmountError as exc:
        print(f"blobmount: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    finally:
        logs.quiet_one_shot(False)


# Commands whose retry and verification lines are not shown (logs.quiet_one_shot): their error
# line is the news. `mount` only until its daemon serves (mount.py shows them from there on).
_ONE_SHOT = frozenset({"ls", "cat", "inspect", "mount"})


def mount_helper(argv: Sequence[str] | None = None) -> int:
    """`mount.fuse.blobmount SOURCE MOUNTPOINT [-o OPTS] [-n] [-s] [-f] [-v]`, as mount(8) calls it
    for `mount -t fuse.blobmount` and fstab lines: -o options go through the one -o table (mount's
    generic ones are ignored there); -n (no mtab), -s (sloppy), -f (fake), -v are mount's own."""
    args = list(sys.argv[1:] if argv is None else argv)
    positional: list[str] = []
    options: list[str] = []
    fake = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-o" and i + 1 < len(args):
            options += ["-o", args[i + 1]]
            i += 2
            continue
        if arg.startswith("-o") and len(arg) > 2:
            options += ["-o", arg[2:]]
        elif arg == "-f":
            fake = True
        elif arg in ("-n", "-s", "-v"):
            pass
        else:
            positional.append(arg)
        i += 1
    if len(positional) != 2:
        print("usage: mount.fuse.blobmount SOURCE MOUNTPOINT [-o OPTIONS]", file=sys.stderr)
        return EXIT_USAGE
    if fake:
        return EXIT_OK
    return main(["mount", positional[0], positional[1], *options])


def _exit_now(code: int) -> NoReturn:
    """End the process without tearing the interpreter down: once a command is done nothing is
    left to clean up (files are closed, temporary directories gone, the daemon is its own
    process), and freeing every module of the mount's parent takes 15-45 ms that the caller of
    `blobmount SOURCE MNT` would wait for. Logging and the standard streams are flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that went away, a closed stream
            stream.flush()
    os._exit(code)


def run() -> NoReturn:
    """The `blobmount` command (console script and `python -m blobmount.cli`)."""
    _exit_now(main())


def run_mount_helper() -> NoReturn:
    """The `mount.fuse.blobmount` command."""
    _exit_now(mount_helper())
