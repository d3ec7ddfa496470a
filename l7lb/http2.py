# -*- test-case-name: tests.test_tls -*-
"""
HTTP/2 client connections, through twisted.web's HTTP/2 support (the C{h2}
and C{priority} packages).

twisted.web's C{H2Connection} makes a request object per stream and speaks
to it as to a twisted.web C{Request}; L{HTTP2Request} is that object for
l7lb, a L{ClientRequest} that the balancer handles like any other. It
holds an HTTP/2 request to the limits and syntax rules HTTP/1.1 requests
meet in L{l7lb.http1}, with a deadline for the body. twisted.web cannot
answer a stream before it has been read, so a request refused while
arriving is answered when its stream ends, its body dropped meanwhile;
other streams go on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import h2.connection
from h2.config import H2Configuration
from hpack import Encoder
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web._http2 import H2Connection
from twisted.web.http_headers import Headers

from l7lb.deadlines import NEVER, Deadlines
from l7lb.fields import VALUE_BYTES, Fields, is_token
from l7lb.http1 import BodyBuffer
from l7lb.request import ClientRequest

if TYPE_CHECKING:
    from l7lb.site import BalancerSite


class _LiteralEncoder(Encoder):
    """
    HPACK without Huffman coding of literal values.
    """

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        encoded: bytes = super().encode(headers, huffman=False)
        return encoded


class _FieldList:
    """
    Response header fields in the form twisted.web's HTTP/2 stream reads.
    """

    __slots__ = ("_fields",)

    def __init__(self, fields: list[tuple[bytes, bytes]]) -> None:
        self._fields = fields

    def getAllRawHeaders(self) -> list[tuple[bytes, list[bytes]]]:
        return [(name.lower(), [value]) for name, value in self._fields]


class HTTP2Request(ClientRequest):
    """
    One HTTP/2 stream's request (see the module's description).
    """

    http2 = True
    deadline = NEVER
    _refusal = 0
    _bodiless = False

    def __init__(self, stream: Any, queued: object = None) -> None:
        site: BalancerSite = stream.site
        peer = stream.getPeer()
        super().__init__(site, getattr(peer, "host", "") or "unknown")
        self.stream = stream
        self.version = b"HTTP/2"
        # twisted.web's stream adds the header fields here.
        self.requestHeaders = Headers()
        self._body = BodyBuffer()
        self.deadlines = Deadlines.of(site.clock)

    # What twisted.web's HTTP/2 stream calls.

    def parseCookies(self) -> None:
        """
        Cookies are read when needed (L{ClientRequest.cookies}).
        """

    def gotLength(self, length: int | None) -> None:
        limits = self.site.limits
        if length is not None and length > limits.max_body_size:
            self._refuse(413)
        # The stream must end in time, body or not.
        self.deadline = self.site.clock.seconds() + limits.client_body_timeout
        self.deadlines.watch(self)

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused:
            return
        body = self._body
        body.append(data)
        if body.size > self.site.limits.max_body_size:
            self._refuse(413)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.finished or self.gone:
            return  # already answered 408
        self.deadlines.unwatch(self)
        self.method, self.uri = command or b"-", path or b"-"
        self.headers = _http1_fields(self.requestHeaders)
        status = self._refusal or self._check_head(command, path)
        if status:
            self.refused = True
            self.note = "refused"
            self.respond_error(status)
            return
        self.body_size = self._body.size
        if self.body_size:
            self.body = self._body.result()
        self.dispatch()

    def connectionLost(self, reason: Failure) -> None:
        self.deadlines.unwatch(self)
        self.connection_lost()

    # Limits

    def _refuse(self, status: int) -> None:
        self.refused = True
        self._refusal = self._refusal or status

    def expired(self) -> None:
        """
        The body did not arrive within C{client_body_timeout}: 408 in the log,
        the stream reset; the connection's other streams go on.
        """
        self.deadlines.unwatch(self)
        self.refused = True
        self.code = 408
        self.note = "refused"
        self.gone = True
        self.log_access()
        self.stream.abortConnection()

    def _check_head(self, command: bytes | None, path: bytes | None) -> int:
        """
        The limits and syntax rules of L{l7lb.http1}, for a complete HTTP/2
        header list: 0 or a status.
        """
        limits = self.site.limits
        if path is None or not command or not is_token(command):
            return 400
        if len(path) > limits.max_uri_length:
            return 414
        size = 0
        for name, value in self.headers:
            size += len(name) + len(value) + 4
            if value.translate(None, VALUE_BYTES) or not is_token(name):
                return 400
        if size > limits.max_header_size or len(self.headers) > limits.max_headers:
            return 431
        return 0

    # Answering

    def local_address(self) -> Any:
        return self.stream.getHost()

    def _send_head(
        self,
        code: int,
        reason: bytes,
        fields: list[tuple[bytes, bytes]],
        content_length: bytes | None,
        bodiless: bool,
        raw: bytes,
    ) -> None:
        self._bodiless = bodiless or self.method == b"HEAD"
        self.started_writing = True
        if content_length is not None:
            fields = [*fields, (b"Content-Length", content_length)]
        self.stream.writeHeaders(b"HTTP/2", b"%d" % code, reason, _FieldList(fields))

    def _send_data(self, data: bytes) -> None:
        if not self._bodiless:
            self.stream.write(data)

    def _send_end(self) -> None:
        self.stream.requestDone(self)

    def _send_abort(self) -> None:
        self.stream.abortConnection()  # RST_STREAM: the other streams go on

    def register_producer(self, producer: IPushProducer) -> None:
        self.stream.registerProducer(producer, True)

    def unregister_producer(self) -> None:
        self.stream.unregisterProducer()


def _http1_fields(headers: Headers) -> Fields:
    """
    An HTTP/2 request's fields as an HTTP/1.1 backend gets them: its
    several C{cookie} fields joined in one (RFC 9113 section 8.2.3).
    """
    fields = Fields()
    cookies: list[bytes] = []
    for name, values in headers.getAllRawHeaders():
        if name.lower() == b"cookie":
            cookies += values
            continue
        for value in values:
            fields.add(name, value)
    if cookies:
        fields.add(b"Cookie", b"; ".join(cookies))
    return fields


def http2_connection(site: BalancerSite) -> H2Connection:
    """
    twisted.web's HTTP/2 connection, making L{HTTP2Request}s for the site.
    """
    connection: Any = H2Connection(site.clock)
    # The answers' header fields are l7lb's to get right (lower-case names,
    # no connection-specific fields: see HTTP2Request._send_head), so h2
    # need not normalise and check them again; what clients send is still
    # checked in full. Literal values are not Huffman-coded: the pure-Python
    # coder costs more CPU than the bytes it saves on a balancer's links.
    config = H2Configuration(
        client_side=False,
        header_encoding=None,
        normalize_outbound_headers=False,
        validate_outbound_headers=False,
    )
    connection.conn = h2.connection.H2Connection(config=config)
    connection.conn.encoder = _LiteralEncoder()
    connection.requestFactory = HTTP2Request
    connection.site = site
    connection.factory = site
    connection.timeOut = site.timeOut
    connection.callLater = site.clock.callLater
    made: H2Connection = connection
    return made
