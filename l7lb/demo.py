# -*- test-case-name: tests.test_demo -*-
"""
Small backends for trying l7lb out: C{python -m l7lb.demo PORT...} serves
one tiny HTTP service per port on 127.0.0.1. Each answers every path with
a short text naming itself and echoing what it received, and C{/health}
with 200, so a newcomer can watch routing, balancing and health checks.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.python import log
from twisted.web.resource import Resource
from twisted.web.server import Request, Site


class DemoBackend(Resource):
    """
    Names itself and echoes the request line and forwarding headers.
    """

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def render(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        if request.path == b"/health":
            return b"ok\n"
        lines = [
            f"backend {self.name}",
            f"{request.method.decode()} {request.uri.decode('latin-1')}",
        ]
        for name in (
            b"Host",
            b"X-Forwarded-For",
            b"X-Forwarded-Proto",
            b"X-Forwarded-Host",
            b"Forwarded",
            b"Via",
            b"X-Request-Id",
        ):
            for value in request.requestHeaders.getRawHeaders(name, []):
                lines.append(f"{name.decode()}: {value.decode('latin-1')}")
        return ("\n".join(lines) + "\n").encode()


def serve(reactor: Any, ports: list[int]) -> None:
    for port in ports:
        site = Site(DemoBackend(f"127.0.0.1:{port}"))
        reactor.listenTCP(port, site, interface="127.0.0.1")


def main(argv: list[str]) -> None:
    from twisted.internet import reactor

    ports = [int(arg) for arg in argv]
    if not ports:
        raise SystemExit("usage: python -m l7lb.demo PORT [PORT...]")
    log.startLogging(sys.stdout)
    serve(reactor, ports)
    print(f"demo backends on 127.0.0.1 ports {', '.join(map(str, ports))}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
