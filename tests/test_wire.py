"""
write_now on real TCP connections over 127.0.0.1: bytes leave in the call
when nothing is queued ahead of them, wait their turn when something is,
and go through the transport as usual for anything but plain TCP.

The far end of each connection is a plain non-blocking socket, read with
C{MSG_DONTWAIT} right after the call: over loopback a byte the kernel has
taken is already readable there, and a byte Twisted merely queued cannot be
until the reactor runs.
"""

from __future__ import annotations

import select
import socket

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from l7lb.wire import write_now

DEADLINE = 5.0


class _Quiet(Protocol):
    def __init__(self) -> None:
        self.made: Deferred[_Quiet] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)


def received_now(peer: socket.socket) -> bytes:
    """
    What the peer can read this instant, without letting the reactor run.
    """
    try:
        return peer.recv(1 << 20, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


class WriteNowTests(TestCase):
    def closing(self, protocol: _Quiet) -> None:
        def close():
            if protocol.transport is not None and protocol.transport.connected:
                protocol.transport.abortConnection()
                return protocol.lost
            return None

        self.addCleanup(close)

    @inlineCallbacks
    def server_side(self, receive_buffer: int | None = None):
        """
        A connection accepted by a Twisted listener (a C{tcp.Server}
        transport), and the plain socket at its other end.
        """
        protocols: list[_Quiet] = []

        class _Factory(Factory):
            def buildProtocol(self, addr):
                protocols.append(_Quiet())
                return protocols[-1]

        port = reactor.listenTCP(0, _Factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        peer = socket.socket()
        self.addCleanup(peer.close)
        if receive_buffer is not None:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        peer.connect(("127.0.0.1", port.getHost().port))
        peer.setblocking(False)
        yield self.until(lambda: protocols)
        protocol = yield protocols[0].made
        self.closing(protocol)
        return protocol.transport, peer

    @inlineCallbacks
    def client_side(self):
        """
        A connection made by the reactor (a C{tcp.Client} transport), and
        the plain socket that accepted it.
        """
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        protocol = _Quiet()

        class _Factory(ClientFactory):
            def buildProtocol(self, addr):
                return protocol

        reactor.connectTCP("127.0.0.1", listener.getsockname()[1], _Factory())
        yield protocol.made
        self.closing(protocol)
        peer, _ = listener.accept()
        self.addCleanup(peer.close)
        peer.setblocking(False)
        return protocol.transport, peer

    @inlineCallbacks
    def until(self, condition, deadline: float = DEADLINE):
        waited = 0.0
        while not condition():
            if waited >= deadline:
                self.fail(f"condition not met within {deadline}s")
            yield deferLater(reactor, 0.001, lambda: None)
            waited += 0.001

    @inlineCallbacks
    def collect(self, peer: socket.socket, size: int):
        """
        Read C{size} bytes at the peer, letting the reactor run meanwhile.
        """
        parts: list[bytes] = []

        def enough():
            parts.append(received_now(peer))
            return sum(map(len, parts)) >= size

        yield self.until(enough)
        return b"".join(parts)

    def assertReadableAtOnce(self, peer: socket.socket, expected: bytes) -> None:
        """
        C{expected} is at the peer already: the reactor has not run since it
        was written.
        """
        data = b""
        while len(data) < len(expected):
            readable, _, _ = select.select([peer], [], [], DEADLINE)
            if not readable:
                break
            data += received_now(peer)
        self.assertEqual(data, expected)

    @inlineCallbacks
    def test_server_transport_sends_at_once(self):
        transport, peer = yield self.server_side()
        self.assertIs(type(transport), tcp.Server)
        write_now(transport, b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(transport.dataBuffer, b"")
        self.assertEqual(transport._tempDataBuffer, [])
        self.assertReadableAtOnce(peer, b"HTTP/1.1 200 OK\r\n\r\n")

    @inlineCallbacks
    def test_client_transport_sends_at_once(self):
        transport, peer = yield self.client_side()
        self.assertIs(type(transport), tcp.Client)
        write_now(transport, b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(transport._tempDataBuffer, [])
        self.assertReadableAtOnce(peer, b"GET / HTTP/1.1\r\n\r\n")

    @inlineCallbacks
    def test_plain_write_waits_for_the_reactor(self):
        """
        What the other tests tell apart: Twisted's own write queues the
        bytes, and the peer sees them only once the reactor has run.
        """
        transport, peer = yield self.server_side()
        transport.write(b"queued")
        self.assertEqual(received_now(peer), b"")
        data = yield self.collect(peer, 6)
        self.assertEqual(data, b"queued")

    @inlineCallbacks
    def test_queued_behind_buffered_bytes(self):
        transport, peer = yield self.server_side()
        transport.write(b"first,")
        write_now(transport, b"second,")
        write_now(transport, b"third")
        self.assertEqual(received_now(peer), b"")
        data = yield self.collect(peer, len(b"first,second,third"))
        self.assertEqual(data, b"first,second,third")

    @inlineCallbacks
    def test_what_the_socket_refuses_is_queued_in_order(self):
        transport, peer = yield self.server_side(receive_buffer=4096)
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        payload = bytes(range(251)) * 1200  # ~300 kB, far past both buffers
        write_now(transport, payload)
        self.assertTrue(transport.dataBuffer or transport._tempDataBuffer)
        first = received_now(peer)
        self.assertTrue(first, "nothing was sent at once")
        self.assertTrue(payload.startswith(first))
        write_now(transport, b"|tail")
        rest = yield self.collect(peer, len(payload) + 5 - len(first))
        self.assertEqual(first + rest, payload + b"|tail")

    @inlineCallbacks
    def test_tls_goes_through_the_transport(self):
        """
        After startTLS the bytes must be encrypted: nothing is written to
        the socket directly, even with nothing queued.
        """
        transport, peer = yield self.client_side()
        transport.startTLS(optionsForClientTLS("example.invalid"))
        self.assertIs(type(transport), tcp.Client)
        # The TLS layer's ClientHello goes out; then nothing is queued.
        hello = yield self.collect(peer, 1)
        yield self.until(lambda: not transport.dataBuffer)
        yield self.until(lambda: not transport._tempDataBuffer)
        write_now(transport, b"plaintext-secret")
        self.assertNotIn(b"plaintext-secret", hello + received_now(peer))

    @inlineCallbacks
    def test_nothing_sent_after_the_connection_is_lost(self):
        transport, peer = yield self.server_side()
        transport.abortConnection()
        write_now(transport, b"late")
        self.assertEqual(received_now(peer), b"")


class FallbackTests(SynchronousTestCase):
    def test_string_transport(self):
        transport = StringTransport()
        write_now(transport, b"one")
        write_now(transport, b"two")
        self.assertEqual(transport.value(), b"onetwo")

    def test_other_transport_types_use_write(self):
        """
        Only exactly Twisted's TCP transports are written to directly; a
        lookalike (a subclass, a wrapper) gets C{write}.
        """

        class Lookalike:
            dataBuffer = b""
            _tempDataBuffer: list[bytes] = []
            connected = True
            TLS = False
            _writeDisconnected = False

            def __init__(self):
                self.written: list[bytes] = []

            def writeSomeData(self, data):
                raise AssertionError("written directly")

            def write(self, data):
                self.written.append(data)

        transport = Lookalike()
        write_now(transport, b"data")
        self.assertEqual(transport.written, [b"data"])
