"""The argument parser: every command, option and help text (the golden --help test holds them), and
the rewrite that makes `blobmount SOURCE MNT` a mount."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from blobmount import __version__, defaults
from blobmount.defaults import size_text
from blobmount.errors import EXIT_USAGE

if TYPE_CHECKING:
    pass

log = logging.getLogger("blobmount")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: what is wrong and where the help is, not the whole usage
    (the usage of `mount` alone is 16 lines, which buried the one that mattered). Exit 2 as ever;
    subparsers are made of this class too (argparse's parser_class default)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"blobmount: {message} (see `{self.prog} --help`)\n")


def _common_parent(top: bool) -> _Parser:
    """Options every command takes, before or after the command name (subcommands' copies default to
    SUPPRESS so they never overwrite a value given before the command)."""
    from blobmount.daemon.logs import FORMATS, LEVELS

    def dflt(value: object) -> object:
        return value if top else argparse.SUPPRESS

    c = _Parser(add_help=False)
    g = c.add_argument_group("logging and configuration")
    g.add_argument("-v", "--verbose", action="count", default=dflt(0), help="more log output (-vv: debug)")
    g.add_argument(
        "--log-level", choices=LEVELS, default=dflt(None), help="log threshold (default warning; -v info, -vv debug)"
    )
    g.add_argument("--log-format", choices=FORMATS, default=dflt("text"), help="text (default) or json")
    g.add_argument(
        "--config", type=Path, default=dflt(None), help="TOML file (default /etc/blobmount/config.toml if present)"
    )
    return c


def _registry_parent() -> _Parser:
    r = _Parser(add_help=False)
    g = r.add_argument_group("registry")
    g.add_argument(
        "--plain-http",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="talk to this registry over plain HTTP (repeatable)",
    )
    g.add_argument(
        "--insecure",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="do not verify this registry's TLS certificate (repeatable)",
    )
    g.add_argument("--ca-file", type=Path, help="extra CA bundle for TLS")
    g.add_argument("--username", help="registry user (password from --password-stdin or --password-file)")
    g.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    g.add_argument("--password-file", type=Path, help="read the password from a file (systemd LoadCredential=)")
    g.add_argument(
        "--timeout", type=float, default=defaults.TIMEOUT_S, help="seconds one operation may take across retries"
    )
    g.add_argument(
        "--max-connections", type=int, default=defaults.MAX_CONNECTIONS, help="concurrent connections to the registry"
    )
    g.add_argument(
        "--mirror",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="a mirror (pull-through cache) tried before the registry (repeatable, in order)",
    )
    g.add_argument(
        "--hosts-dir",
        type=Path,
        help="containerd-style REGISTRY/hosts.toml mirror configs (default /etc/blobmount/certs.d)",
    )
    return r


def build_parser() -> argparse.ArgumentParser:
    reg = _registry_parent()
    common = _common_parent(top=False)
    p = _Parser(
        prog="blobmount",
        parents=[_common_parent(top=True)],
        description="Mount a blob archive read-only; only the bytes read are fetched.",
        epilog="SOURCE: /path, ./path or dir:path (index.blob + data.blob), oci:PATH[:TAG]. "
        "`blobmount SOURCE MOUNTPOINT` is short for `blobmount mount SOURCE MOUNTPOINT`.",
    )
    p.add_argument("--version", action="version", version=f"blobmount {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("mount", help="mount SOURCE at MOUNTPOINT", parents=[reg, common])
    m.add_argument("source", nargs="?", help="(or $BLOBMOUNT_SOURCE)")
    m.add_argument("mountpoint", nargs="?", help="(or $BLOBMOUNT_MOUNTPOINT)")
    m.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    m.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT...]",
        help="mount options: cache_dir=, cache_size=, chunk_size=, verify=, uid=, gid=, offline, no_stale_tag, "
        "nonempty, prefetch=, follow, follow_interval=, follow_keep=, allow_other, default_permissions, fsname=, "
        "subtype=; mount(8)'s generic options are ignored",
    )
    cache_args(m)
    m.add_argument(
        "--verify",
        choices=VERIFY_POLICIES,
        default=None,
        help="lazy (default): large raw files are verified once fully read; background: also read "
        "the rest of an opened large file in the background to verify it; strict: every file is "
        "verified before its first byte is served",
    )
    m.add_argument(
        "--offline",
        action="store_true",
        help="never touch the network: serve what the cache holds (a tag resolves as it did last time)",
    )
    m.add_argument(
        "--no-stale-tag",
        action="store_true",
        help="when the registry does not answer, fail instead of mounting the digest the cache remembers for the tag",
    )
    m.add_argument(
        "--follow",
        action="store_true",
        help="re-resolve the tag every --follow-interval and switch to a new archive atomically "
        "(open files keep reading the archive they were opened on); SIGHUP checks at once",
    )
    m.add_argument(
        "--follow-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"how often --follow checks the tag (default {defaults.FOLLOW_INTERVAL_S:g})",
    )
    m.add_argument(
        "--follow-keep",
        type=int,
        default=None,
        metavar="N",
        help="archives kept at most under --follow: the one served and older ones still open"
        f" (default {defaults.FOLLOW_KEEP})",
    )
    m.add_argument(
        "--nonempty",
        action="store_true",
        help="mount even if MOUNTPOINT has entries (the mount hides them while it lasts)",
    )
    m.add_argument(
        "--prefetch",
        action="append",
        default=[],
        metavar="PATH",
        help="once mounted, fetch this file or directory into the cache (repeatable)",
    )
    m.add_argument(
        "--record-profile",
        action="store_true",
        help="record the order in which files (and ranges of large files) are first read; written on "
        "unmount to CACHE_DIR/meta/profiles/<index digest hex>.json, or any time by `blobmount profile save`",
    )
    m.add_argument(
        "--record-seconds",
        type=float,
        default=None,
        help="stop recording this many seconds after the mount (default 120)",
    )
    m.add_argument(
        "--prefetch-profile",
        default=None,
        metavar="auto|FILE|none",
        help="once mounted, fetch what a prefetch profile names, in its order: auto = the newest one "
        "pushed for the archive (`blobmount profile push`), FILE, or none (default)",
    )
    m.add_argument(
        "--read-ahead-kb",
        type=int,
        default=None,
        help=f"kernel read-ahead for the mount, KiB (default {defaults.READ_AHEAD_KB}; 0 keeps the kernel's 128;"
        " needs root)",
    )
    m.add_argument(
        "--verify-threshold",
        default=None,
        help="raw files up to this size are verified before the first byte"
        f" (default {size_text(defaults.VERIFY_THRESHOLD_BYTES)})",
    )
    m.add_argument("--uid", type=int, help="present every file as owned by this uid")
    m.add_argument("--gid", type=int, help="present every file as owned by this gid")
    m.add_argument(
        "--owner-self", action="store_true", help="present everything as owned by the mounting user and group"
    )
    m.add_argument("-d", "--debug", action="store_true", help="log every FUSE request")
    m.add_argument(
        "--metrics",
        metavar="[HOST]:PORT",
        help="serve Prometheus /metrics, /healthz and /readyz on this address (':PORT' = every interface)",
    )

    st = sub.add_parser("status", help="ask the daemon serving MOUNTPOINT how it is doing", parents=[common])
    st.add_argument("mountpoint")
    st.add_argument("--json", action="store_true", help="the daemon's answer as JSON")
    st.add_argument("--socket", type=Path, help="the daemon's control socket (default: found from MOUNTPOINT)")

    c = sub.add_parser("create", help="create an archive from a directory", parents=[common])
    c.add_argument("src_dir")
    c.add_argument("out_dir")
    create_args(c)
    c.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)

    ls = sub.add_parser("ls", help="list a directory of an archive", parents=[reg, common])
    ls.add_argument("archive")
    ls.add_argument("path", nargs="?", default="")
    ls.add_argument("-l", dest="long", action="store_true", help="long listing")

    cat = sub.add_parser("cat", help="write a file of an archive to stdout (sha256-verified)", parents=[reg, common])
    cat.add_argument("archive")
    cat.add_argument("path")

    cpp = sub.add_parser(
        "cp",
        help="copy files or a directory of an archive into DEST (sha256-verified, no mount)",
        parents=[reg, common],
        description="cp SOURCE PATH... DEST: each file lands at DEST/<its path in the archive>. "
        "cp SOURCE DIR DEST: the directory's files land at DEST/<path below DIR> ('.' is the whole archive).",
    )
    cpp.add_argument("archive", metavar="SOURCE")
    cpp.add_argument("paths", nargs="+", metavar="PATH", help="files, or one directory")
    cpp.add_argument("dest", metavar="DEST")
    cpp.add_argument(
        "--concurrency",
        type=int,
        default=defaults.CP_CONCURRENCY,
        help=f"range reads in flight (default {defaults.CP_CONCURRENCY})",
    )
    cp_buffer = size_text(defaults.CP_BUFFER_BYTES)
    cpp.add_argument("--buffer", default=cp_buffer, help=f"fetched bytes held in memory at most (default {cp_buffer})")
    cpp.add_argument("--overwrite", action="store_true", help="replace files already in DEST (default: skip them)")
    cpp.add_argument("--preserve-mode", action="store_true", help="the archive's permission bits (default: umask)")
    cpp.add_argument("--preserve-times", action="store_true", help="the archive's mtimes (directories: as mounted)")
    cpp.add_argument("--fsync", action="store_true", help="fsync each file before renaming it into place")
    cpp.add_argument("--clean-dest", action="store_true", help="empty DEST first (refused for /, the cwd, the cache)")
    cpp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="default: on a terminal")
    cache_args(cpp)

    push = sub.add_parser("push", help="create an archive from SRC_DIR and push it to REF", parents=[reg, common])
    push.add_argument("src", help="source directory (or, with --archive, an archive directory)")
    push.add_argument("ref")
    push.add_argument("--archive", action="store_true", help="SRC is index.blob + data.blob: push as is")
    create_args(push)
    push.add_argument("--annotation", action="append", default=[], metavar="KEY=VALUE")
    push.add_argument("--created", help="RFC 3339 creation time (default: $SOURCE_DATE_EPOCH, else now)")
    push.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="default: on a terminal")

    ins = sub.add_parser("inspect", help="show what an archive is: digests, sizes, entries", parents=[reg, common])
    ins.add_argument("archive")
    ins.add_argument("--json", action="store_true")

    pf = sub.add_parser("prefetch", help="fetch files or directories of a remote archive into the cache", parents=[reg])
    pf.add_argument("archive")
    pf.add_argument("paths", nargs="*", metavar="PATH", help="files or directories (default: everything)")
    cache_args(pf)
    pf.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)

    pr = sub.add_parser("profile", help="prefetch profiles: save a mount's, push one to a registry")
    pr_sub = pr.add_subparsers(dest="profile_command", metavar="ACTION", required=True)
    ps = pr_sub.add_parser("save", help="write the profile a --record-profile mount has recorded so far")
    ps.add_argument("mountpoint")
    ps.add_argument("file")
    ps.add_argument("--socket", type=Path, help="the daemon's control socket (default: found from MOUNTPOINT)")
    pp = pr_sub.add_parser(
        "push", help="push a profile as an OCI artifact whose subject is the archive REF names", parents=[reg]
    )
    pp.add_argument("ref")
    pp.add_argument("file")

    ca = sub.add_parser("cache", help="the cache directory: status, prune")
    ca_sub = ca.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    cs = ca_sub.add_parser("status", help="what the cache holds")
    cs.add_argument("--cache-dir", type=Path)
    cs.add_argument("--json", action="store_true")
    cp = ca_sub.add_parser("prune", help="evict least recently used files (works on a live cache)")
    cp.add_argument("--cache-dir", type=Path)
    cp.add_argument("--size", default="0", help="evict until at most this much remains (default 0: all unused)")
    return p


VERIFY_POLICIES = ("lazy", "strict", "background")


def create_args(p: argparse.ArgumentParser) -> None:
    """How `create` (and `push` from a directory) builds an archive: the reference writer's options."""
    g = p.add_argument_group("building the archive")
    g.add_argument("--compression", choices=("zstd", "none"), default="zstd")
    g.add_argument("--level", type=int, default=3, help="zstd level (default 3)")
    g.add_argument(
        "--max-files",
        type=int,
        default=None,
        metavar="N",
        help="refuse a tree of more than N files (default: no limit; 0: the reference's 200000; -1: no limit)",
    )
    g.add_argument(
        "--change-detection",
        choices=("none", "strict"),
        default="none",
        help="strict: a file whose size or mtime changes while it is read fails the create (default none)",
    )
    g.add_argument(
        "--skip-compression",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="store small files and already-compressed formats raw (default on; --no-skip-compression: "
        "compress every file)",
    )
    g.add_argument(
        "--skip-compression-below", metavar="SIZE", default=None, help="files smaller than this stay raw (default 1K)"
    )
    g.add_argument(
        "--skip-compression-ext",
        action="append",
        default=None,
        metavar="EXT[,EXT...]",
        help="extensions stored raw, replacing the default list (repeatable; '' for none)",
    )
    g.add_argument(
        "--threads", type=int, default=0, metavar="N", help="zstd compression threads (default 0: one per core)"
    )


def cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", type=Path, help="the cache directory (shared by every process naming it)")
    p.add_argument(
        "--cache-size",
        default=None,
        help=f"hard limit of the cache directory (default {size_text(defaults.CACHE_SIZE_BYTES)})",
    )
    p.add_argument(
        "--chunk-size",
        default=None,
        help=f"unit of remote fetches and of the chunk cache (default {size_text(defaults.CHUNK_SIZE_BYTES)})",
    )


def normalize_argv(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`blobmount [opts] [SOURCE MNT]` -> `blobmount mount [opts] [SOURCE MNT]` unless a subcommand
    is named (subcommands win); values of options are skipped, so `--cache-dir mount` is no command.
    Without positionals it is still a mount: SOURCE and MOUNTPOINT may come from BLOBMOUNT_*."""
    from blobmount.settings import subparsers

    subs = subparsers(parser)
    takes_value = {
        opt for p in (parser, *subs.values()) for a in p._actions if a.nargs != 0 for opt in a.option_strings
    }
    i = 0
    while i < len(argv) and argv[i] != "--":
        arg = argv[i]
        if not arg.startswith("-") or arg == "-":
            if arg in subs:
                return argv
            break
        i += 2 if arg in takes_value else 1
    if not argv or any(a in ("-h", "--help", "--version") for a in argv):
        return argv
    return ["mount", *argv]
