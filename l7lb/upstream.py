# -*- test-case-name: tests.test_upstream -*-
"""
Requests to one backend over a pool of keep-alive HTTP/1.1 connections.

The client is l7lb's own, made for a proxy hop: the request head is
written in one piece with the framing l7lb chose (one Content-Length or
none, never the client's copy); the response head is parsed strictly
(within L{MAX_RESPONSE_HEAD}; a repeated Content-Length must agree with
itself; 1xx interim responses are skipped) and reported with every field,
the Connection header included, so the proxy can drop what the backend
declared hop-by-hop; the body is delivered as it arrives, decoded from
chunked, and reading pauses while the client is slow. It reports through
callbacks (L{ResponseReceiver}) rather than Deferreds: a proxied request
costs no Deferred, no C{Headers} object and no URL parsing.

The pool keeps up to C{keepalive_connections} idle connections, most
recently used first, each for C{keepalive_timeout}. A request that finds a
reused connection closed by the backend before any response byte arrived
(the backend's own keep-alive timeout racing the request) is sent again on
a new connection when that is safe: an idempotent method without a body.
"""

from __future__ import annotations

import ipaddress
from typing import IO, Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import (
    IConsumer,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ClientFactory, connectionDone
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from l7lb.chunked import ChunkedDecoder, FramingError
from l7lb.config import PoolConfig, ServerConfig
from l7lb.deadlines import NEVER, Deadlines
from l7lb.errors import describe_failure
from l7lb.fields import FieldError, Fields, check_head, parse_field_lines
from l7lb.headers import connection_tokens
from l7lb.tls import backend_tls
from l7lb.wire import write_now

# A backend's response head (status line and header fields) larger than this
# is an invalid response (502).
MAX_RESPONSE_HEAD = 64 * 1024
# RFC 9110 section 9.2.2: methods that may be sent twice.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# RFC 9110 section 6.4.1: responses that never have a body.
_BODILESS_CODES = frozenset({204, 304})
# Methods whose request carries content by definition: an empty one gets
# an explicit Content-Length: 0.
_EXPECTING_BODY = frozenset({b"POST", b"PUT", b"PATCH"})


class UpstreamError(Exception):
    """
    A request to a backend failed; the subclass says when.
    """


class ConnectFailed(UpstreamError):
    """
    No connection to the backend (refused, unreachable, or timed out).
    """

    def __init__(self, reason: str, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


class NoResponse(UpstreamError):
    """
    The connection closed or failed before a whole response head arrived.
    """


class BadResponse(UpstreamError):
    """
    The backend's response is not valid HTTP/1.1.
    """


class ResponseCut(UpstreamError):
    """
    The connection failed, or the framing broke, in the middle of the body.
    """


class ResponseHead:
    """
    A backend's response head: C{version} is C{b"1.1"} or C{b"1.0"};
    C{length} is the body's Content-Length if it has one; C{bodiless} says
    there is no body at all (HEAD, 204, 304).
    """

    __slots__ = ("bodiless", "chunked", "code", "fields", "length", "reason", "version")

    def __init__(
        self,
        version: bytes,
        code: int,
        reason: bytes,
        fields: Fields,
        length: int | None = None,
        chunked: bool = False,
        bodiless: bool = False,
    ) -> None:
        self.version = version
        self.code = code
        self.reason = reason
        self.fields = fields
        self.length = length
        self.chunked = chunked
        self.bodiless = bodiless


class UpstreamRequest:
    """
    What to send a backend: its header fields as they go on the wire (Host
    included, framing excluded: the client adds the body's length itself),
    as C{raw} field lines already serialised (each ending in CRLF) followed
    by C{fields}.
    """

    __slots__ = ("body", "body_length", "fields", "method", "raw", "target")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        fields: list[tuple[bytes, bytes]],
        body: bytes | IO[bytes] | None = None,
        body_length: int = 0,
        raw: bytes = b"",
    ) -> None:
        self.method = method
        self.target = target
        self.fields = fields
        self.body = body
        self.body_length = body_length
        self.raw = raw

    def head(self) -> bytes:
        """
        The request line and header fields, framing included, as sent.
        """
        parts = [self.method, b" ", self.target, b" HTTP/1.1\r\n"]
        if self.body_length or self.method in _EXPECTING_BODY:
            parts.append(b"Content-Length: %d\r\n" % self.body_length)
        parts.append(self.raw)
        for name, value in self.fields:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)


class ResponseReceiver(Protocol):
    """
    Hears how a request to a backend goes: a head, then body bytes, then the
    end; or a failure at any point before the end. Nothing after either.
    """

    def response_head(self, head: ResponseHead) -> None: ...

    def response_body(self, data: bytes) -> None: ...

    def response_end(self) -> None: ...

    def response_failed(self, error: UpstreamError) -> None: ...


class Call(Protocol):
    """
    A request under way: its response can be paused, resumed, or abandoned
    (no callback follows C{cancel}).
    """

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def cancel(self) -> None: ...


class UpstreamClient(Protocol):
    """
    Sends requests to one backend. L{Upstream} is the real one; tests have
    in-memory twins.
    """

    def send(self, request: UpstreamRequest, receiver: ResponseReceiver) -> Call: ...

    def close(self) -> Deferred[Any]: ...


@implementer(IPushProducer)
class FileBody:
    """
    A request body too large to keep in memory, written from its file as
    the backend's socket takes it.
    """

    def __init__(self, content: IO[bytes], consumer: IConsumer) -> None:
        self.content = content
        self.consumer = consumer
        self.done: Deferred[None] = Deferred()
        self._paused = False
        self._stopped = False
        content.seek(0)

    def start(self) -> Deferred[None]:
        self.consumer.registerProducer(self, True)
        self._pump()
        return self.done

    def _pump(self) -> None:
        while not self._paused and not self._stopped:
            if self.content.closed:  # the exchange is over
                self._stopped = True
                return
            chunk = self.content.read(65536)
            if not chunk:
                self._stopped = True
                self.consumer.unregisterProducer()
                self.done.callback(None)
                return
            self.consumer.write(chunk)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._stopped = True


class _Call:
    """
    The L{Call} handle of one request: it follows the request onto a new
    connection when a stale one is replaced, and goes dead once the
    response is over, so a late call cannot touch the next request.
    """

    __slots__ = ("connection",)

    def __init__(self, connection: UpstreamConnection | None = None) -> None:
        self.connection = connection

    def pause(self) -> None:
        if self.connection is not None:
            self.connection.pause()

    def resume(self) -> None:
        if self.connection is not None:
            self.connection.resume()

    def cancel(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.cancel()


# Connection states.
_CONNECTING = 0
_IDLE = 1
_HEAD = 2  # request sent (or being sent), response head awaited
_BODY = 3
_CLOSED = 4


class UpstreamConnection(TwistedProtocol):
    """
    One connection to a backend, one request at a time.
    """

    deadline = NEVER
    reused = False
    _state = _CONNECTING
    _buffer = b""
    _scanned = 0
    _head: ResponseHead | None = None
    _remaining = 0
    _chunked: ChunkedDecoder | None = None
    _keep_alive = False
    _body_sent = True
    _file_body: FileBody | None = None
    _paused = False

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.request: UpstreamRequest | None = None
        self.receiver: ResponseReceiver | None = None
        self.call = _Call()
        self._connecting: _Attempt | None = None

    def _attach(
        self, request: UpstreamRequest, receiver: ResponseReceiver, call: _Call
    ) -> None:
        self.request, self.receiver, self.call = request, receiver, call
        call.connection = self

    def _detach(self) -> ResponseReceiver | None:
        """
        The request is over, however it ended: its receiver (to tell, once),
        its handle dead.
        """
        receiver, self.receiver = self.receiver, None
        self.request = None
        self.call.connection = None
        return receiver

    # The pool's side

    def connect(
        self, request: UpstreamRequest, receiver: ResponseReceiver, call: _Call
    ) -> None:
        self._attach(request, receiver, call)
        self._state = _CONNECTING
        self._connecting = self.upstream.connector.connect(self)

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        self._state = _CLOSED
        self.upstream.lost(self)
        receiver = self._detach()
        if receiver is not None:
            timed_out = failure.check(ConnectTimeout) is not None
            receiver.response_failed(
                ConnectFailed(describe_failure(failure), timed_out=timed_out)
            )

    def connectionMade(self) -> None:
        self._connecting = None
        if self.receiver is None:  # abandoned while connecting
            self._state = _CLOSED
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        assert self.request is not None
        self._send(self.request)

    def send(
        self, request: UpstreamRequest, receiver: ResponseReceiver, call: _Call
    ) -> None:
        self._attach(request, receiver, call)
        self.reused = True
        self._send(request)

    def _send(self, request: UpstreamRequest) -> None:
        self._state = _HEAD
        self._head = None
        self._buffer = b""
        self._scanned = 0
        transport: Any = self.transport
        body = request.body
        if body is None or isinstance(body, bytes):
            self._body_sent = True
            write_now(transport, request.head() + body if body else request.head())
            return
        self._body_sent = False
        transport.write(request.head())
        self._file_body = FileBody(body, transport)
        self._file_body.start().addCallback(self._file_sent)

    def _file_sent(self, _: object) -> None:
        self._file_body = None
        self._body_sent = True

    # Call

    def pause(self) -> None:
        if self._state == _BODY and not self._paused:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def cancel(self) -> None:
        """
        Abandon the request: the connection cannot be reused.
        """
        self._detach()
        if self._connecting is not None:
            self._connecting.cancel()
            return
        self._close(abort=True)

    def _close(self, abort: bool = False) -> None:
        state = self._state
        self._state = _CLOSED
        self._stop_file_body()
        transport: Any = self.transport
        if transport is not None and state != _CLOSED:
            if abort:
                transport.abortConnection()
            else:
                transport.loseConnection()

    def _stop_file_body(self) -> None:
        if self._file_body is not None:
            self._file_body.stopProducing()
            self._file_body = None

    # Deadlines (while idle in the pool)

    def expired(self) -> None:
        self.upstream.forget(self)
        self._close()

    # Reading the response

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _BODY:
            self._read_body(data)
            return
        if state != _HEAD:
            # Bytes nobody asked for: the connection's framing is lost.
            self.upstream.forget(self)
            self._close()
            return
        self._buffer = self._buffer + data if self._buffer else data
        try:
            while self._state == _HEAD:
                head = self._read_head()
                if head is None:
                    return
                if self._begin(head):
                    break
        except BadResponse as error:
            self._fail(error)
            return
        rest, self._buffer = self._buffer, b""
        if rest or (self._chunked is None and self._remaining == 0):
            self._read_body(rest)

    def _read_head(self) -> ResponseHead | None:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n", self._scanned)
        if end < 0:
            if len(buffer) > MAX_RESPONSE_HEAD:
                raise BadResponse(f"response head over {MAX_RESPONSE_HEAD} bytes")
            self._scanned = max(0, len(buffer) - 3)
            return None
        if end > MAX_RESPONSE_HEAD:
            raise BadResponse(f"response head over {MAX_RESPONSE_HEAD} bytes")
        self._scanned = 0
        self._buffer = buffer[end + 4 :]
        return parse_response_head(buffer[:end])

    def _begin(self, head: ResponseHead) -> bool:
        """
        A response head has arrived: skip an interim one (return False to
        read the next head), otherwise set up reading the body and report.
        """
        code = head.code
        if code < 200:
            if code == 101:
                raise BadResponse("101 Switching Protocols was not asked for")
            return False  # 100 Continue, 103 Early Hints...
        request = self.request
        assert request is not None
        fields = head.fields.index
        version_ok = head.version == b"1.1"
        tokens = connection_tokens(fields.get(b"connection"))
        keep_alive = (b"close" not in tokens) if version_ok else b"keep-alive" in tokens
        if request.method == b"HEAD" or code in _BODILESS_CODES:
            head.bodiless = True
            self._remaining = 0
            self._chunked = None
        elif (encodings := fields.get(b"transfer-encoding")) is not None:
            if [e.strip().lower() for e in b",".join(encodings).split(b",")] != [
                b"chunked"
            ]:
                raise BadResponse("a Transfer-Encoding other than chunked")
            head.chunked = True
            self._chunked = ChunkedDecoder()
            if b"content-length" in fields:
                keep_alive = False  # RFC 9112 section 6.3: suspicious framing
        elif (lengths := fields.get(b"content-length")) is not None:
            value = lengths[0]
            if len(lengths) > 1 or b"," in value:
                # RFC 9112 section 6.3: a list of one repeated value is fine.
                values = {v.strip() for value in lengths for v in value.split(b",")}
                if len(values) != 1:
                    raise BadResponse("Content-Length values that differ")
                value = values.pop()
            if not value.isdigit() or len(value) > 18:
                raise BadResponse("a malformed Content-Length")
            head.length = self._remaining = int(value)
            self._chunked = None
        else:
            keep_alive = False  # the body ends when the connection does
            self._remaining = -1
            self._chunked = None
        self._keep_alive = keep_alive
        self._head = head
        self._state = _BODY
        receiver = self.receiver
        if receiver is not None:
            receiver.response_head(head)
        return True

    def _read_body(self, data: bytes) -> None:
        if self._state != _BODY:
            return
        head = self._head
        assert head is not None
        receiver = self.receiver
        if head.bodiless:
            if data:
                self._keep_alive = False
            self._complete()
            return
        chunked = self._chunked
        if chunked is not None:
            parts: list[bytes] = []
            try:
                rest = chunked.feed(data, parts.append)
            except FramingError as error:
                self._fail(ResponseCut(f"malformed chunked body: {error}"))
                return
            if parts and receiver is not None:
                receiver.response_body(b"".join(parts))
            if chunked.done and self._state == _BODY:
                if rest:
                    self._keep_alive = False
                self._complete()
            return
        remaining = self._remaining
        if remaining < 0:  # until the connection closes
            if data and receiver is not None:
                receiver.response_body(data)
            return
        if len(data) > remaining:
            data = data[:remaining]
            self._keep_alive = False  # bytes past the body: framing lost
        self._remaining = remaining = remaining - len(data)
        if data and receiver is not None:
            receiver.response_body(data)
        if not remaining and self._state == _BODY:
            self._complete()

    def _complete(self) -> None:
        """
        The response is whole: back to the pool if the connection can carry
        another request, and tell the receiver.
        """
        receiver = self._detach()
        self._head = None
        self._chunked = None
        if self._keep_alive and self._body_sent:
            self._state = _IDLE
            # A client that was slow at the very end left the read paused.
            self.resume()
            self.upstream.idle(self)
        else:
            # With the request body still going out (the backend answered
            # early), nothing is worth flushing: close at once.
            self._close(abort=not self._body_sent)
        if receiver is not None:
            receiver.response_end()

    def _fail(self, error: UpstreamError) -> None:
        receiver = self._detach()
        self._close(abort=True)
        if receiver is not None:
            receiver.response_failed(error)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        state = self._state
        self._state = _CLOSED
        self._stop_file_body()
        upstream = self.upstream
        upstream.lost(self)
        request, call = self.request, self.call
        receiver = self._detach()
        if receiver is None:
            return
        if state == _BODY:
            if self._remaining < 0 and self._chunked is None:
                receiver.response_end()  # delimited by the close: complete
            else:
                receiver.response_failed(ResponseCut(describe_failure(reason)))
            return
        if (
            state == _HEAD
            and self.reused
            and not self._buffer
            and request is not None
            and request.method in IDEMPOTENT
            and not request.body
        ):
            # A kept-alive connection the backend closed as it was reused:
            # once more, on a new connection.
            upstream.connect(request, receiver, call)
            return
        receiver.response_failed(NoResponse(describe_failure(reason)))


class _Attempt(Protocol):
    """
    A connection attempt under way, which can be given up.
    """

    def cancel(self) -> None: ...


class _Once(ClientFactory):
    """
    A factory for one connection attempt, whose protocol already exists.
    """

    noisy = False

    def __init__(self, connection: UpstreamConnection) -> None:
        self.connection = connection

    def buildProtocol(self, addr: object) -> UpstreamConnection:
        return self.connection

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.connection._connect_failed(reason)


class _TCPAttempt:
    def __init__(self, connector: Any) -> None:
        self.connector = connector

    def cancel(self) -> None:
        if self.connector.state == "connecting":
            self.connector.stopConnecting()


class DirectTCP:
    """
    Connects to an address literal with the reactor's C{connectTCP}: no
    endpoint, no Deferred, and no wrapper protocol between the socket and
    the connection for every read.
    """

    def __init__(self, reactor: Any, host: str, port: int, timeout: float) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.timeout = timeout

    def connect(self, connection: UpstreamConnection) -> _Attempt:
        connector = self.reactor.connectTCP(
            self.host, self.port, _Once(connection), self.timeout
        )
        return _TCPAttempt(connector)


class EndpointConnector:
    """
    Connects through an endpoint: a host name to resolve, or TLS.
    """

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self.endpoint = endpoint

    def connect(self, connection: UpstreamConnection) -> _Attempt:
        d = self.endpoint.connect(_Once(connection))
        d.addErrback(connection._connect_failed)
        return d


def parse_response_head(head: bytes) -> ResponseHead:
    """
    A status line and header fields, strictly (RFC 9112 sections 4 and 5).
    """
    try:
        check_head(head)
        lines = head.split(b"\r\n")
        fields = parse_field_lines(lines[1:])
    except FieldError as error:
        raise BadResponse(str(error)) from None
    fields.raw = head[len(lines[0]) + 2 :] + b"\r\n" if len(lines) > 1 else b""
    version, _, rest = lines[0].partition(b" ")
    code_text, _, reason = rest.partition(b" ")
    if version != b"HTTP/1.1" and (
        version[:7] != b"HTTP/1." or len(version) != 8 or not version[7:].isdigit()
    ):
        raise BadResponse("malformed status line")
    if len(code_text) != 3 or not code_text.isdigit():
        raise BadResponse("malformed status code")
    code = int(code_text)
    if code < 100 or code > 599:
        raise BadResponse(f"invalid status {code}")
    return ResponseHead(version[5:], code, reason, fields)


class Upstream:
    """
    The real L{UpstreamClient} for one backend: its connections and the
    pool of idle ones.
    """

    def __init__(self, reactor: Any, server: ServerConfig, pool: PoolConfig) -> None:
        self.clock: IReactorTime = reactor
        self.connector = connector_for(reactor, server, pool)
        self.max_idle = pool.keepalive_connections
        self.keepalive_timeout = pool.keepalive_timeout
        self.deadlines = Deadlines.of(reactor)
        self.idle_connections: list[UpstreamConnection] = []
        # Every connection made and not yet lost, idle or busy.
        self.connections: set[UpstreamConnection] = set()
        self.closed = False
        self._all_closed: list[Deferred[None]] = []

    def send(self, request: UpstreamRequest, receiver: ResponseReceiver) -> Call:
        call = _Call()
        idle = self.idle_connections
        if idle:
            connection = idle.pop()
            self.deadlines.unwatch(connection)
            connection.send(request, receiver, call)
        else:
            self.connect(request, receiver, call)
        return call

    def connect(
        self, request: UpstreamRequest, receiver: ResponseReceiver, call: _Call
    ) -> None:
        """
        Send C{request} on a new connection.
        """
        connection = UpstreamConnection(self)
        self.connections.add(connection)
        connection.connect(request, receiver, call)

    def idle(self, connection: UpstreamConnection) -> None:
        """
        C{connection} can take another request.
        """
        if self.closed or len(self.idle_connections) >= self.max_idle:
            connection._close()
            return
        self.idle_connections.append(connection)
        connection.deadline = self.clock.seconds() + self.keepalive_timeout
        self.deadlines.watch(connection)

    def forget(self, connection: UpstreamConnection) -> None:
        """
        C{connection} is not to be used again.
        """
        if connection in self.idle_connections:
            self.idle_connections.remove(connection)
        self.deadlines.unwatch(connection)

    def lost(self, connection: UpstreamConnection) -> None:
        """
        C{connection} is closed, or never opened.
        """
        self.forget(connection)
        self.connections.discard(connection)
        if not self.connections and self._all_closed:
            waiting, self._all_closed = self._all_closed, []
            for d in waiting:
                d.callback(None)

    def close(self) -> Deferred[None]:
        """
        Close the idle connections now, and the others once their request is
        answered; fires when every connection is closed.
        """
        self.closed = True
        idle, self.idle_connections = self.idle_connections, []
        for connection in idle:
            self.deadlines.unwatch(connection)
            connection._close()
        if not self.connections:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._all_closed.append(d)
        return d


def connector_for(
    reactor: Any, server: ServerConfig, pool: PoolConfig
) -> DirectTCP | EndpointConnector:
    """
    How to connect to C{server}: straight to a plain-HTTP address literal,
    through an endpoint otherwise.
    """
    if server.scheme == "http":
        try:
            ipaddress.ip_address(server.host)
        except ValueError:
            pass
        else:
            return DirectTCP(reactor, server.host, server.port, pool.connect_timeout)
    return EndpointConnector(
        client_endpoint(reactor, server, pool, pool.connect_timeout)
    )


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
