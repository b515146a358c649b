"""The exception tree and the ONE errno table.

Every error blobmount raises on purpose is a :class:`BlobmountError`. The FUSE layer turns them into
errno values through :func:`errno_for` and nowhere else, so a handler never picks an errno inline and
a test can assert that every class is mapped::

    BlobmountError                      base; `str(exc)` is the one line the user sees
    ├── InvalidArchive                  index/manifest/entry breaks FORMAT.md (raised by index/,
    │                                   extract/, reader.py) -> EIO for one entry, refusal at open
    ├── IntegrityError                  bytes do not match their sha256 (integrity/, decode.py) -> EIO
    ├── NotFound                        the index has no such path (index/, fs.py)          -> ENOENT
    ├── NotADirectory                   a path component is a file (index/, fs.py)          -> ENOTDIR
    ├── IsADirectory                    a file operation on a directory (fs.py, cli/)       -> EISDIR
    ├── ReadOnly                        any write on the read-only mount (fs.py)            -> EROFS
    ├── NoAttribute                     an xattr the file does not have (fs.py)             -> ENODATA
    ├── NotSupported                    an xattr namespace no file has (security.*, trusted.*,
    │                                   ACLs; fs.py): ls(1) stops asking for the mount -> EOPNOTSUPP
    ├── RequestNotNeeded                a request kind the daemon keeps no state for (open,
    │                                   opendir, flush): the kernel stops sending it (fs.py) -> ENOSYS
    ├── LimitExceeded                   a configured limit (size, memory) would be passed   -> EFBIG
    ├── SourceError                     the bytes could not be obtained (I/O, network)      -> EIO
    │   ├── TransientError              worth retrying: reset, timeout, 429, 5xx (registry/) -> EIO
    │   ├── Unservable                  a file beyond every size limit; logged once by the
    │                                   reader, EIO for each read (reader.py)                -> EIO
    │   └── AuthError                   the registry refused our credentials (registry/)     -> EACCES
    ├── DestinationError                `cp` cannot write where it must (extract/): a
    │                                   symbolic link in the way, a full disk          -> EIO
    └── UsageError                      bad command line or configuration (cli/, config.py)

The CLI prints ``str(exc)`` on one line and exits with :func:`exit_code_for`.
"""

from __future__ import annotations

import errno

__all__ = [
    "EXIT_AUTH",
    "EXIT_ERROR",
    "EXIT_INTEGRITY",
    "EXIT_INVALID",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_USAGE",
    "AuthError",
    "BlobmountError",
    "DestinationError",
    "IntegrityError",
    "InvalidArchive",
    "IsADirectory",
    "LimitExceeded",
    "NoAttribute",
    "NotADirectory",
    "NotFound",
    "NotSupported",
    "ReadOnly",
    "RequestNotNeeded",
    "SourceError",
    "TransientError",
    "Unservable",
    "UsageError",
    "errno_for",
    "exit_code_for",
]


class BlobmountError(Exception):
    """Base of every error blobmount raises deliberately; the message is one line for the user."""


class InvalidArchive(BlobmountError):
    """The archive (index, manifest or one entry) violates the format; never served."""


class IntegrityError(BlobmountError):
    """Bytes did not hash to the digest they must have; the message names path and both hashes."""


class NotFound(BlobmountError):
    """The index has no entry and no directory of this name (the only source of ENOENT)."""


class NotADirectory(BlobmountError):
    """A directory operation met a file."""


class IsADirectory(BlobmountError):
    """A file operation met a directory."""


class ReadOnly(BlobmountError):
    """A write was attempted on the read-only filesystem."""


class NoAttribute(BlobmountError):
    """The extended attribute does not exist on this file or directory."""


class NotSupported(BlobmountError):
    """An extended attribute namespace no file of the mount can have (fs.py: security.*, trusted.*,
    system.posix_acl_*). EOPNOTSUPP rather than ENODATA: programs remember it per filesystem (ls -l
    asks for security.selinux and the ACL once per run instead of once per file; the kernel caches
    no negative xattr answer)."""


class RequestNotNeeded(BlobmountError):
    """A request kind the daemon keeps no state for (fs.py: open, opendir, flush): ENOSYS tells the
    kernel to stop sending it for this mount (for open/opendir: its no-open / no-opendir mode, in
    which the open itself succeeds)."""


class LimitExceeded(BlobmountError):
    """A configured size or memory limit would be exceeded; the message names the limit."""


class SourceError(BlobmountError):
    """The archive's bytes could not be read from their source (local I/O or network)."""


class TransientError(SourceError):
    """A failure that may clear by itself (connection reset, timeout, 429, 5xx); retried first."""


class Unservable(SourceError):
    """A file this mount cannot serve at all: a zstd file larger than both the content store and
    the in-memory limit (reader.py). The reader logs it once per file; with the kernel's no-open
    mode each read tries (and fails) again, and the kernel retries a failed read, so the
    filesystem logs this one at debug level only."""


class AuthError(SourceError):
    """The registry refused the credentials (or anonymous access); exit status 6."""


class DestinationError(BlobmountError):
    """Output could not be written where it goes (`cp` into DEST, `create` and `push oci:` into their
    output: a link or file in the way, read-only, no space); exit status 1."""


class UsageError(BlobmountError):
    """The command line or configuration is wrong; exit status 2."""


# The one errno table. Order matters only for subclasses (first match wins).
_ERRNO: tuple[tuple[type[BlobmountError], int], ...] = (
    (NotFound, errno.ENOENT),
    (NotADirectory, errno.ENOTDIR),
    (IsADirectory, errno.EISDIR),
    (ReadOnly, errno.EROFS),
    (NoAttribute, errno.ENODATA),
    (RequestNotNeeded, errno.ENOSYS),
    (NotSupported, errno.EOPNOTSUPP),
    (LimitExceeded, errno.EFBIG),
    (InvalidArchive, errno.EIO),
    (IntegrityError, errno.EIO),
    (AuthError, errno.EACCES),
    (Unservable, errno.EIO),
    (SourceError, errno.EIO),
    (UsageError, errno.EINVAL),
    (BlobmountError, errno.EIO),
)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_INVALID = 4
EXIT_INTEGRITY = 5
EXIT_AUTH = 6

_EXIT: tuple[tuple[type[BaseException], int], ...] = (
    (UsageError, EXIT_USAGE),
    (NotFound, EXIT_NOT_FOUND),
    (InvalidArchive, EXIT_INVALID),
    (IntegrityError, EXIT_INTEGRITY),
    (AuthError, EXIT_AUTH),
)


def errno_for(exc: BaseException) -> int:
    """The errno a FUSE reader sees for `exc`; anything unexpected is EIO (the caller logs it)."""
    for cls, code in _ERRNO:
        if isinstance(exc, cls):
            return code
    return errno.EIO


def exit_code_for(exc: BaseException) -> int:
    """The documented process exit status for a command that failed with `exc`."""
    for cls, code in _EXIT:
        if isinstance(exc, cls):
            return code
    return EXIT_ERROR
