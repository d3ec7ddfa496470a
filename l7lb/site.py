# -*- test-case-name: tests.test_site -*-
"""
The client side of the proxy: what every listener serves.

L{BalancerSite} makes a protocol per client connection (after the
connection caps admit it): l7lb's own HTTP/1.x connection
(L{l7lb.http1}), or, on a TLS listener where ALPN chose C{h2},
twisted.web's HTTP/2 connection (L{l7lb.http2}). Every request, whichever
protocol carried it, goes to one resource, the balancer; the site keeps
what they share: the limits, the access log, metrics, the connection
counts, and whether it is draining.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress, IHandshakeListener, IReactorTime
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from l7lb.accesslog import AccessLog
from l7lb.config import LBConfig
from l7lb.connlimit import ConnectionCounts
from l7lb.deadlines import NEVER
from l7lb.errors import describe_failure
from l7lb.headers import HTTPDate
from l7lb.http1 import HTTP1Connection
from l7lb.http2 import http2_connection
from l7lb.metrics import Metrics
from l7lb.trust import TrustedProxies
from l7lb.units import format_duration


@implementer(IHandshakeListener)
class NegotiatingConnection(HTTP1Connection):
    """
    A connection on a TLS listener: HTTP/1.x, or HTTP/2 when the handshake
    negotiated C{h2} by ALPN, in which case twisted.web's HTTP/2 connection
    takes the bytes from here on. The handshake must end within C{[lb]
    tls_handshake_timeout}; one that stalls or fails costs the connection
    and one log line.
    """

    log = Logger()
    _negotiated = False
    _handshaking = True
    _http2: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.deadline = self.site.clock.seconds() + self.limits.tls_handshake_timeout

    def handshakeCompleted(self) -> None:
        self._handshaking = False
        self.deadline = self.site.clock.seconds() + self.site.timeOut

    def expired(self) -> None:
        if not self._handshaking:
            super().expired()
            return
        self.deadline = NEVER
        self.log.info(
            "TLS handshake with {peer} timed out after {timeout}",
            peer=self.host,
            timeout=format_duration(self.limits.tls_handshake_timeout),
        )
        self.transport.abortConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self._http2 is not None:
            self._http2.dataReceived(data)
            return
        if not self._negotiated:
            self._negotiated = True
            transport: Any = self.transport
            if getattr(transport, "negotiatedProtocol", None) == b"h2":
                self._switch_to_http2().dataReceived(data)
                return
        super().dataReceived(data)

    def _switch_to_http2(self) -> Any:
        self.deadline = NEVER
        self.deadlines.unwatch(self)
        self._http2 = http2 = http2_connection(self.site)
        transport: Any = self.transport
        http2.makeConnection(transport)
        # The HTTP/2 connection applies back-pressure to its streams.
        transport.registerProducer(http2, True)
        return http2

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._handshaking and self.deadline != NEVER:
            self.log.info(
                "TLS handshake with {peer} failed: {reason}",
                peer=self.host,
                reason=describe_failure(reason),
            )
        if self._http2 is not None:
            self.site.connections.closed(self)
            self._http2.connectionLost(reason)
            return
        super().connectionLost(reason)

    @property
    def idle(self) -> bool:
        if self._http2 is not None:
            return not self._http2.streams
        return super().idle

    def close_when_done(self) -> None:
        if self._http2 is not None:
            if not self._http2.streams:
                self.transport.loseConnection()  # type: ignore[union-attr]
            return
        super().close_when_done()


class BalancerSite(ServerFactory):
    """
    Serves every request with one resource, the balancer, under l7lb's limits.
    C{scheme} is C{https} for a TLS listener's site.
    """

    noisy = False

    def __init__(
        self,
        resource: Any,
        limits: LBConfig,
        access_log: AccessLog,
        clock: IReactorTime,
        timeout: float,
        scheme: bytes = b"http",
        trusted: TrustedProxies | None = None,
        connections: ConnectionCounts | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.resource = resource
        self.limits = limits
        self.access_log = access_log
        self.clock = clock
        # How long a client connection may stay open with no request.
        self.timeOut = timeout
        self.scheme = scheme
        self.date = HTTPDate(clock)
        self.trusted = trusted or TrustedProxies(())
        self.metrics = metrics or Metrics()
        self.connections = connections or ConnectionCounts(self.metrics)
        # Requests begun and not yet logged: what draining waits for.
        self.requests_in_flight = 0
        self.draining = False
        self._connection_type = (
            NegotiatingConnection if scheme == b"https" else HTTP1Connection
        )

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if not self.connections.admits(addr, self.limits):
            return None  # the reactor closes it at once
        connection = self._connection_type(self)
        if self.draining:
            connection.persistent = False
        return connection
