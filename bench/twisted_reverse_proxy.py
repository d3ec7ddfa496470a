"""Twisted's stock reverse proxy, the Python baseline of the benchmark.

``twisted.web.proxy.ReverseProxyResource`` as shipped, one per backend,
chosen in turn for each request. It opens a new backend connection per
request and speaks HTTP/1.0 upstream; that is the point of the baseline,
it shows what Twisted gives without writing a proxy. Access logging is off
to match the other proxies.

    python bench/twisted_reverse_proxy.py --port 8080 \\
        --backend 127.0.0.1:8081 --backend 127.0.0.1:8082
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterable

from twisted.internet import reactor
from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site


class RoundRobin(Resource):
    """Hand each request to the next backend's ReverseProxyResource."""

    def __init__(self, backends: Iterable[ReverseProxyResource]) -> None:
        super().__init__()
        self._next = itertools.cycle(list(backends)).__next__

    def getChild(self, path: bytes, request: Request) -> IResource:
        return self._next().getChild(path, request)


class QuietSite(Site):
    """A Site without the per-request access log line."""

    def log(self, request: Request) -> None:
        pass


def parse_backend(text: str) -> tuple[str, int]:
    """Split ``host:port`` for argparse."""
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    """Listen on 127.0.0.1 and proxy round robin to the given backends."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--backend", type=parse_backend, action="append", required=True)
    args = parser.parse_args()
    root = RoundRobin(
        ReverseProxyResource(host, port, b"") for host, port in args.backend
    )
    reactor.listenTCP(  # type: ignore[attr-defined]
        args.port, QuietSite(root), backlog=4096, interface=args.interface
    )
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
