"""An injected resolver for DNS faults, without a single real lookup.

Names under ``.faults.test`` resolve to 127.0.0.1 while DNS is "up"; while the flag file exists they
fail with ``EAI_AGAIN`` (what a dead resolver gives). Every other non-local name raises ``EAI_NONAME``
before reaching the system resolver. Installed by monkeypatching ``socket.getaddrinfo``, the call trio
(and so httpx) makes for every connection; in the test process through pytest's monkeypatch, in a
daemon under test through a generated ``sitecustomize`` (:func:`sitecustomize_dir`).

Kept free of heavy imports: a daemon imports it at interpreter start-up.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

FAKE_SUFFIX = ".faults.test"
LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "ip6-localhost"})


def is_local(name: str) -> bool:
    return name in LOCAL_NAMES or name.startswith("127.")


def resolver(flag: Path, real: Callable[..., Any]) -> Callable[..., Any]:
    """A getaddrinfo that maps *.faults.test to 127.0.0.1 unless `flag` exists; `real` answers only
    local names."""

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name is None or is_local(str(name)):
            return real(host, *args, **kwargs)
        flags = kwargs.get("flags", args[4] if len(args) > 4 else 0)
        if flags & socket.AI_NUMERICHOST:  # a name is never numeric: what the C library answers
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if str(name).endswith(FAKE_SUFFIX):
            if os.path.exists(flag):
                raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution (injected)")
            return real("127.0.0.1", *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, f"{name}: not resolvable in tests (injected resolver)")

    return getaddrinfo


def install(flag: str) -> None:
    """Patch this process's resolver (called from the generated sitecustomize)."""
    socket.getaddrinfo = resolver(Path(flag), socket.getaddrinfo)


def sitecustomize_dir(where: Path, flag: Path) -> dict[str, str]:
    """Write a sitecustomize that installs the resolver; return the environment for a daemon."""
    where.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[2]
    (where / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(repo)!r})\nimport tests.support.resolver\n"
        f"tests.support.resolver.install({str(flag)!r})\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(where), *filter(None, [env.get("PYTHONPATH")])])
    return env
