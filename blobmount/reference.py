"""Registry references: parse and format `[registry[:port]/]repo[:tag][@sha256:digest]`, the Docker
Hub defaults, and the Digest type. No network here."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from blobmount.errors import UsageError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"  # docker.io itself only redirects browsers
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DEFAULT_TAG = "latest"
MAX_NAME_BYTES = 255  # the distribution spec's repository name limit
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOST = re.compile(
    r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)(?::[0-9]{1,5})?"
)


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        algo, sep, value = text.partition(":")
        if not sep or not algo or not value:
            raise UsageError(f"malformed digest {text[:100]!r} (expected sha256:<64 hex>)")
        if algo != "sha256":
            raise UsageError(f"unsupported digest algorithm {algo[:20]!r} (only sha256)")
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise UsageError(f"malformed sha256 digest {text[:100]!r} (64 lowercase hex digits)")
        return cls(algo, value)

    @classmethod
    def of(cls, data: bytes) -> Digest:
        return cls("sha256", hashlib.sha256(data).hexdigest())

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def written_host(text: str) -> str | None:
    """The registry host a reference's text names before its first '/' (something with a '.' or a
    ':', or localhost); None: it names none, so it means Docker Hub."""
    first, slash, _ = text.partition("@")[0].partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        return first
    return None


@dataclass(frozen=True, slots=True)
class Reference:
    registry: str  # host[:port] as written (docker.io for Docker Hub)
    repository: str
    tag: str | None
    digest: Digest | None

    @classmethod
    def parse(cls, text: str) -> Reference:
        if not text:
            raise UsageError("empty reference")
        if text != text.strip() or any(c.isspace() for c in text):
            raise UsageError(f"reference {text[:100]!r} contains whitespace")
        if "://" in text:
            raise UsageError(f"reference {text[:100]!r}: give registry/repo[:tag], not a URL")
        rest, at, digest_text = text.partition("@")
        try:
            digest = Digest.parse(digest_text) if at else None
        except UsageError as exc:
            raise UsageError(f"reference {text[:100]!r}: {exc}") from None
        host = written_host(rest)
        if host is not None:
            registry, path = host, rest.partition("/")[2]
            if not _HOST.fullmatch(registry):
                raise UsageError(f"reference {text[:100]!r}: malformed registry host {registry[:100]!r}")
            port = registry.rpartition(":")[2] if not registry.endswith("]") and ":" in registry else None
            if port is not None and not 0 < int(port) < 65536:
                raise UsageError(f"reference {text[:100]!r}: port {port} out of range")
        else:
            registry, path = DOCKER_HUB, rest
        repo, tag = path, None
        colon = path.rfind(":")
        if colon > path.rfind("/"):
            repo, tag = path[:colon], path[colon + 1 :]
            if not _TAG.fullmatch(tag):
                raise UsageError(f"reference {text[:100]!r}: malformed tag {tag[:130]!r}")
        if registry in _HUB_ALIASES:
            registry = DOCKER_HUB
            if repo and "/" not in repo:
                repo = "library/" + repo
        if not repo:
            raise UsageError(f"reference {text[:100]!r}: no repository")
        for part in repo.split("/"):
            if not part:
                raise UsageError(f"reference {text[:100]!r}: empty repository component ('//' or a '/' at an end)")
            if ":" in part:
                raise UsageError(
                    f"reference {text[:100]!r}: ':' in the repository name (only one tag, after the last '/')"
                )
            if not _COMPONENT.fullmatch(part):
                raise UsageError(
                    f"reference {text[:100]!r}: repository component {part[:100]!r} must be lowercase"
                    " letters and digits separated by '.', '_', '__' or '-'"
                )
        if len(registry) + 1 + len(repo) > MAX_NAME_BYTES:
            raise UsageError(f"reference {text[:100]!r}: name longer than {MAX_NAME_BYTES} characters")
        return cls(registry, repo, tag, digest)

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def plain_http_default(self) -> bool:
        """Loopback registries speak plain HTTP by default; everything else HTTPS."""
        host = _host_only(self.registry)
        return host in ("localhost", "[::1]", "::1") or re.fullmatch(r"127\.\d+\.\d+\.\d+", host) is not None

    @property
    def ref_for_manifest(self) -> str:
        """What to fetch: the digest when given (it wins over a tag), else the tag."""
        if self.digest is not None:
            return str(self.digest)
        return self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def _host_only(registry: str) -> str:
    if registry.startswith("["):
        return registry[: registry.index("]") + 1]
    return registry.partition(":")[0]


def host_matches(spec: str, registry: str) -> bool:
    """`--plain-http`/`--insecure` HOST[:PORT]: without a port any port of that host matches."""
    if spec == registry:
        return True
    has_port = (":" in spec and not spec.endswith("]")) if not spec.startswith("[") else "]:" in spec
    return not has_port and _host_only(registry) == spec
