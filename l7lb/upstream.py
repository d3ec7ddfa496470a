# -*- test-case-name: tests.test_proxy -*-
"""
Connections to one backend: a bounded pool of keep-alive connections and
Twisted's HTTP/1.1 client over it, without treq's cookie, redirect and
content-decoding layers, which a byte-exact proxy must not have.
"""

from __future__ import annotations

import ipaddress
import math
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web._newclient import HTTP11ClientProtocol, Request
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from l7lb.config import PoolConfig, ServerConfig
from l7lb.tls import backend_tls


class UpstreamClient(Protocol):
    """
    Sends requests to one backend. L{Upstream} is the real one; tests use an
    in-memory twin built on treq's C{RequestTraversalAgent}.
    """

    def request(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: IBodyProducer | None,
    ) -> Deferred[IResponse]: ...

    def close(self) -> Deferred[Any]: ...


_NO_HEADERS = Headers()


def connection_headers(response: IResponse) -> Headers:
    """
    The headers Twisted's client keeps away from C{response.headers}:
    Connection, Content-Length, Transfer-Encoding and the like. A proxy needs
    them to learn which other headers the backend declared hop-by-hop.
    """
    headers: Headers = getattr(response, "l7lbConnectionHeaders", _NO_HEADERS)
    return headers


class QuietClientFactory(_HTTP11ClientFactory):
    """
    Twisted's client factory without a log line for every new connection.
    """

    noisy = False


# A backend's response head (status line and header fields) larger than this
# is an invalid response (502): twisted.web's client would read any number.
MAX_RESPONSE_HEAD = 64 * 1024


class ResponseHeadTooLarge(Exception):
    """
    The backend's response head passed L{MAX_RESPONSE_HEAD}.
    """


class _ClientProtocol(HTTP11ClientProtocol):
    """
    Twisted's client protocol, keeping the response's connection headers
    and bounding the size of its head.
    """

    def request(self, request: Request) -> Deferred[IResponse]:
        d = super().request(request)
        parser = self._parser
        if parser is not None:
            parser.MAX_LENGTH = MAX_RESPONSE_HEAD
            read = parser.lineReceived
            size = 0

            def bounded(line: bytes) -> None:
                nonlocal size
                size += len(line) + 2
                if size > MAX_RESPONSE_HEAD:
                    raise ResponseHeadTooLarge(f"over {MAX_RESPONSE_HEAD} bytes")
                read(line)

            parser.lineReceived = bounded  # type: ignore[method-assign]

            def keep(response: IResponse) -> IResponse:
                response.l7lbConnectionHeaders = parser.connHeaders  # type: ignore[attr-defined]
                return response

            d.addCallback(keep)
        return d


class _ClientFactory(QuietClientFactory):
    def buildProtocol(self, addr: object) -> _ClientProtocol:
        return _ClientProtocol(self._quiescentCallback)


@implementer(IAgentEndpointFactory)
class _FixedEndpoint:
    """
    Every request of this agent goes to one prepared endpoint, so the agent
    neither re-parses nor re-resolves the backend's address per request.
    """

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def endpointForURI(self, uri: object) -> IStreamClientEndpoint:
        return self._endpoint


def client_endpoint(
    reactor: Any, server: ServerConfig, pool: PoolConfig, connect_timeout: float
) -> IStreamClientEndpoint:
    """
    A TCP endpoint for an address literal (no resolver round trip), a
    resolving one for a name; wrapped in TLS for an C{https://} server.
    """
    endpoint: IStreamClientEndpoint
    try:
        address = ipaddress.ip_address(server.host)
    except ValueError:
        endpoint = HostnameEndpoint(
            reactor, server.host.encode("idna"), server.port, timeout=connect_timeout
        )
    else:
        endpoint_type = (
            TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
        )
        endpoint = endpoint_type(
            reactor, server.host, server.port, timeout=connect_timeout
        )
    if server.scheme == "https":
        endpoint = wrapClientTLS(backend_tls(server, pool), endpoint)
    return endpoint


def quiet_pool(reactor: Any, persistent: bool) -> HTTPConnectionPool:
    """
    A connection pool that does not log each connection it opens.
    """
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool._factory = QuietClientFactory
    return pool


def fixed_agent(
    reactor: Any, endpoint: IStreamClientEndpoint, pool: HTTPConnectionPool
) -> Agent:
    """
    An agent whose every request goes to C{endpoint}.
    """
    agent: Agent = Agent.usingEndpointFactory(
        reactor, _FixedEndpoint(endpoint), pool=pool
    )
    return agent


class Upstream:
    """
    The real L{UpstreamClient}: Twisted's C{Agent} over a bounded keep-alive
    pool, with automatic retries off (retrying is the proxy's decision).
    """

    def __init__(self, reactor: Any, server: ServerConfig, pool: PoolConfig) -> None:
        self.connections = HTTPConnectionPool(reactor, persistent=True)
        self.connections.maxPersistentPerHost = pool.keepalive_connections
        self.connections.cachedConnectionTimeout = math.ceil(pool.keepalive_timeout)
        self.connections.retryAutomatically = False
        self.connections._factory = _ClientFactory
        self._agent = fixed_agent(
            reactor,
            client_endpoint(reactor, server, pool, pool.connect_timeout),
            self.connections,
        )
        self._origin = f"http://{server.address}".encode("ascii")

    def request(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: IBodyProducer | None,
    ) -> Deferred[IResponse]:
        return self._agent.request(method, self._origin + target, headers, body)

    def close(self) -> Deferred[Any]:
        d: Deferred[Any] = self.connections.closeCachedConnections()
        return d
