"""
The balancer resource and forwarding path without sockets: a channel on a
StringTransport, backends behind treq's RequestTraversalAgent, time on a
Clock.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from l7lb.accesslog import AccessLog
from l7lb.balancing import balancer_for
from l7lb.config import LBConfig, PoolConfig, RouteConfig
from l7lb.fields import Fields
from l7lb.pool import Backend, Pool
from l7lb.proxy import Forwarder
from l7lb.resource import BalancerResource
from l7lb.routing import RouteMap
from l7lb.site import BalancerSite
from l7lb.trust import TrustedProxies
from l7lb.upstream import ResponseHead
from tests.twins import (
    TICK,
    Hanging,
    Hello,
    InMemoryUpstream,
    MemoryBalancer,
    Refusing,
    _MemoryCall,
    server,
)


class ForwardingTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()

    def site(self, clients, balance="round_robin", response_timeout=30.0):
        config = PoolConfig(
            "p",
            tuple(server(f"b{i}") for i in range(len(clients))),
            balance,
            response_timeout=response_timeout,
        )
        backends = [Backend(s, c) for s, c in zip(config.servers, clients, strict=True)]
        pool = Pool(config, backends, balancer_for(balance))
        routes = RouteMap(
            [RouteConfig("r", "p", path_prefix=b"/app", strip_prefix=True)]
        )
        resource = BalancerResource(
            routes, {"p": pool}, Forwarder(self.clock, TrustedProxies(()))
        )
        self.pool = pool
        return BalancerSite(
            resource, LBConfig(), AccessLog(None, self.clock), self.clock, 60
        )

    def connect(self, site):
        channel = site.buildProtocol(IPv4Address("TCP", "192.0.2.1", 5555))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 5555))
        channel.makeConnection(transport)
        return channel, transport

    def test_request_relayed_with_prefix_stripped(self):
        upstream = InMemoryUpstream(Hello(b"one"))
        channel, transport = self.connect(self.site([upstream]))
        channel.dataReceived(b"GET /app/x?q=1 HTTP/1.1\r\nHost: shop\r\n\r\n")
        upstream.agent.flush()
        response = transport.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 200 OK\r\n"), response)
        self.assertIn(b"X-Seen-Host: shop\r\n", response)
        self.assertIn(b"Via: 1.1 l7lb\r\n", response)
        self.assertTrue(response.endswith(b"hello from one /x?q=1"), response)
        self.assertEqual(self.pool.backends[0].inflight, 0)

    def test_no_route(self):
        channel, transport = self.connect(self.site([InMemoryUpstream(Hello(b"one"))]))
        channel.dataReceived(b"GET /other HTTP/1.1\r\nHost: shop\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 404 Not Found\r\n"))
        self.assertTrue(transport.value().endswith(b"\r\n\r\n404 Not Found\n"))

    def test_refused_then_retried_elsewhere(self):
        refusing, upstream = Refusing(), InMemoryUpstream(Hello(b"two"))
        channel, transport = self.connect(self.site([refusing, upstream]))
        channel.dataReceived(
            b"POST /app HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi"
        )
        upstream.agent.flush()
        self.assertEqual((refusing.calls, upstream.calls), (1, 1))
        self.assertIn(b"hello from two /", transport.value())

    def test_refused_everywhere(self):
        channel, transport = self.connect(self.site([Refusing(), Refusing()]))
        channel.dataReceived(b"GET /app HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))
        self.assertEqual([b.inflight for b in self.pool.backends], [0, 0])

    def test_all_out_of_rotation(self):
        channel, transport = self.connect(self.site([Refusing()]))
        self.pool.backends[0].in_rotation = False
        channel.dataReceived(b"GET /app HTTP/1.1\r\nHost: h\r\n\r\n")
        value = transport.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"))
        self.assertIn(b"Retry-After: 1\r\n", value)

    def test_response_timeout_is_504(self):
        hanging = Hanging()
        channel, transport = self.connect(self.site([hanging], response_timeout=5.0))
        channel.dataReceived(b"GET /app HTTP/1.1\r\nHost: h\r\n\r\n")
        self.clock.advance(4.9)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.1 + TICK)  # deadlines are met within a tick
        self.assertTrue(
            transport.value().startswith(b"HTTP/1.1 504 Gateway Timeout\r\n"),
            transport.value(),
        )
        self.assertEqual(hanging.cancelled, 1)
        self.assertEqual(self.pool.backends[0].inflight, 0)

    def test_client_gone_cancels_backend_request(self):
        hanging = Hanging()
        channel, _transport = self.connect(self.site([hanging]))
        channel.dataReceived(b"GET /app HTTP/1.1\r\nHost: h\r\n\r\n")
        channel.connectionLost(ConnectionRefusedError())
        self.assertEqual(hanging.cancelled, 1)
        self.assertEqual(self.pool.backends[0].inflight, 0)
        self.clock.advance(60)  # the response timer was cancelled too
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_least_connections_sees_in_flight(self):
        hold_a, hold_b = Hello(b"a"), Hello(b"b")
        a, b = InMemoryUpstream(hold_a), InMemoryUpstream(hold_b)
        site = self.site([a, b], balance="least_connections")
        for _ in range(3):
            channel, _ = self.connect(site)
            channel.dataReceived(b"GET /app/hold HTTP/1.1\r\nHost: h\r\n\r\n")
            a.agent.flush()
            b.agent.flush()
        self.assertEqual([x.inflight for x in self.pool.backends], [2, 1])
        hold_a.held[0].finish()
        a.agent.flush()
        self.assertEqual([x.inflight for x in self.pool.backends], [1, 1])


class _Answering:
    """
    A backend twin that answers every request with one response head and
    no body.
    """

    def __init__(self, code: int, fields: list[tuple[bytes, bytes]]) -> None:
        self.code = code
        self.fields = fields

    def send(self, request, receiver):
        receiver.response_head(
            ResponseHead(b"1.1", self.code, b"X", Fields.of(self.fields), bodiless=True)
        )
        receiver.response_end()
        return _MemoryCall()

    def close(self):
        return succeed(None)


class RepresentationLengthTests(SynchronousTestCase):
    def test_valid_length_of_a_304_relayed(self):
        lb = MemoryBalancer([_Answering(304, [(b"Content-Length", b"42")])])
        _, transport = lb.get()
        self.assertIn(b"\r\nContent-Length: 42\r\n", transport.value())

    def test_malformed_length_of_a_304_not_relayed(self):
        for value in (b"abc", b"5, 6", b"-1"):
            lb = MemoryBalancer([_Answering(304, [(b"Content-Length", value)])])
            _, transport = lb.get()
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 304 X\r\n"))
            self.assertNotIn(b"Content-Length", transport.value(), value)


class _Streaming:
    """
    A backend twin that sends a head and the first bytes of a long body,
    then waits.
    """

    def __init__(self) -> None:
        self.cancelled = 0

    def send(self, request, receiver):
        def cancelled():
            self.cancelled += 1

        call = _MemoryCall(cancelled)
        receiver.response_head(
            ResponseHead(b"1.1", 200, b"OK", Fields(), length=1_000_000)
        )
        receiver.response_body(b"x" * 1000)
        return call

    def close(self):
        return succeed(None)


class SendTimeoutTests(SynchronousTestCase):
    def test_client_that_stops_reading_loses_the_exchange(self):
        backend = _Streaming()
        lb = MemoryBalancer([backend], idle_timeout=300.0)
        _, transport = lb.get()
        relay = transport.producer
        relay.pauseProducing()  # the client's socket is full
        send_timeout = lb.site.limits.send_timeout
        lb.clock.advance(send_timeout - 2 * TICK)
        self.assertEqual(backend.cancelled, 0)
        self.assertFalse(transport.disconnecting)
        lb.clock.advance(3 * TICK)
        self.assertEqual(backend.cancelled, 1)
        self.assertTrue(transport.disconnecting)  # cut: the body is short
        self.assertEqual(lb.pool.backends[0].inflight, 0)
        self.assertFalse(lb.pool.backends[0].ejected)

    def test_a_reading_client_is_not_hurried(self):
        backend = _Streaming()
        lb = MemoryBalancer([backend], idle_timeout=300.0)
        _, transport = lb.get()
        relay = transport.producer
        relay.pauseProducing()
        lb.clock.advance(lb.site.limits.send_timeout / 2)
        relay.resumeProducing()  # the client read some
        lb.clock.advance(lb.site.limits.send_timeout)
        self.assertEqual(backend.cancelled, 0)
