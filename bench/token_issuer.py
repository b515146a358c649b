"""The test suite's token issuer as a process of its own, for bench.registry_ready's bearer-auth
registries (run inside the netshape namespace, so that fetching a token crosses the shaped link).

    python -m bench.token_issuer --listen 10.200.0.2:5001 --key-dir DIR

Anonymous requests get pull tokens. One line per request goes to stdout (the bench counts them);
SIGTERM ends it.
"""

from __future__ import annotations

import argparse
import http.server
import signal
import sys
import threading
from pathlib import Path

from tests.support.servers import SigningKey, TokenIssuer


class CountingIssuer(TokenIssuer):
    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        print(f"{h.command} {h.path}", flush=True)
        super()._handle(h)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.token_issuer")
    ap.add_argument("--listen", required=True, metavar="HOST:PORT")
    ap.add_argument("--key-dir", required=True, type=Path, help="issuer.key + issuer.crt (SigningKey.create)")
    args = ap.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    issuer = CountingIssuer(SigningKey.load(args.key_dir), host, int(port))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    print(f"ready {issuer.realm}", flush=True)
    stop.wait()
    issuer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
