"""
l7lb's HTTP/1.1 client for backends: framing of what it sends, strict
reading of what comes back, the keep-alive pool, the one retry of a stale
connection, and the call handle. Most tests run the real Upstream on a
MemoryReactorClock, with each connection on a StringTransport fed by hand;
the rest talk to a small Twisted backend on 127.0.0.1 in the same reactor.
"""

from __future__ import annotations

import io

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    NotConnectingError,
    UserError,
)
from twisted.internet.error import ConnectionRefusedError as Refused
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from l7lb.config import PoolConfig, ServerConfig
from l7lb.upstream import (
    MAX_RESPONSE_HEAD,
    BadResponse,
    ConnectFailed,
    NoResponse,
    ResponseCut,
    Upstream,
    UpstreamRequest,
)
from tests.support import closed_port
from tests.twins import TICK

SERVER = ServerConfig("http://127.0.0.1:8080", "http", "127.0.0.1", 8080)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def get(target: bytes = b"/", method: bytes = b"GET", body=None) -> UpstreamRequest:
    length = 0 if body is None else len(body) if isinstance(body, bytes) else 0
    return UpstreamRequest(method, target, [(b"Host", b"h")], body, length)


class Receiver:
    """
    Records what an upstream request reports, in order; C{on_head} and
    C{on_body} run inside those callbacks.
    """

    def __init__(self, on_head=None, on_body=None) -> None:
        self.events: list[str] = []
        self.head = None
        self.body: list[bytes] = []
        self.error = None
        self.on_head = on_head
        self.on_body = on_body
        self.done: Deferred[None] = Deferred()

    def response_head(self, head) -> None:
        self.events.append("head")
        self.head = head
        if self.on_head is not None:
            self.on_head()

    def response_body(self, data: bytes) -> None:
        self.events.append("body")
        self.body.append(data)
        if self.on_body is not None:
            self.on_body(data)

    def response_end(self) -> None:
        self.events.append("end")
        self.done.callback(None)

    def response_failed(self, error) -> None:
        self.events.append("failed")
        self.error = error
        self.done.callback(None)

    @property
    def content(self) -> bytes:
        return b"".join(self.body)


class Connector:
    """
    A connection attempt on L{Reactor}, behaving as a TCP connector does:
    C{stopConnecting} while connecting fails the attempt at once.
    """

    def __init__(self, factory, host: str, port: int) -> None:
        self.factory = factory
        self.address = IPv4Address("TCP", host, port)
        self.state = "connecting"
        self.stoppedConnecting = False

    def stopConnecting(self) -> None:
        if self.state != "connecting":
            raise NotConnectingError()
        self.stoppedConnecting = True
        self.fail(UserError())

    def fail(self, reason: Exception) -> None:
        self.state = "disconnected"
        self.factory.clientConnectionFailed(self, Failure(reason))

    def disconnect(self) -> None:
        self.state = "disconnected"

    def getDestination(self):
        return self.address


class Reactor(MemoryReactorClock):
    """
    Records connection attempts, each with a L{Connector}.
    """

    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
        self.tcpClients.append((host, port, factory, timeout, bindAddress))
        connector = Connector(factory, host, port)
        self.connectors.append(connector)
        factory.startedConnecting(connector)
        return connector


class Memory:
    """
    An Upstream on a MemoryReactorClock; C{accept(i)} completes its i-th
    connection attempt on a StringTransport.
    """

    def __init__(self, **pool_options) -> None:
        self.reactor = Reactor()
        self.pool = PoolConfig("p", (SERVER,), **pool_options)
        self.upstream = Upstream(self.reactor, SERVER, self.pool)
        self.transports: list[StringTransport] = []
        self.protocols: list = []

    def send(self, request: UpstreamRequest | None = None, receiver=None):
        receiver = receiver if receiver is not None else Receiver()
        call = self.upstream.send(request if request is not None else get(), receiver)
        return receiver, call

    @property
    def attempts(self) -> int:
        return len(self.reactor.tcpClients)

    def accept(self, index: int = -1):
        _, _, factory, _, _ = self.reactor.tcpClients[index]
        connector = self.reactor.connectors[index]
        assert connector.state == "connecting"
        protocol = factory.buildProtocol(connector.address)
        connector.state = "connected"
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.protocols.append(protocol)
        self.transports.append(transport)
        return protocol, transport

    def refuse(self, index: int, reason: Exception) -> None:
        self.reactor.connectors[index].fail(reason)

    def exchange(self, response: bytes = OK, request: UpstreamRequest | None = None):
        """
        One request on a new connection, answered with C{response}.
        """
        receiver, _ = self.send(request)
        protocol, transport = self.accept()
        protocol.dataReceived(response)
        return receiver, protocol, transport


class RequestHeadTests(SynchronousTestCase):
    def test_get_has_no_length(self):
        request = UpstreamRequest(b"GET", b"/x?y", [(b"Host", b"h"), (b"X-a", b"1")])
        self.assertEqual(
            request.head(), b"GET /x?y HTTP/1.1\r\nHost: h\r\nX-a: 1\r\n\r\n"
        )

    def test_length_comes_first(self):
        request = UpstreamRequest(b"POST", b"/p", [(b"Host", b"h")], b"hello", 5)
        self.assertEqual(
            request.head(), b"POST /p HTTP/1.1\r\nContent-Length: 5\r\nHost: h\r\n\r\n"
        )

    def test_empty_body_of_methods_expecting_one(self):
        for method in (b"POST", b"PUT", b"PATCH"):
            request = UpstreamRequest(method, b"/", [(b"Host", b"h")])
            self.assertEqual(
                request.head(),
                method + b" / HTTP/1.1\r\nContent-Length: 0\r\nHost: h\r\n\r\n",
            )

    def test_no_length_for_other_empty_bodies(self):
        for method in (b"GET", b"HEAD", b"DELETE", b"OPTIONS"):
            request = UpstreamRequest(method, b"/", [(b"Host", b"h")], b"", 0)
            self.assertNotIn(b"Content-Length", request.head(), method)

    def test_body_of_any_method_framed(self):
        request = UpstreamRequest(b"DELETE", b"/", [], b"abc", 3)
        self.assertEqual(
            request.head(), b"DELETE / HTTP/1.1\r\nContent-Length: 3\r\n\r\n"
        )

    def test_fields_order_and_spelling_kept(self):
        fields = [(b"x-B", b"2"), (b"Host", b"h"), (b"X-b", b"3")]
        request = UpstreamRequest(b"GET", b"/", fields)
        self.assertEqual(
            request.head(), b"GET / HTTP/1.1\r\nx-B: 2\r\nHost: h\r\nX-b: 3\r\n\r\n"
        )


class SendingTests(SynchronousTestCase):
    def test_request_written_in_one_piece(self):
        memory = Memory()
        memory.send(get(b"/p", b"POST", b"hello"))
        self.assertEqual(memory.attempts, 1)
        _, transport = memory.accept()
        self.assertEqual(
            transport.value(),
            b"POST /p HTTP/1.1\r\nContent-Length: 5\r\nHost: h\r\n\r\nhello",
        )

    def test_file_body_streamed(self):
        memory = Memory()
        content = bytes(range(256)) * 1000
        memory.send(
            UpstreamRequest(b"PUT", b"/f", [], io.BytesIO(content), len(content))
        )
        protocol, transport = memory.accept()
        self.assertEqual(
            transport.value(),
            b"PUT /f HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(content) + content,
        )
        self.assertIsNone(transport.producer)
        protocol.dataReceived(OK)
        self.assertEqual(len(memory.upstream.idle_connections), 1)

    def test_connect_timeout_passed_to_the_reactor(self):
        memory = Memory(connect_timeout=1.5)
        memory.send()
        self.assertEqual(memory.reactor.tcpClients[0][:2], ("127.0.0.1", 8080))
        self.assertEqual(memory.reactor.tcpClients[0][3], 1.5)

    def test_connect_timeout(self):
        memory = Memory()
        receiver, _ = memory.send()
        memory.refuse(0, ConnectTimeout())
        self.assertEqual(receiver.events, ["failed"])
        self.assertIsInstance(receiver.error, ConnectFailed)
        self.assertTrue(receiver.error.timed_out)

    def test_connection_refused(self):
        memory = Memory()
        receiver, _ = memory.send()
        memory.refuse(0, Refused())
        self.assertIsInstance(receiver.error, ConnectFailed)
        self.assertFalse(receiver.error.timed_out)


class PoolTests(SynchronousTestCase):
    def test_connection_reused(self):
        memory = Memory()
        first, protocol, transport = memory.exchange()
        self.assertEqual(first.events, ["head", "body", "end"])
        second, _ = memory.send(get(b"/again"))
        self.assertEqual(memory.attempts, 1)
        self.assertTrue(
            transport.value().endswith(b"GET /again HTTP/1.1\r\nHost: h\r\n\r\n")
        )
        protocol.dataReceived(OK)
        self.assertEqual(second.events, ["head", "body", "end"])

    def test_most_recently_used_first(self):
        memory = Memory()
        memory.send(get(b"/a"))
        memory.send(get(b"/b"))
        (pa, ta), (pb, tb) = memory.accept(0), memory.accept(1)
        pb.dataReceived(OK)
        pa.dataReceived(OK)  # the last to go idle
        ta.clear()
        tb.clear()
        memory.send(get(b"/c"))
        self.assertEqual(ta.value(), b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(tb.value(), b"")
        memory.send(get(b"/d"))
        self.assertEqual(tb.value(), b"GET /d HTTP/1.1\r\nHost: h\r\n\r\n")
        memory.send(get(b"/e"))
        self.assertEqual(memory.attempts, 3)

    def test_idle_connections_bounded(self):
        memory = Memory(keepalive_connections=1)
        memory.send()
        memory.send()
        (pa, ta), (pb, tb) = memory.accept(0), memory.accept(1)
        pa.dataReceived(OK)
        pb.dataReceived(OK)
        self.assertEqual(len(memory.upstream.idle_connections), 1)
        self.assertFalse(ta.disconnecting)
        self.assertTrue(tb.disconnecting)

    def test_no_idle_connections_kept(self):
        memory = Memory(keepalive_connections=0)
        receiver, _, transport = memory.exchange()
        self.assertEqual(receiver.events, ["head", "body", "end"])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(memory.upstream.idle_connections, [])

    def test_keepalive_timeout(self):
        memory = Memory(keepalive_timeout=10.0)
        _, _, transport = memory.exchange()
        memory.reactor.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(len(memory.upstream.idle_connections), 1)
        memory.reactor.advance(0.1 + TICK)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(memory.upstream.idle_connections, [])
        self.assertEqual(memory.reactor.getDelayedCalls(), [])
        memory.send()
        self.assertEqual(memory.attempts, 2)

    def test_keepalive_timeout_restarts_with_each_idle_spell(self):
        memory = Memory(keepalive_timeout=10.0)
        _, protocol, transport = memory.exchange()
        memory.reactor.advance(8)
        memory.send()
        memory.reactor.advance(8)  # busy: no idle deadline
        protocol.dataReceived(OK)
        memory.reactor.advance(8)
        self.assertFalse(transport.disconnecting)
        memory.reactor.advance(2 + TICK)
        self.assertTrue(transport.disconnecting)

    def test_no_timer_while_nothing_is_idle(self):
        memory = Memory()
        memory.send()
        memory.accept()
        self.assertEqual(memory.reactor.getDelayedCalls(), [])

    def test_idle_connection_lost(self):
        memory = Memory()
        _, protocol, _ = memory.exchange()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(memory.upstream.idle_connections, [])
        self.assertEqual(memory.reactor.getDelayedCalls(), [])
        memory.send()
        self.assertEqual(memory.attempts, 2)

    def test_bytes_on_an_idle_connection(self):
        memory = Memory()
        _, protocol, transport = memory.exchange()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(memory.upstream.idle_connections, [])

    def test_close(self):
        memory = Memory()
        memory.send()
        memory.send()
        (pa, ta), (pb, tb) = memory.accept(0), memory.accept(1)
        pa.dataReceived(OK)
        closed = memory.upstream.close()
        self.assertTrue(ta.disconnecting)
        self.assertFalse(tb.disconnecting)  # still answering
        self.assertNoResult(closed)
        pa.connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(closed)  # the busy one is still open
        # The busy one is closed once answered, not pooled.
        pb.dataReceived(OK)
        self.assertTrue(tb.disconnecting)
        self.assertEqual(memory.upstream.idle_connections, [])
        pb.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(closed)

    def test_close_with_nothing_idle(self):
        self.successResultOf(Memory().upstream.close())


class StaleConnectionTests(SynchronousTestCase):
    def stale(self, request: UpstreamRequest, memory: Memory | None = None):
        """
        Send C{request} on a pooled connection that the backend then closes
        without a byte of response.
        """
        memory = memory or Memory()
        memory.exchange()
        receiver, call = memory.send(request)
        self.assertEqual(memory.attempts, 1)
        memory.protocols[0].connectionLost(Failure(ConnectionDone()))
        return memory, receiver, call

    def test_get_retried_on_a_new_connection(self):
        memory, receiver, _ = self.stale(get(b"/r"))
        self.assertEqual(receiver.events, [])
        self.assertEqual(memory.attempts, 2)
        protocol, transport = memory.accept()
        self.assertEqual(transport.value(), b"GET /r HTTP/1.1\r\nHost: h\r\n\r\n")
        protocol.dataReceived(OK)
        self.assertEqual(receiver.events, ["head", "body", "end"])

    def test_other_idempotent_methods_retried(self):
        for method in (b"HEAD", b"DELETE", b"PUT", b"OPTIONS"):
            memory, receiver, _ = self.stale(get(b"/", method))
            self.assertEqual((receiver.events, memory.attempts), ([], 2), method)

    def test_post_not_retried(self):
        memory, receiver, _ = self.stale(get(b"/p", b"POST", b"data"))
        self.assertEqual(receiver.events, ["failed"])
        self.assertIsInstance(receiver.error, NoResponse)
        self.assertEqual(memory.attempts, 1)

    def test_empty_post_not_retried(self):
        memory, receiver, _ = self.stale(get(b"/p", b"POST"))
        self.assertIsInstance(receiver.error, NoResponse)
        self.assertEqual(memory.attempts, 1)

    def test_request_with_a_body_not_retried(self):
        memory, receiver, _ = self.stale(get(b"/p", b"PUT", b"data"))
        self.assertIsInstance(receiver.error, NoResponse)
        self.assertEqual(memory.attempts, 1)

    def test_retried_once_only(self):
        memory, receiver, _ = self.stale(get(b"/r"))
        protocol, _ = memory.accept()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(receiver.events, ["failed"])
        self.assertIsInstance(receiver.error, NoResponse)
        self.assertEqual(memory.attempts, 2)

    def test_not_retried_after_a_response_byte(self):
        memory = Memory()
        memory.exchange()
        receiver, _ = memory.send(get(b"/r"))
        memory.protocols[0].dataReceived(b"HTTP/1.1 2")
        memory.protocols[0].connectionLost(Failure(ConnectionLost()))
        self.assertIsInstance(receiver.error, NoResponse)
        self.assertEqual(memory.attempts, 1)

    def test_new_connection_not_retried(self):
        memory = Memory()
        receiver, _ = memory.send(get(b"/r"))
        protocol, _ = memory.accept()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIsInstance(receiver.error, NoResponse)
        self.assertEqual(memory.attempts, 1)

    def test_call_follows_the_retry(self):
        memory, receiver, call = self.stale(get(b"/r"))
        protocol, transport = memory.accept()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        call.pause()
        self.assertEqual(transport.producerState, "paused")
        call.cancel()
        self.assertTrue(transport.disconnected)
        protocol.dataReceived(b"cd")
        self.assertEqual(receiver.events, ["head", "body"])

    def test_cancelled_during_the_retry_connect(self):
        memory, receiver, call = self.stale(get(b"/r"))
        call.cancel()
        self.assertTrue(memory.reactor.connectors[1].stoppedConnecting)
        self.assertEqual(receiver.events, [])


class ResponseFramingTests(SynchronousTestCase):
    def test_interim_responses_skipped(self):
        memory = Memory()
        receiver, _, _ = memory.exchange(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n" + OK
        )
        self.assertEqual(receiver.events, ["head", "body", "end"])
        self.assertEqual(receiver.head.code, 200)
        self.assertNotIn(b"link", receiver.head.fields)
        self.assertEqual(len(memory.upstream.idle_connections), 1)

    def test_interim_response_in_its_own_read(self):
        memory = Memory()
        receiver, protocol, _ = memory.exchange(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(receiver.events, [])
        protocol.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(receiver.events, ["head", "end"])
        self.assertEqual(receiver.head.code, 201)

    def test_switching_protocols_refused(self):
        memory = Memory()
        receiver, _, transport = memory.exchange(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
        )
        self.assertEqual(receiver.events, ["failed"])
        self.assertIsInstance(receiver.error, BadResponse)
        self.assertTrue(transport.disconnected)
        self.assertEqual(memory.upstream.idle_connections, [])

    def test_head_fields_reported_as_sent(self):
        receiver, _, _ = Memory().exchange(
            b"HTTP/1.1 404 Not Here\r\nX-A:  1 \r\nConnection: x-a\r\n"
            b"content-length: 0\r\n\r\n"
        )
        head = receiver.head
        self.assertEqual(
            (head.version, head.code, head.reason), (b"1.1", 404, b"Not Here")
        )
        self.assertEqual(
            list(head.fields),
            [(b"X-A", b"1"), (b"Connection", b"x-a"), (b"content-length", b"0")],
        )
        self.assertEqual(head.length, 0)

    def test_empty_reason(self):
        receiver, _, _ = Memory().exchange(b"HTTP/1.1 204 \r\n\r\n")
        self.assertEqual((receiver.head.code, receiver.head.reason), (204, b""))

    def test_malformed_heads(self):
        for head in (
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 20 OK",
            b"HTTP/1.1 099 Low",
            b"HTTP/1.1 600 High",
            b"HTTP/1.1 abc OK",
            b"HTTP/2 200 OK",
            b"HTTP/1.x 200 OK",
            b"ICY 200 OK",
            b"HTTP/1.1 200 OK\r\nBad Name: v",
            b"HTTP/1.1 200 OK\r\nNo-Colon",
            b"HTTP/1.1 200 OK\r\n folded",
            b"HTTP/1.1 200 OK\r\nX: a\x00b",
            b"HTTP/1.1 200 OK\r\nX: a\nY: b",
        ):
            receiver, _, transport = Memory().exchange(head + b"\r\n\r\n")
            self.assertEqual(receiver.events, ["failed"], head)
            self.assertIsInstance(receiver.error, BadResponse)
            self.assertTrue(transport.disconnected, head)

    def test_content_lengths_that_agree(self):
        for fields in (
            b"Content-Length: 5, 5\r\n",
            b"Content-Length: 5\r\nContent-Length: 5\r\n",
            b"Content-Length: 5,5\r\ncontent-length: 5\r\n",
        ):
            memory = Memory()
            receiver, _, _ = memory.exchange(
                b"HTTP/1.1 200 OK\r\n" + fields + b"\r\nhello"
            )
            self.assertEqual(receiver.events, ["head", "body", "end"], fields)
            self.assertEqual((receiver.head.length, receiver.content), (5, b"hello"))
            self.assertEqual(len(memory.upstream.idle_connections), 1, fields)

    def test_content_lengths_that_differ(self):
        for fields in (
            b"Content-Length: 5, 6\r\n",
            b"Content-Length: 5\r\nContent-Length: 6\r\n",
        ):
            receiver, _, transport = Memory().exchange(
                b"HTTP/1.1 200 OK\r\n" + fields + b"\r\nhello"
            )
            self.assertEqual(receiver.events, ["failed"], fields)
            self.assertIsInstance(receiver.error, BadResponse)
            self.assertTrue(transport.disconnected)

    def test_malformed_content_length(self):
        for value in (b"abc", b"-1", b"+5", b"5.0", b"1" * 19, b""):
            receiver, _, _ = Memory().exchange(
                b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\n"
            )
            self.assertIsInstance(receiver.error, BadResponse, value)

    def test_body_in_pieces(self):
        memory = Memory()
        receiver, protocol, _ = memory.exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n012"
        )
        protocol.dataReceived(b"3456")
        self.assertEqual(receiver.events, ["head", "body", "body"])
        protocol.dataReceived(b"789")
        self.assertEqual(receiver.content, b"0123456789")
        self.assertEqual(receiver.events[-1], "end")
        self.assertEqual(len(memory.upstream.idle_connections), 1)

    def test_bytes_past_the_length_not_reused(self):
        memory = Memory()
        receiver, _, transport = memory.exchange(OK + b"HTTP/1.1 200 OK\r\n")
        self.assertEqual((receiver.content, receiver.events[-1]), (b"ok", "end"))
        self.assertEqual(memory.upstream.idle_connections, [])
        self.assertTrue(transport.disconnecting)

    def test_chunked_pieces_joined_per_read(self):
        memory = Memory()
        receiver, protocol, _ = memory.exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n4;x=y\r\ndefg\r\n1\r\nh\r\n"
        )
        self.assertTrue(receiver.head.chunked)
        self.assertIsNone(receiver.head.length)
        self.assertEqual(receiver.body, [b"abcdefgh"])
        protocol.dataReceived(b"2\r\nij\r\n0\r\nX-Trailer: t\r\n\r\n")
        self.assertEqual(receiver.body, [b"abcdefgh", b"ij"])
        self.assertEqual(receiver.events, ["head", "body", "body", "end"])
        self.assertEqual(len(memory.upstream.idle_connections), 1)

    def test_chunked_split_anywhere(self):
        response = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        for cut in range(1, len(response)):
            memory = Memory()
            receiver, protocol, _ = memory.exchange(response[:cut])
            protocol.dataReceived(response[cut:])
            self.assertEqual(receiver.content, b"hello world", cut)
            self.assertEqual(receiver.events[-1], "end", cut)
            self.assertEqual(len(memory.upstream.idle_connections), 1, cut)

    def test_chunked_with_no_data_delivers_nothing_empty(self):
        receiver, protocol, _ = Memory().exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        protocol.dataReceived(b"0\r\n\r\n")
        self.assertEqual(receiver.events, ["head", "end"])

    def test_malformed_chunked_body(self):
        memory = Memory()
        receiver, protocol, transport = memory.exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
        )
        protocol.dataReceived(b"zz\r\n")
        self.assertEqual(receiver.events, ["head", "body", "failed"])
        self.assertIsInstance(receiver.error, ResponseCut)
        self.assertTrue(transport.disconnected)
        self.assertEqual(memory.upstream.idle_connections, [])

    def test_transfer_encoding_and_content_length_not_reused(self):
        memory = Memory()
        receiver, _, transport = memory.exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        self.assertEqual(receiver.content, b"abc")
        self.assertEqual(receiver.events[-1], "end")
        self.assertEqual(memory.upstream.idle_connections, [])
        self.assertTrue(transport.disconnecting)

    def test_transfer_encodings_other_than_chunked(self):
        for value in (b"gzip", b"gzip, chunked", b"chunked, chunked", b"identity"):
            receiver, _, _ = Memory().exchange(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + value + b"\r\n\r\n"
            )
            self.assertIsInstance(receiver.error, BadResponse, value)

    def test_transfer_encoding_chunked_split_over_fields(self):
        receiver, _, _ = Memory().exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        self.assertIsInstance(receiver.error, BadResponse)

    def test_head_response_has_no_body(self):
        memory = Memory()
        receiver, _, _ = memory.exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", get(b"/", b"HEAD")
        )
        self.assertEqual(receiver.events, ["head", "end"])
        self.assertTrue(receiver.head.bodiless)
        self.assertEqual(len(memory.upstream.idle_connections), 1)

    def test_head_response_with_chunked_has_no_body(self):
        memory = Memory()
        receiver, _, _ = memory.exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", get(b"/", b"HEAD")
        )
        self.assertEqual(receiver.events, ["head", "end"])
        self.assertEqual(len(memory.upstream.idle_connections), 1)

    def test_204_and_304_have_no_body(self):
        for status in (b"204 No Content", b"304 Not Modified"):
            memory = Memory()
            receiver, _, _ = memory.exchange(
                b"HTTP/1.1 " + status + b"\r\nContent-Length: 7\r\n\r\n"
            )
            self.assertEqual(receiver.events, ["head", "end"], status)
            self.assertTrue(receiver.head.bodiless)
            self.assertEqual(len(memory.upstream.idle_connections), 1, status)

    def test_bytes_after_a_bodiless_response_not_reused(self):
        memory = Memory()
        receiver, _, transport = memory.exchange(b"HTTP/1.1 204 No Content\r\n\r\njunk")
        self.assertEqual(receiver.events, ["head", "end"])
        self.assertEqual(memory.upstream.idle_connections, [])
        self.assertTrue(transport.disconnecting)

    def test_close_delimited_body(self):
        memory = Memory()
        receiver, protocol, _ = memory.exchange(b"HTTP/1.1 200 OK\r\n\r\nsome")
        protocol.dataReceived(b" more")
        self.assertEqual(receiver.events, ["head", "body", "body"])
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(receiver.events, ["head", "body", "body", "end"])
        self.assertEqual(receiver.content, b"some more")
        self.assertEqual(memory.upstream.idle_connections, [])

    def test_close_delimited_empty_body(self):
        receiver, protocol, _ = Memory().exchange(b"HTTP/1.0 200 OK\r\n\r\n")
        self.assertEqual(receiver.events, ["head"])
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(receiver.events, ["head", "end"])

    def test_length_framed_body_cut(self):
        receiver, protocol, _ = Memory().exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234"
        )
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(receiver.events, ["head", "body", "failed"])
        self.assertIsInstance(receiver.error, ResponseCut)

    def test_chunked_body_cut(self):
        receiver, protocol, _ = Memory().exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
        )
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIsInstance(receiver.error, ResponseCut)

    def test_connection_close_not_reused(self):
        memory = Memory()
        receiver, _, transport = memory.exchange(
            b"HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 2\r\n\r\nok"
        )
        self.assertEqual(receiver.events, ["head", "body", "end"])
        self.assertEqual(memory.upstream.idle_connections, [])
        self.assertTrue(transport.disconnecting)

    def test_http_1_0_reused_only_with_keep_alive(self):
        memory = Memory()
        memory.exchange(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(memory.upstream.idle_connections, [])
        memory = Memory()
        receiver, _, _ = memory.exchange(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
        )
        self.assertEqual(receiver.head.version, b"1.0")
        self.assertEqual(len(memory.upstream.idle_connections), 1)

    def test_head_over_the_limit_refused_before_its_end(self):
        receiver, protocol, transport = Memory().exchange(
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_RESPONSE_HEAD // 2)
        )
        self.assertEqual(receiver.events, [])
        protocol.dataReceived(b"a" * (MAX_RESPONSE_HEAD // 2))
        self.assertEqual(receiver.events, ["failed"])
        self.assertIsInstance(receiver.error, BadResponse)
        self.assertTrue(transport.disconnected)

    def test_whole_head_over_the_limit_refused(self):
        receiver, _, _ = Memory().exchange(
            b"HTTP/1.1 200 OK\r\nX-Big: "
            + b"a" * MAX_RESPONSE_HEAD
            + b"\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertIsInstance(receiver.error, BadResponse)

    def test_head_under_the_limit_accepted(self):
        big = b"a" * (MAX_RESPONSE_HEAD - 100)
        receiver, _, _ = Memory().exchange(
            b"HTTP/1.1 200 OK\r\nX-Big: " + big + b"\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertEqual(receiver.events, ["head", "end"])
        self.assertEqual(receiver.head.fields.first(b"x-big"), big)

    def test_no_response_before_the_head(self):
        receiver, protocol, _ = Memory().exchange(b"HTTP/1.1 200 OK\r\nX: ")
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(receiver.events, ["failed"])
        self.assertIsInstance(receiver.error, NoResponse)


class CallTests(SynchronousTestCase):
    def test_pause_and_resume_the_body(self):
        memory = Memory()
        receiver, call = memory.send()
        protocol, transport = memory.accept()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        call.pause()
        self.assertEqual(transport.producerState, "paused")
        call.resume()
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(b"cd")
        self.assertEqual(receiver.events, ["head", "body", "body", "end"])

    def test_cancel_mid_body(self):
        memory = Memory()
        receiver, call = memory.send()
        protocol, transport = memory.accept()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        call.cancel()
        self.assertTrue(transport.disconnected)
        protocol.dataReceived(b"cd")
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(receiver.events, ["head", "body"])
        self.assertEqual(memory.upstream.idle_connections, [])
        call.cancel()  # twice: harmless
        call.pause()
        call.resume()

    def test_cancel_before_the_head(self):
        memory = Memory()
        receiver, call = memory.send()
        protocol, transport = memory.accept()
        call.cancel()
        self.assertTrue(transport.disconnected)
        protocol.dataReceived(OK)
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(receiver.events, [])
        self.assertEqual(memory.upstream.idle_connections, [])

    def test_cancel_while_connecting(self):
        memory = Memory()
        receiver, call = memory.send()
        call.cancel()
        self.assertTrue(memory.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(receiver.events, [])

    def test_cancel_inside_the_head_callback(self):
        memory = Memory()
        calls = []
        receiver = Receiver(on_head=lambda: calls[0].cancel())
        _, call = memory.send(receiver=receiver)
        calls.append(call)
        protocol, transport = memory.accept()
        protocol.dataReceived(OK)
        self.assertEqual(receiver.events, ["head"])
        self.assertTrue(transport.disconnected)
        self.assertEqual(memory.upstream.idle_connections, [])

    def test_cancel_inside_the_last_body_callback(self):
        for response in (
            OK,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ):
            memory = Memory()
            calls = []
            receiver = Receiver(on_body=lambda _, calls=calls: calls[0].cancel())
            _, call = memory.send(receiver=receiver)
            calls.append(call)
            protocol, transport = memory.accept()
            protocol.dataReceived(response)
            self.assertEqual(receiver.events, ["head", "body"], response)
            self.assertTrue(transport.disconnected, response)
            # An aborted connection must not be handed to the next request.
            self.assertEqual(memory.upstream.idle_connections, [], response)

    def test_dead_call_does_not_touch_the_next_request(self):
        memory = Memory()
        first, call = memory.send()
        protocol, transport = memory.accept()
        protocol.dataReceived(OK)
        self.assertEqual(first.events, ["head", "body", "end"])
        second, _ = memory.send()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        call.pause()
        call.cancel()
        self.assertEqual(transport.producerState, "producing")
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"cd")
        self.assertEqual(second.events, ["head", "body", "body", "end"])

    def test_paused_at_the_end_pooled_reading(self):
        """
        A slow client pauses the call inside the last body callback; the
        response is complete, so the proxy never resumes that (now dead)
        call. The connection must not go back to the pool paused: the next
        request's response would never be read.
        """
        memory = Memory()
        calls = []
        receiver = Receiver(on_body=lambda _: calls[0].pause())
        _, call = memory.send(receiver=receiver)
        calls.append(call)
        protocol, transport = memory.accept()
        protocol.dataReceived(OK)
        self.assertEqual(receiver.events, ["head", "body", "end"])
        call.resume()  # what the proxy does later: a no-op on a dead call
        memory.send()
        self.assertEqual(memory.attempts, 1)
        self.assertEqual(transport.producerState, "producing")


class BackendProtocol(Protocol):
    """
    Reads requests (with Content-Length bodies) and answers each as the
    factory's script says.
    """

    def connectionMade(self) -> None:
        self.buffer = b""
        self.requests: list[bytes] = []
        self.lost: Deferred[None] = Deferred()
        self.index = len(self.factory.connections)
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while self.transport.connected and not self.transport.disconnecting:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            self.requests.append(head)
            answer, close = self.factory.script(self.index, len(self.requests) - 1)
            if answer:
                self.transport.write(answer)
            if close:
                self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)


class Backend(Factory):
    protocol = BackendProtocol

    def __init__(self, script) -> None:
        self.script = script
        self.connections: list[BackendProtocol] = []


class RealSocketTests(TestCase):
    """
    The real client against a Twisted backend on 127.0.0.1.
    """

    def start(self, script, **pool_options) -> Upstream:
        backend = self.backend = Backend(script)
        port = reactor.listenTCP(0, backend, interface="127.0.0.1")
        number = port.getHost().port
        server = ServerConfig(f"http://127.0.0.1:{number}", "http", "127.0.0.1", number)
        upstream = Upstream(reactor, server, PoolConfig("p", (server,), **pool_options))

        def stop():
            closing = upstream.close()
            return gatherResults(
                [
                    closing,
                    port.stopListening(),
                    *(c.lost for c in backend.connections),
                ]
            )

        self.addCleanup(stop)
        return upstream

    @inlineCallbacks
    def fetch(self, upstream: Upstream, request: UpstreamRequest | None = None):
        receiver = Receiver()
        upstream.send(request if request is not None else get(), receiver)
        yield receiver.done
        return receiver

    @inlineCallbacks
    def test_connection_reused(self):
        upstream = self.start(
            lambda c, r: (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % r, False)
        )
        first = yield self.fetch(upstream, get(b"/1"))
        second = yield self.fetch(upstream, get(b"/2"))
        self.assertEqual((first.content, second.content), (b"0", b"1"))
        self.assertEqual(len(self.backend.connections), 1)
        self.assertEqual(
            [h.split(b"\r\n")[0] for h in self.backend.connections[0].requests],
            [b"GET /1 HTTP/1.1", b"GET /2 HTTP/1.1"],
        )
        self.assertEqual(len(upstream.idle_connections), 1)

    def stale_script(self, connection: int, request: int):
        """
        The first connection answers one request, then closes when the next
        arrives (its keep-alive timeout racing the request); later
        connections answer.
        """
        if connection == 0 and request == 1:
            return None, True
        return OK, False

    @inlineCallbacks
    def test_stale_connection_retried_for_get(self):
        upstream = self.start(self.stale_script)
        yield self.fetch(upstream)
        receiver = yield self.fetch(upstream, get(b"/again"))
        self.assertEqual(receiver.events, ["head", "body", "end"])
        self.assertEqual(len(self.backend.connections), 2)
        self.assertEqual(
            self.backend.connections[1].requests[0].split(b"\r\n")[0],
            b"GET /again HTTP/1.1",
        )

    @inlineCallbacks
    def test_stale_connection_not_retried_for_post(self):
        upstream = self.start(self.stale_script)
        yield self.fetch(upstream)
        receiver = yield self.fetch(upstream, get(b"/p", b"POST", b"data"))
        self.assertEqual(receiver.events, ["failed"])
        self.assertIsInstance(receiver.error, NoResponse)
        self.assertEqual(len(self.backend.connections), 1)

    @inlineCallbacks
    def test_close_delimited_body(self):
        body = bytes(range(256)) * 2000
        upstream = self.start(lambda c, r: (b"HTTP/1.1 200 OK\r\n\r\n" + body, True))
        receiver = yield self.fetch(upstream)
        self.assertEqual(receiver.events[-1], "end")
        self.assertEqual(receiver.content, body)
        self.assertEqual(upstream.idle_connections, [])

    @inlineCallbacks
    def test_large_chunked_body(self):
        chunks = [bytes([i]) * (1000 + i) for i in range(200)]
        response = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
            + b"0\r\n\r\n"
        )
        upstream = self.start(lambda c, r: (response, False))
        receiver = yield self.fetch(upstream)
        self.assertEqual(receiver.events[-1], "end")
        self.assertEqual(receiver.content, b"".join(chunks))
        self.assertNotIn(b"", receiver.body)
        self.assertEqual(len(upstream.idle_connections), 1)

    @inlineCallbacks
    def test_connection_refused(self):
        port = closed_port()
        server = ServerConfig(f"http://127.0.0.1:{port}", "http", "127.0.0.1", port)
        upstream = Upstream(reactor, server, PoolConfig("p", (server,)))
        receiver = yield self.fetch(upstream)
        self.assertEqual(receiver.events, ["failed"])
        self.assertIsInstance(receiver.error, ConnectFailed)
        self.assertFalse(receiver.error.timed_out)
