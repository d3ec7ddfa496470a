"""
Slowloris: two hundred connections trickling header bytes do not keep a
normal client waiting, and are closed by the header deadline.
"""

from __future__ import annotations

import time

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall

from tests.support import IntegrationTest, fetch

TRICKLERS = 200


class Trickle(Protocol):
    """
    Sends a request head a byte at a time, ten bytes a second, forever.
    """

    def __init__(self) -> None:
        self.received = b""
        self.answered_at: float | None = None
        self.closed_at: float | None = None
        self.opened_at = 0.0
        self.loop = LoopingCall(self._drip)
        self.loop.clock = reactor

    def connectionMade(self) -> None:
        self.opened_at = reactor.seconds()
        self.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        self.loop.start(0.1, now=False)

    def _drip(self) -> None:
        self.transport.write(b"a")

    def dataReceived(self, data: bytes) -> None:
        if self.answered_at is None:
            self.answered_at = reactor.seconds()
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.closed_at = reactor.seconds()
        if self.loop.running:
            self.loop.stop()


class SlowlorisTests(IntegrationTest):
    @inlineCallbacks
    def test_tricklers_closed_by_deadline_while_others_are_served(self):
        app = self.backend("app")
        service = self.one_pool(app.url, lb_options="client_header_timeout = 1s")
        port = self.port_of(service)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        tricklers = yield gatherResults(
            [connectProtocol(endpoint, Trickle()) for _ in range(TRICKLERS)]
        )
        for trickler in tricklers:
            self.addCleanup(
                lambda t=trickler: (
                    t.transport.abortConnection() if t.closed_at is None else None
                )
            )
        started = time.monotonic()
        reply = yield fetch(port, "/served")
        self.assertEqual(reply.status, 200)
        self.assertLess(time.monotonic() - started, 1.0)
        yield self.until(
            lambda: all(t.received or t.closed_at for t in tricklers), deadline=10
        )
        # Each got its 408 about when its deadline passed, not later.
        for trickler in tricklers:
            self.assertTrue(
                trickler.received.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
            )
        # l7lb stopped talking to them: every trickler saw the end of the
        # stream (the lingering close lets them finish sending first).
        yield self.until(
            lambda: all(t.closed_at is not None for t in tricklers), deadline=10
        )
        self.assertEqual([r.uri for r in app.requests], [b"/served"])
