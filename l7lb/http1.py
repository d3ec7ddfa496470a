# -*- test-case-name: tests.test_site -*-
"""
HTTP/1.x client connections: l7lb's own strict parser and writer.

A request head is read whole (it must end within C{client_header_timeout}
of its first byte, and stay within C{max_uri_length}, C{max_header_size}
and C{max_headers}) and parsed in one pass. What could smuggle a request
past a backend that reads it differently is refused with 400 and the
connection closed: obs-fold, a space before the colon, control characters,
any Transfer-Encoding but a single C{chunked}, Content-Length and
Transfer-Encoding together, a Content-Length that is repeated or not plain
digits. The body is read whole (within C{client_body_timeout} and
C{max_body_size}) before the request is forwarded, so that a retry can
replay it; small bodies stay in memory, larger ones go to a temporary file.

Pipelined requests are answered in order, one at a time; what arrives
meanwhile is buffered (the socket is paused once that passes
C{PIPELINE_BUFFER}). C{Expect: 100-continue} is answered only once the
balancer has accepted the request from its head. A refused request gets a
complete answer and the connection is closed gently (see L{_linger}).

Responses go out with a single write where possible: the head waits for
the first body bytes, or for the end.
"""

from __future__ import annotations

import tempfile
from typing import IO, TYPE_CHECKING, Any

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from l7lb import errors
from l7lb.chunked import ChunkedDecoder, FramingError
from l7lb.deadlines import NEVER, Deadlines
from l7lb.fields import (
    FieldError,
    Fields,
    check_head,
    is_token,
    parse_field_lines,
)
from l7lb.headers import connection_tokens
from l7lb.request import ClientRequest
from l7lb.wire import write_now

if TYPE_CHECKING:
    from l7lb.config import LBConfig
    from l7lb.site import BalancerSite

_VERSIONS = frozenset({b"HTTP/1.1", b"HTTP/1.0"})

# A request body up to this size is kept in memory; a larger one goes to a
# temporary file.
BODY_IN_MEMORY = 64 * 1024
# Bytes of pipelined requests read ahead while one is being answered; past
# this the socket is paused.
PIPELINE_BUFFER = 64 * 1024
# How long a refused client may go on sending before l7lb resets.
LINGER = 5.0
# How long a connection l7lb closes may take to send what is left to the
# client before it is reset.
CLOSE_GRACE = 15.0

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# Connection states.
_IDLE = 0  # between requests
_HEAD = 1  # reading a request head
_BODY = 2  # reading a request body
_BUSY = 3  # a request is being answered
_CLOSING = 4  # refused or done: nothing more is read

# Response framing.
_NO_BODY = 0
_LENGTH = 1
_CHUNKED = 2
_UNTIL_CLOSE = 3


class BadRequest(Exception):
    """
    A request l7lb refuses while reading it, with the status to answer.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def parse_request_line(
    line: bytes, limits: LBConfig, request: ClientRequest | None = None
) -> tuple[bytes, bytes, bytes]:
    """
    C{method SP request-target SP HTTP-version}, exactly (RFC 9112 section 3);
    a C{request} notes what it could make of the line, for the access log.
    """
    parts = line.split(b" ")
    if request is not None and len(parts) == 3:
        request.method, request.uri, request.version = parts
    if len(parts) != 3:
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if len(target) > limits.max_uri_length:
        raise BadRequest(414, "request target too long")
    if version not in _VERSIONS:
        raise BadRequest(400, "unsupported HTTP version")
    if not is_token(method):
        raise BadRequest(400, "malformed method")
    if not target or b"\t" in target:
        raise BadRequest(400, "malformed request target")
    return method, target, version


def parse_fields(lines: list[bytes], limits: LBConfig) -> Fields:
    """
    Header field lines, strictly (see L{parse_field_lines}), within the
    limits on their number and size.
    """
    if len(lines) > limits.max_headers:
        raise BadRequest(431, "too many header fields")
    if sum(map(len, lines)) + 2 * len(lines) > limits.max_header_size:
        raise BadRequest(431, "header fields too large")
    try:
        return parse_field_lines(lines)
    except FieldError as error:
        raise BadRequest(400, str(error)) from None


def body_framing(fields: Fields, version: bytes, limits: LBConfig) -> tuple[int, bool]:
    """
    The request body's length and whether it is chunked (RFC 9112 section
    6), refusing every ambiguous combination.
    """
    index = fields.index
    encodings = index.get(b"transfer-encoding")
    lengths = index.get(b"content-length")
    if encodings is not None:
        if lengths is not None:
            raise BadRequest(400, "both Content-Length and Transfer-Encoding")
        if len(encodings) != 1 or encodings[0].lower() != b"chunked":
            raise BadRequest(400, "a Transfer-Encoding other than chunked")
        if version != b"HTTP/1.1":
            raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
        return 0, True
    if lengths is None:
        return 0, False
    if len(lengths) != 1:
        raise BadRequest(400, "repeated Content-Length")
    value = lengths[0]
    if not value.isdigit() or len(value) > 18:
        raise BadRequest(400, "malformed Content-Length")
    length = int(value)
    if length > limits.max_body_size:
        raise BadRequest(413, "body larger than max_body_size")
    return length, False


class BodyBuffer:
    """
    A request body as it arrives: in memory while small, then in a
    temporary file.
    """

    __slots__ = ("_file", "_parts", "size")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._file: IO[bytes] | None = None
        self.size = 0

    def append(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._parts.append(data)
        if self.size > BODY_IN_MEMORY:
            self._file = tempfile.TemporaryFile()  # noqa: SIM115
            self._file.writelines(self._parts)
            self._parts = []

    def close(self) -> None:
        """
        Give back the temporary file, if any (a body never finished).
        """
        if self._file is not None:
            self._file.close()
        self._parts = []

    def result(self) -> bytes | IO[bytes]:
        if self._file is not None:
            self._file.seek(0)
            return self._file
        return b"".join(self._parts)


class HTTP1Request(ClientRequest):
    """
    A request read from an L{HTTP1Connection}, and its answer written there.
    """

    _framing = _NO_BODY
    _pending = b""

    def __init__(self, connection: HTTP1Connection) -> None:
        super().__init__(connection.site, connection.host)
        self.connection = connection

    def local_address(self) -> Any:
        return self.connection.transport.getHost()  # type: ignore[union-attr]

    def respond_error(
        self, status: int, headers: dict[bytes, bytes] | None = None
    ) -> None:
        if status == 400:
            # After a request l7lb could not make sense of, trust nothing
            # more on this connection.
            self.connection.persistent = False
        super().respond_error(status, headers)

    takes_raw_fields = True

    def _send_head(
        self,
        code: int,
        reason: bytes,
        fields: list[tuple[bytes, bytes]],
        content_length: bytes | None,
        bodiless: bool,
        raw: bytes,
    ) -> None:
        connection = self.connection
        parts = [b"HTTP/1.1 %d %s\r\n%s" % (code, reason, raw)]
        for name, value in fields:
            parts += (name, b": ", value, b"\r\n")
        if content_length is not None:
            parts += (b"Content-Length: ", content_length, b"\r\n")
        if bodiless or self.method == b"HEAD":
            self._framing = _NO_BODY
        elif content_length is not None:
            self._framing = _LENGTH
        elif self.version == b"HTTP/1.1":
            parts.append(b"Transfer-Encoding: chunked\r\n")
            self._framing = _CHUNKED
        else:
            # An HTTP/1.0 client learns where the body ends by the close.
            self._framing = _UNTIL_CLOSE
            connection.persistent = False
        if not connection.persistent:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        self._pending = b"".join(parts)

    def _send_data(self, data: bytes) -> None:
        framing = self._framing
        if framing == _NO_BODY:
            return
        if framing == _CHUNKED:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        pending = self._pending
        if pending:
            self._pending = b""
            self.started_writing = True
            data = pending + data
        write_now(self.connection.transport, data)

    def _send_end(self) -> None:
        data = self._pending
        if self._framing == _CHUNKED:
            data += b"0\r\n\r\n"
        self._pending = b""
        self.started_writing = True
        connection = self.connection
        if data:
            write_now(connection.transport, data)
        connection.request_done(self)

    def _send_abort(self) -> None:
        delimited = self._framing in (_LENGTH, _CHUNKED) and not self._pending
        self.connection.abort_request(reset=not delimited)

    def register_producer(self, producer: IPushProducer) -> None:
        self.connection.register_producer(producer)

    def unregister_producer(self) -> None:
        self.connection.unregister_producer()


class HTTP1Connection(Protocol):
    """
    One HTTP/1.x client connection (see the module's description).
    """

    host = ""
    persistent = True
    deadline = NEVER
    request: HTTP1Request | None = None
    _state = _IDLE
    _buffer = b""
    _scanned = 0
    _body: BodyBuffer | None = None
    _chunked: ChunkedDecoder | None = None
    _remaining = 0
    _paused = False
    _processing = False
    _producer: IPushProducer | None = None
    _lingering = False
    _closing = False

    def __init__(self, site: BalancerSite) -> None:
        self.site = site
        self.limits = site.limits
        self.deadlines = Deadlines.of(site.clock)

    # IProtocol

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self.host = getattr(transport.getPeer(), "host", "") or ""
        self.site.connections.opened(self)
        self.deadline = self.site.clock.seconds() + self.site.timeOut
        self.deadlines.watch(self)

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state >= _BUSY:
            if state == _BUSY:
                self._read_ahead(data)
            return
        self._buffer = self._buffer + data if self._buffer else data
        if state == _IDLE:
            # The first bytes of a request: its whole head must follow in time.
            self._state = _HEAD
            self.deadline = (
                self.site.clock.seconds() + self.limits.client_header_timeout
            )
        self._process()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._state = _CLOSING
        self.deadlines.unwatch(self)
        if self._body is not None:
            self._body.close()
            self._body = None
        self.site.connections.closed(self)
        request = self.request
        if request is not None:
            self.request = None
            request.connection_lost()

    # Deadlines

    def expired(self) -> None:
        self.deadline = NEVER
        transport: Any = self.transport
        if self._lingering or self._closing:
            # Still not gone: a client that stopped reading keeps a closing
            # connection open for ever, unless it is reset.
            transport.abortConnection()
        elif self._state in (_HEAD, _BODY):
            self.refuse(408)
        elif self._state == _IDLE:
            self.close()

    def close(self) -> None:
        """
        Close once what is written has gone out, within L{CLOSE_GRACE}.
        """
        self._closing = True
        self._state = _CLOSING
        self.deadline = self.site.clock.seconds() + CLOSE_GRACE
        self.transport.loseConnection()  # type: ignore[union-attr]

    # Reading requests

    def _read_ahead(self, data: bytes) -> None:
        """
        Bytes of a pipelined request while one is answered: kept for later.
        """
        if not self.persistent:
            return  # the connection closes after this answer
        self._buffer += data
        if len(self._buffer) > PIPELINE_BUFFER and not self._paused:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def _process(self) -> None:
        """
        Read what the buffer holds, request after request, until a request
        is being answered or more bytes are needed.
        """
        if self._processing:
            return
        self._processing = True
        try:
            while self._buffer:
                state = self._state
                if state <= _HEAD:
                    if not self._read_head():
                        break
                elif state == _BODY:
                    if not self._read_body():
                        break
                else:
                    break
        except BadRequest as refusal:
            self.refuse(refusal.status)
        finally:
            self._processing = False

    def _read_head(self) -> bool:
        buffer = self._buffer
        if buffer[:2] == b"\r\n":
            # RFC 9112 section 2.2: empty lines before a request line are ignored.
            buffer = self._buffer = buffer.lstrip(b"\r\n")
            if not buffer:
                return False
        if self._state == _IDLE:
            self._state = _HEAD
            self.deadline = (
                self.site.clock.seconds() + self.limits.client_header_timeout
            )
        end = buffer.find(b"\r\n\r\n", self._scanned)
        if end < 0:
            self._scanned = max(0, len(buffer) - 3)
            self._check_partial_head(buffer)
            return False
        self._scanned = 0
        head = buffer[:end]
        self._buffer = buffer[end + 4 :]
        lines = head.split(b"\r\n")
        limits = self.limits
        request = self.request = HTTP1Request(self)
        version = parse_request_line(lines[0], limits, request)[2]
        try:
            check_head(head)
        except FieldError as error:
            raise BadRequest(400, str(error)) from None
        fields = request.headers = parse_fields(lines[1:], limits)
        fields.raw = head[len(lines[0]) + 2 :] + b"\r\n" if len(lines) > 1 else b""
        length, chunked = body_framing(fields, version, limits)
        if version == b"HTTP/1.1":
            connection = fields.index.get(b"connection")
            if connection is not None and b"close" in connection_tokens(connection):
                self.persistent = False
        else:
            self.persistent = False
        if (length or chunked) and not self._expect_continue(request, version):
            return False
        if length:
            self._body = BodyBuffer()
            self._remaining = length
        elif chunked:
            self._body = BodyBuffer()
            self._chunked = ChunkedDecoder()
        else:
            self._dispatch()
            return True
        self._state = _BODY
        self.deadline = self.site.clock.seconds() + limits.client_body_timeout
        return True

    def _check_partial_head(self, buffer: bytes) -> None:
        """
        Refuse a head that has already grown past the limits, without
        waiting for its end.
        """
        limits = self.limits
        line_end = buffer.find(b"\r\n")
        if line_end < 0:
            if len(buffer) > limits.max_uri_length + 64:
                raise BadRequest(414, "request line too long")
            return
        parse_request_line(buffer[:line_end], limits)
        if len(buffer) - line_end > limits.max_header_size + 4:
            raise BadRequest(431, "header fields too large")

    def _expect_continue(self, request: HTTP1Request, version: bytes) -> bool:
        """
        Answer C{Expect: 100-continue} once the balancer has accepted the
        request from its head; a refusal is answered at once, and the body
        never read.
        """
        expect = request.headers.index.get(b"expect")
        if version != b"HTTP/1.1" or not expect or expect[0].lower() != b"100-continue":
            return True
        verdict = self.site.resource.admit(request, request.method, request.uri)
        status = getattr(verdict, "status", None)
        if status is not None:
            self.refuse(status, getattr(verdict, "headers", None))
            return False
        self.transport.write(_CONTINUE)  # type: ignore[union-attr]
        return True

    def _read_body(self) -> bool:
        body = self._body
        assert body is not None and self.request is not None
        buffer, self._buffer = self._buffer, b""
        chunked = self._chunked
        if chunked is None:
            take = self._remaining
            if len(buffer) <= take:
                body.append(buffer)
                self._remaining -= len(buffer)
                if self._remaining:
                    return False
            else:
                body.append(buffer[:take])
                self._buffer = buffer[take:]
                self._remaining = 0
        else:
            try:
                self._buffer = chunked.feed(buffer, body.append)
            except FramingError as error:
                raise BadRequest(400, str(error)) from None
            if body.size > self.limits.max_body_size:
                raise BadRequest(413, "body larger than max_body_size")
            if not chunked.done:
                return False
            self._chunked = None
        request = self.request
        request.body = body.result()
        request.body_size = body.size
        self._body = None
        self._dispatch()
        return True

    def _dispatch(self) -> None:
        request = self.request
        assert request is not None
        self._state = _BUSY
        self.deadline = NEVER
        if not self.persistent:
            self._buffer = b""  # bytes after the last request are ignored
        request.dispatch()

    # Answering

    def register_producer(self, producer: IPushProducer) -> None:
        if self._producer is None and self._state != _CLOSING:
            self._producer = producer
            self.transport.registerProducer(producer, True)  # type: ignore[union-attr]

    def unregister_producer(self) -> None:
        if self._producer is not None:
            self._producer = None
            self.transport.unregisterProducer()  # type: ignore[union-attr]

    def request_done(self, request: HTTP1Request) -> None:
        """
        The answer to C{request} is complete: read the next request, or
        close.
        """
        if request is not self.request:
            return
        self.request = None
        self.unregister_producer()
        transport: Any = self.transport
        if not self.persistent:
            self._state = _CLOSING
            self.close()
            return
        self._state = _IDLE
        self.deadline = self.site.clock.seconds() + self.site.timeOut
        if self._paused:
            self._paused = False
            transport.resumeProducing()
        if self._buffer:
            self._process()

    def abort_request(self, reset: bool) -> None:
        """
        The answer cannot be completed: the client must see it cut. With
        C{reset} the connection is reset (a body delimited by the close
        would look whole after a normal close).
        """
        self.request = None
        self._state = _CLOSING
        self.unregister_producer()
        transport: Any = self.transport
        if reset:
            transport.abortConnection()
        else:
            self.close()

    def refuse(
        self,
        status: int,
        headers: dict[bytes, bytes] | None = None,
    ) -> None:
        """
        Answer a request that cannot be read (or may not be) and close: the
        rest of what the client sends is ignored.
        """
        if self._state == _CLOSING:
            return
        self._state = _CLOSING
        self._buffer = b""
        request = self.request
        if request is not None:
            self.request = None
            request.refused = True
            request.code = status
            request.note = "refused"
            request.finished = True
            request.log_access()
        else:
            self.site.access_log.log_refusal(self.host, status)
        self.transport.write(errors.raw_response(status, headers))  # type: ignore[union-attr]
        self._linger()

    def _linger(self) -> None:
        """
        Close after a refusal without losing the answer: a client still
        sending its request would get a reset (and lose the response) if the
        connection closed under it, so l7lb shuts its sending side, reads and
        drops what still arrives for a few seconds, then closes for good.
        """
        transport: Any = self.transport
        half_close = getattr(type(transport), "loseWriteConnection", None)
        if half_close is None:  # TLS cannot half-close
            self.close()
            return
        transport.loseWriteConnection()
        self._lingering = True
        self.deadline = self.site.clock.seconds() + LINGER

    # Draining

    @property
    def idle(self) -> bool:
        """
        No request is being read or answered on this connection.
        """
        return self._state == _IDLE and not self._buffer

    def close_when_done(self) -> None:
        """
        Answer what is under way with C{Connection: close}, then close; close
        at once if nothing is.
        """
        self.persistent = False
        if self.idle:
            self.close()
