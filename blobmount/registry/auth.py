"""Registry credentials and challenges: where secrets come from, and parsing ``WWW-Authenticate``.

Secrets live in :class:`Credentials` objects whose ``repr`` hides them; nothing here logs a secret.
Lookup order (the first that knows the registry wins): explicit ``--username`` + password,
``$REGISTRY_AUTH_FILE``, ``${XDG_RUNTIME_DIR}/containers/auth.json``, ``$DOCKER_CONFIG/config.json``,
``~/.docker/config.json``; in each file ``credHelpers[host]``, then ``auths[host]``, then
``credsStore``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from blobmount.errors import UsageError

log = logging.getLogger(__name__)

HELPER_TIMEOUT_S = 30  # a credential helper that hangs must not hang the mount
_warned_modes: set[Path] = set()  # files already warned about: one warning per file and process
DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    identity_token: str | None = field(default=None, repr=False)  # a refresh token (`identitytoken`)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lowercased: "basic" or "bearer"
    params: dict[str, str]


_SCHEME = re.compile(r"\s*([A-Za-z][A-Za-z0-9_-]*)\s*")
_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*(?:,|$)')


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value into challenges; malformed parts are dropped, never fatal.

    Handles several challenges in one header (``Basic realm="x", Bearer realm="y"``) and quoted
    values containing commas (``scope="repository:a:pull,push"``)."""
    challenges: list[Challenge] = []
    text = header.strip()
    pos = 0
    length = len(text)
    while pos < length:
        m = _SCHEME.match(text, pos)  # always consumes at least one character
        if not m:
            break
        scheme = m.group(1).lower()
        pos = m.end()
        params: dict[str, str] = {}
        for _ in range(64):  # bounded: a hostile header cannot make this loop forever
            pm = _PARAM.match(text, pos)
            if not pm or pm.end() == pos:
                break
            value = pm.group(2) if pm.group(2) is not None else pm.group(3) or ""
            params[pm.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
            pos = pm.end()
        challenges.append(Challenge(scheme, params))
        if pos < length and text[pos] == ",":
            pos += 1
        # skip anything unparseable up to the next scheme-looking token
        while pos < length and text[pos] in " ,":
            pos += 1
    return challenges


def _config_files() -> list[Path]:
    files: list[Path] = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    if os.environ.get("DOCKER_CONFIG"):
        files.append(Path(os.environ["DOCKER_CONFIG"]) / "config.json")
    files.append(Path.home() / ".docker" / "config.json")
    return files


def _keys_for(host: str) -> tuple[str, ...]:
    if host in DOCKER_HUB_KEYS:
        return DOCKER_HUB_KEYS
    return (host, f"https://{host}", f"http://{host}", f"https://{host}/v2/", f"https://{host}/v1/")


def warn_if_exposed(path: Path) -> None:
    """A file we took a secret from should be readable by its owner alone (0600, 0400): warn
    once if group or others may read it. Never refuses: the secret has already been read."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return
    if mode & 0o077 and path not in _warned_modes:
        _warned_modes.add(path)
        log.warning("%s holds registry credentials but its mode is %04o; make it 0600 (chmod 600)", path, mode)


def _from_auths(entry: object, where: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    token = entry.get("identitytoken")
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            user, _, password = base64.b64decode(auth).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            log.warning("%s: an 'auth' entry is not base64 of user:password; ignored", where)
            return None
        return Credentials(user, password, token if isinstance(token, str) else None)
    name, secret = entry.get("username"), entry.get("password")
    if isinstance(name, str) and isinstance(secret, str):
        return Credentials(name, secret, token if isinstance(token, str) else None)
    return None


def run_helper(name: str, host: str) -> Credentials | None:
    """``docker-credential-NAME get`` with the server on stdin (the docker credential protocol)."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise UsageError(f"credential helper name {name!r} is not a plain name")
    try:
        result = subprocess.run(
            [f"docker-credential-{name}", "get"],
            input=host.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError:
        log.warning("credential helper docker-credential-%s is not installed; trying anonymous", name)
        return None
    except subprocess.TimeoutExpired:
        log.warning("credential helper docker-credential-%s timed out after %d s", name, HELPER_TIMEOUT_S)
        return None
    if result.returncode != 0:
        log.info("credential helper docker-credential-%s has nothing for %s", name, host)
        return None
    try:
        doc = json.loads(result.stdout)
    except json.JSONDecodeError:
        log.warning("credential helper docker-credential-%s answered something that is not JSON", name)
        return None
    user, secret = doc.get("Username"), doc.get("Secret")
    if not isinstance(user, str) or not isinstance(secret, str):
        return None
    if user == "<token>":
        return Credentials(user, "", identity_token=secret)
    return Credentials(user, secret)


def find_credentials(host: str) -> Credentials | None:
    """Credentials for registry `host` from the standard files and helpers, or None (anonymous)."""
    keys = _keys_for(host)
    for path in _config_files():
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            log.warning("%s: unreadable credentials file (%s); skipped", path, type(exc).__name__)
            continue
        if not isinstance(doc, dict):
            continue
        helpers = doc.get("credHelpers")
        if isinstance(helpers, dict):
            for key in keys:
                if isinstance(helpers.get(key), str):
                    return run_helper(helpers[key], host)
        auths = doc.get("auths")
        if isinstance(auths, dict):
            for key in keys:
                creds = _from_auths(auths.get(key), str(path))
                if creds is not None:
                    warn_if_exposed(path)
                    return creds
        store = doc.get("credsStore")
        if isinstance(store, str) and store:
            creds = run_helper(store, host)
            if creds is not None:
                return creds
    return None


def read_password_file(path: Path) -> str:
    """A password from a file (systemd ``LoadCredential=``): the first line, without its newline."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"--password-file {path}: {exc.strerror}") from exc
    warn_if_exposed(path)
    return text.splitlines()[0] if text else ""
