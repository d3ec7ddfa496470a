"""
Test support: fake backends on real sockets, a running balancer built from
an INI text, and blocking HTTP clients run in threads (the stdlib's
http.client and raw sockets), so what reaches the wire is checked by code
that shares nothing with l7lb.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import socket
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IPushProducer
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from l7lb.config import load
from l7lb.service import BalancerService, build

CLIENT_TIMEOUT = 20.0


def pattern(size: int) -> bytes:
    """
    Deterministic, non-repeating-looking bytes for body checks.
    """
    block = hashlib.sha256(b"l7lb").digest() * 2048  # 64 KiB
    whole, rest = divmod(size, len(block))
    return block * whole + block[:rest]


@implementer(IPushProducer)
class _PatternStream:
    """
    Streams C{size} bytes of L{pattern} with real back-pressure, counting
    what was written and whether the consumer ever paused it.
    """

    def __init__(self, request: Request, size: int, backend: FakeBackend) -> None:
        self.request = request
        self.remaining = size
        self.backend = backend
        self.paused = False
        self.paused_since = 0.0
        self.stopped = False
        self.chunk = pattern(64 * 1024)
        backend.streams.append(self)

    def start(self) -> None:
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.stopped and self.remaining > 0:
            piece = self.chunk[: self.remaining]
            self.remaining -= len(piece)
            self.backend.streamed += len(piece)
            self.request.write(piece)
        if self.remaining == 0 and not self.stopped:
            self.stopped = True
            self.request.unregisterProducer()
            self.request.finish()

    def pauseProducing(self) -> None:
        self.paused = True
        self.paused_since = reactor.seconds()  # type: ignore[attr-defined]
        self.backend.pauses += 1

    def settled(self, quiet: float) -> bool:
        """
        Finished, or paused without a break for C{quiet} seconds.
        """
        return self.stopped or (
            self.paused and reactor.seconds() - self.paused_since >= quiet  # type: ignore[attr-defined]
        )

    def stopProducing(self) -> None:
        self.stopped = True
        self.backend.lost += 1


class _Handler(Resource):
    isLeaf = True

    def __init__(self, backend: FakeBackend) -> None:
        super().__init__()
        self.backend = backend

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        return self.backend.handle(request)


class _RecordingChannel(HTTPChannel):
    """
    Keeps every byte the balancer sent, to check framing on the wire.
    """

    def connectionMade(self) -> None:
        self.site.backend.connections += 1
        self.site.backend.raw.append(b"")
        self.index = len(self.site.backend.raw) - 1
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        self.site.backend.raw[self.index] += data
        super().dataReceived(data)


@dataclass
class Seen:
    """
    One request as a fake backend received it.
    """

    method: bytes
    uri: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


@dataclass
class FakeBackend:
    """
    A backend on 127.0.0.1 whose answers depend on the path:

    - C{/health}: status C{health_status}
    - C{/gzip}: a gzip body with Content-Encoding: gzip
    - C{/stream/N}: N bytes of L{pattern}, streamed with back-pressure
    - C{/hang}: never answers
    - C{/cut/N}: Content-Length N, half the body, then the connection drops
    - C{/cut-chunked}: a chunked body that stops without its last chunk
    - C{/status/N}: status N
    - anything else: JSON naming the backend and echoing the request
    """

    name: str = "backend"
    health_status: int = 200
    requests: list[Seen] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    connections: int = 0
    streamed: int = 0
    pauses: int = 0
    lost: int = 0
    hanging: list[Request] = field(default_factory=list)
    streams: list[_PatternStream] = field(default_factory=list)
    port: int = 0
    listening: Any = None

    def handle(self, request: Request) -> bytes | int:
        body = request.content.read() if request.content is not None else b""
        self.requests.append(
            Seen(
                request.method,
                request.uri,
                [
                    (n, v)
                    for n, vs in request.requestHeaders.getAllRawHeaders()
                    for v in vs
                ],
                body,
            )
        )
        path = request.path
        if path == b"/health":
            request.setResponseCode(self.health_status)
            return b"health\n"
        if path == b"/gzip":
            request.setHeader(b"Content-Encoding", b"gzip")
            request.setHeader(b"Content-Type", b"text/plain")
            return gzip.compress(b"hello, compressed world\n" * 100, mtime=0)
        if path.startswith(b"/stream/"):
            _PatternStream(request, int(path.split(b"/")[2]), self).start()
            return NOT_DONE_YET
        if path == b"/hang":
            self.hanging.append(request)
            request.notifyFinish().addErrback(
                lambda _: setattr(self, "lost", self.lost + 1)
            )
            return NOT_DONE_YET
        if path.startswith(b"/cut/"):
            size = int(path.split(b"/")[2])
            request.setHeader(b"Content-Length", b"%d" % size)
            request.write(pattern(size // 2))
            assert request.channel is not None
            request.channel.transport.loseConnection()
            return NOT_DONE_YET
        if path == b"/cut-chunked":
            request.write(b"first part of a body that never ends properly")
            assert request.channel is not None
            request.channel.transport.loseConnection()
            return NOT_DONE_YET
        if path.startswith(b"/status/"):
            request.setResponseCode(int(path.split(b"/")[2]))
            return b"status\n"
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"X-Backend", self.name.encode())
        return json.dumps(
            {
                "backend": self.name,
                "method": request.method.decode(),
                "uri": request.uri.decode("latin-1"),
                "body_length": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
            }
        ).encode()

    scheme: str = "http"

    def start(self, certificate: str | None = None) -> int:
        """
        Listen on an ephemeral port; over TLS with C{certificate} (a PEM file
        holding a key and its certificate) when given.
        """
        site = Site(_Handler(self))
        site.protocol = _RecordingChannel  # type: ignore[assignment]
        site.backend = self  # type: ignore[attr-defined]
        site.noisy = False
        if certificate is None:
            self.listening = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        else:
            with open(certificate) as f:
                options = PrivateCertificate.loadPEM(f.read()).options()
            self.listening = reactor.listenSSL(0, site, options, interface="127.0.0.1")  # type: ignore[attr-defined]
            self.scheme = "https"
        self.port = self.listening.getHost().port
        return self.port

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def stop(self) -> Deferred[None]:
        for request in self.hanging:
            channel = getattr(request, "channel", None)
            if channel is not None:
                channel.transport.abortConnection()
        return self.listening.stopListening()  # type: ignore[no-any-return]


def closed_port() -> int:
    """
    A local port with nothing listening (bound, then released).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class IntegrationTest(TestCase):
    """
    Starts fake backends and a real balancer on ephemeral ports.
    """

    def backend(self, name: str, certificate: str | None = None) -> FakeBackend:
        backend = FakeBackend(name)
        backend.start(certificate)
        self.addCleanup(backend.stop)
        return backend

    def balancer(self, ini: str) -> BalancerService:
        """
        A balancer running the configuration C{ini} (dedented; the [lb]
        section with an ephemeral listener and no access log is added when
        the text has none).
        """
        text = textwrap.dedent(ini)
        if "[lb]" not in text:
            text = (
                "[lb]\nlisten = tcp:0:interface=127.0.0.1\naccess_log = off\n\n" + text
            )
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "lb.ini")
        with open(path, "w") as f:
            f.write(text)
        service = build(load(path), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def one_pool(
        self, *servers: str, pool_options: str = "", lb_options: str = ""
    ) -> BalancerService:
        """
        A balancer sending every request to one pool C{p} of C{servers}.
        """
        pool = "\n".join(["[pool:p]", "servers = " + " ".join(servers), pool_options])
        lb = "[lb]\nlisten = tcp:0:interface=127.0.0.1\naccess_log = off\n" + lb_options
        return self.balancer(f"{lb}\n{pool}\n[route:all]\npool = p\n")

    @staticmethod
    def port_of(service: BalancerService) -> int:
        listener = service.listeners[0]
        assert listener.port is not None
        port: int = listener.port.getHost().port
        return port

    @inlineCallbacks
    def until(self, condition: Callable[[], bool], deadline: float = 10.0) -> Any:
        """
        Wait until C{condition()} holds, polling, or fail after C{deadline}.
        """
        waited = 0.0
        while not condition():
            if waited >= deadline:
                self.fail(f"condition not met within {deadline}s")
            yield deferLater(reactor, 0.01, lambda: None)
            waited += 0.01


@dataclass
class Reply:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


def _request(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None,
    body: bytes | None,
    connection: http.client.HTTPConnection | None = None,
) -> Reply:
    conn = connection or http.client.HTTPConnection(
        "127.0.0.1", port, timeout=CLIENT_TIMEOUT
    )
    try:
        chunked = (headers or {}).get("Transfer-Encoding") == "chunked"
        conn.request(
            method, path, body=body, headers=headers or {}, encode_chunked=chunked
        )
        response = conn.getresponse()
        content = response.read()
        return Reply(response.status, response.reason, response.getheaders(), content)
    finally:
        if connection is None:
            conn.close()


def fetch(
    port: int,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> Deferred[Reply]:
    """
    One request on its own connection, with the stdlib's http.client.
    """
    return threads.deferToThread(_request, port, method, path, headers, body)


class Session:
    """
    Several requests over one keep-alive connection.
    """

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection(
            "127.0.0.1", port, timeout=CLIENT_TIMEOUT
        )

    def fetch(
        self,
        path: str,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Deferred[Reply]:
        return threads.deferToThread(
            _request, 0, method, path, headers, body, self.connection
        )

    def close(self) -> None:
        self.connection.close()


def read_all(sock: socket.socket) -> bytes:
    """
    What a socket receives until the server closes (or resets) it, or
    CLIENT_TIMEOUT passes without a byte.
    """
    sock.settimeout(CLIENT_TIMEOUT)
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as s:
        s.sendall(data)
        return read_all(s)


def exchange(port: int, data: bytes) -> Deferred[bytes]:
    """
    Send raw bytes and read until the server closes the connection.
    """
    return threads.deferToThread(_exchange, port, data)


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])
