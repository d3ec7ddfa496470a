# -*- test-case-name: tests.test_site -*-
"""
The client side of the proxy: twisted.web's HTTP/1.1 server with l7lb's
limits and answers.

L{BalancerChannel} refuses oversized or malformed request heads with the
status the SPEC names (414, 431, 400) and a real response, where plain
twisted.web answers a bare 400 or drops the connection. L{BalancerRequest}
enforces the body limit (413), skips twisted.web's form parsing (a proxy
forwards bodies, it does not read them) and writes one access-log line
however the exchange ends. L{BalancerSite} hands every request to one
resource, the balancer.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http import _GenericHTTPChannelProtocol
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource

from l7lb import errors
from l7lb.accesslog import AccessLog
from l7lb.config import LBConfig
from l7lb.connlimit import ConnectionCounts
from l7lb.headers import TOKEN, HTTPDate, connection_tokens
from l7lb.metrics import Metrics
from l7lb.trust import TrustedProxies


class BalancerRequest(http.Request):
    """
    One client request and what the access log needs to know about it.
    """

    log = Logger()
    channel: BalancerChannel

    route_name = "-"
    pool_name = "-"
    backend_address = "-"
    request_id = b"-"
    note = ""
    refused = False
    _logged = False
    # The balancer's verdict on this request, once given (see resource.py).
    admission: Any = None

    def __init__(self, channel: BalancerChannel, queued: object = None) -> None:
        super().__init__(channel)
        self.site: BalancerSite = channel.site
        self.scheme = self.site.scheme
        self.started = self.site.clock.seconds()
        self.site.requests_in_flight += 1
        self.body_size = 0
        self.upstream_seconds: float | None = None
        # l7lb's own headers for the response (HSTS, rate limit state...).
        self.additions: list[tuple[bytes, bytes]] = []
        # HTTP/1.x requests arrive on l7lb's own channel, which enforces the
        # head limits itself; HTTP/2 streams are checked here.
        self.http2 = not isinstance(channel, BalancerChannel)

    @property
    def keeps_alive(self) -> bool:
        """
        Whether the connection stays open after this response.
        """
        return bool(getattr(self.channel, "persistent", True))

    def local_authority(self) -> bytes:
        """
        The address the client connected to, as a Host value.
        """
        host = self.getHost()
        name = getattr(host, "host", "localhost")
        port = getattr(host, "port", None)
        name = f"[{name}]" if ":" in name else name
        return (f"{name}:{port}" if port else name).encode("ascii", "replace")

    _client_address: str | None = None

    @property
    def client_address(self) -> str:
        """
        Who the client is: the peer, or what a trusted proxy in front of
        l7lb says in X-Forwarded-For (what access lists and rate limits
        judge).
        """
        if self._client_address is None:
            self._client_address = self.site.trusted.client_address(
                self.client_ip, self.requestHeaders.getRawHeaders(b"X-Forwarded-For")
            )
        return self._client_address

    @property
    def client_ip(self) -> str:
        """
        The peer's address as text (C{unknown} for a non-IP transport).
        """
        host = getattr(self.client, "host", None)
        return host if isinstance(host, str) and host else "unknown"

    _refusal = 0
    _body_deadline: Any = None

    def gotLength(self, length: int | None) -> None:
        limits = self.site.limits
        if length is not None and length > limits.max_body_size:
            super().gotLength(0)
            self.refuse(413)
            return
        super().gotLength(length)
        if self.http2 and length != 0:
            # HTTP/2 streams get the body deadline HTTP/1.1 connections get.
            self._body_deadline = self.site.clock.callLater(
                limits.client_body_timeout, self._body_too_slow
            )

    def _body_too_slow(self) -> None:
        self._body_deadline = None
        self.refused = True
        self.code = 408
        self.note = "refused"
        self.log_access()
        if self.channel is not None:
            stream: Any = self.channel
            stream.abortConnection()  # RST_STREAM; the connection goes on

    def refuse(self, status: int) -> None:
        """
        Refuse the request while it is being received: HTTP/1.x answers and
        closes the connection. HTTP/2 answers once the stream has been read
        (twisted.web's HTTP/2 cannot answer a stream before then), dropping
        its body meanwhile; other streams go on.
        """
        if not self.http2:
            self.channel.refuse(status)
            return
        self.refused = True
        self._refusal = self._refusal or status

    def _check_http2_head(self, command: bytes | None, path: bytes | None) -> int:
        """
        The limits and syntax rules HTTP/1.1 requests meet in
        L{BalancerChannel}, for a complete HTTP/2 header list: 0 or a status.
        """
        limits = self.site.limits
        if path is None or command is None or not TOKEN.fullmatch(command):
            return 400
        if len(path) > limits.max_uri_length:
            return 414
        size = count = 0
        for name, values in self.requestHeaders.getAllRawHeaders():
            for value in values:
                count += 1
                size += len(name) + len(value) + 4
                if value.translate(None, _VALUE_BYTES):
                    return 400
        if size > limits.max_header_size or count > limits.max_headers:
            return 431
        return 0

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused:
            return
        self.body_size += len(data)
        if self.body_size > self.site.limits.max_body_size:
            self.refuse(413)
            return
        assert self.content is not None
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.http2:
            self._http2_received(command, path, version)
            return
        if self.refused:
            return
        self._received(command, path, version)

    def _http2_received(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._body_deadline is not None:
            if not self._body_deadline.active():
                return  # already answered 408
            self._body_deadline.cancel()
            self._body_deadline = None
        status = self._refusal or self._check_http2_head(command, path)
        if status:
            self.refused = True
            self.method, self.uri = command or b"-", path or b"-"
            self.clientproto = version
            self.note = "refused"
            self.respond_error(status)
            return
        self._received(command, path, version)

    def _received(self, command: bytes, path: bytes, version: bytes) -> None:
        assert self.content is not None
        self.content.seek(0, 0)
        self.args = {}
        self.method, self.uri = command, path
        self.clientproto = version
        self.path = path.partition(b"?")[0]
        self.process()

    def process(self) -> None:
        try:
            self.site.resource.render(self)
        except Exception:
            self.processingFailed(Failure())

    def connectionLost(self, reason: Failure) -> None:
        if self._body_deadline is not None and self._body_deadline.active():
            self._body_deadline.cancel()
        if not self.finished and not self.note:
            self.note = "client closed"
        self.log_access()
        super().connectionLost(reason)

    def processingFailed(self, reason: Failure) -> None:
        """
        A bug in l7lb must cost one request, never the process.
        """
        self.log.failure("internal error while handling {uri}", reason, uri=self.uri)
        if self.channel is None or self.finished:
            return
        if self.startedWriting:
            self.abort("internal error")
        else:
            self.respond_error(500)

    def respond_error(
        self, status: int, headers: dict[bytes, bytes] | None = None
    ) -> None:
        """
        Answer with a short plain-text error of l7lb's own.
        """
        if self.channel is None or self.finished:
            return
        if status == 400 and not self.http2:
            # After a request l7lb could not make sense of, trust nothing
            # more on this connection.
            self.channel.persistent = False
        content = errors.body(status)
        self.setResponseCode(status, errors.reason(status))
        self.responseHeaders = response = Headers()
        raw = response._rawHeaders
        raw[b"Date"] = [self.site.date()]
        raw[b"Content-Type"] = [errors.CONTENT_TYPE]
        raw[b"Content-Length"] = [b"%d" % len(content)]
        if self.request_id != b"-":
            raw[b"X-Request-Id"] = [self.request_id]
        if not self.keeps_alive:
            raw[b"Connection"] = [b"close"]
        for name, value in self.additions:
            raw.setdefault(name, []).append(value)
        for name, value in (headers or {}).items():
            response.setRawHeaders(name, [value])
        self.write(content)
        self.finish()

    def finish(self) -> None:
        super().finish()
        self.log_access()

    def abort(self, note: str) -> None:
        """
        End the exchange without completing the response: the client sees
        the connection close, never a cut-short body that looks whole.
        """
        self.note = note
        self.log_access()
        if self.channel is None:
            return
        if self.http2:
            stream: Any = self.channel
            stream.abortConnection()  # RST_STREAM: the connection's other streams go on
        elif self.chunked or self.responseHeaders.hasHeader(b"Content-Length"):
            # The client sees the missing end of a delimited body.
            self.channel.loseConnection()
        else:
            # A body delimited by the close itself: only a reset says "cut".
            transport: Any = self.channel.transport
            transport.abortConnection()

    def log_access(self) -> None:
        """
        The exchange is over, however it ended: log it once, count it.
        """
        if self._logged:
            return
        self._logged = True
        site = self.site
        site.requests_in_flight -= 1
        site.access_log.log(self)
        site.metrics.request(
            self.route_name,
            self.pool_name,
            self.backend_address,
            self.code,
            site.clock.seconds() - self.started,
            self.body_size,
            self.sentLength,
        )
        if self.upstream_seconds is not None:
            site.metrics.upstream(
                self.pool_name, self.backend_address, self.upstream_seconds
            )
        if site.draining and site.requests_in_flight == 0:
            site.connections.drained()


# What a header value may hold (RFC 9110 section 5.5): visible characters,
# space, tab and obs-text; anything else (NUL, CR, LF, other controls) is 400.
_VALUE_BYTES = bytes([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])


class BalancerChannel(http.HTTPChannel):
    """
    HTTP/1.1 connection handling with l7lb's limits and strictness.

    On top of twisted.web's parser: the right statuses for oversized heads
    (414, 431), a deadline for the whole request head and another for the
    body (408: a client trickling bytes does not keep resetting an idle
    timer), a cap on the number of header fields, and 400 for what could
    smuggle a request past a backend that reads it differently: obs-fold
    continuation lines, control characters in values, any Transfer-Encoding
    but chunked, absurd Content-Length values. C{Expect: 100-continue} is
    answered only once the request's route and limits have accepted it.
    """

    site: BalancerSite
    _refused = False
    _request_line_size = 0
    _header_count = 0
    _lingering: Any = None
    _deadline: Any = None
    # How long a refused client may go on sending before l7lb resets.
    LINGER = 5.0

    def connectionMade(self) -> None:
        limits = self.site.limits
        self.max_uri_length = limits.max_uri_length
        self.max_header_size = limits.max_header_size
        self.max_headers = limits.max_headers
        # Lines longer than this cannot be valid; stop buffering them.
        self.MAX_LENGTH = max(self.max_uri_length + 64, self.max_header_size)
        # The head limits are enforced here, with the right statuses.
        self.totalHeadersSize = self.max_uri_length + self.max_header_size + 64 + 1
        self.maxHeaders = limits.max_headers + 1
        super().connectionMade()

    def _start_deadline(self, seconds: float) -> None:
        self._stop_deadline()
        self._deadline = self.callLater(seconds, self._too_slow)

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        self.refuse(408)

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._deadline is None and not self._handlingRequest:
            # The first bytes of a request: its whole head must follow in time.
            self._start_deadline(self.site.limits.client_header_timeout)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if self._receivedHeaderSize == 0 and line:
            target = line.partition(b" ")[2].rpartition(b" ")[0]
            if len(target) > self.max_uri_length:
                self.refuse(414)
                return
            self._request_line_size = len(line)
            self._header_count = 0
        elif line:
            if (
                self._receivedHeaderSize - self._request_line_size + len(line)
                > self.max_header_size
            ):
                self.refuse(431)
                return
            if line[0] in b" \t":
                # obs-fold: folded lines are how some requests get smuggled.
                self.refuse(400)
                return
            self._header_count += 1
            if self._header_count > self.max_headers:
                self.refuse(431)
                return
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        name, colon, value = line.partition(b":")
        if colon:
            value = value.strip(b" \t")
            if value.translate(None, _VALUE_BYTES):
                self.refuse(400)
                return False
            lowered = name.lower()
            if lowered == b"transfer-encoding" and value.lower() != b"chunked":
                self.refuse(400)
                return False
            if lowered == b"content-length" and len(value) > 18:
                self.refuse(400)
                return False
        ok: bool = super().headerReceived(line)
        return ok

    def allHeadersReceived(self) -> None:
        self._stop_deadline()
        super().allHeadersReceived()
        if self._refused:
            return
        if self.length != 0:
            self._start_deadline(self.site.limits.client_body_timeout)

    def allContentReceived(self) -> None:
        self._stop_deadline()
        super().allContentReceived()

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """
        Keep the connection open after this request? twisted.web splits the
        Connection header on spaces, so C{Connection: close, X-Foo} would
        not close; its tokens are comma-separated (RFC 9110 section 7.6.1).
        """
        tokens = connection_tokens(request.requestHeaders.getRawHeaders(b"Connection"))
        if version == b"HTTP/1.1" and b"close" not in tokens:
            return True
        if version == b"HTTP/1.1":
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        return False

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(414 if self._receivedHeaderSize == 0 else 431)

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.refuse(400)

    def _send100Continue(self) -> None:
        """
        Ask the balancer whether it will take the request before inviting
        the body: a refusal is answered now, and the body never read.
        """
        if self._refused:
            return
        request = self.requests[-1]
        assert isinstance(request, BalancerRequest)
        request.method, request.uri = self._command, self._path
        request.clientproto = self._version
        verdict = self.site.resource.admit(request, self._command, self._path)
        status = getattr(verdict, "status", None)
        if status is None:
            super()._send100Continue()
        else:
            self.refuse(status, getattr(verdict, "headers", {}))

    def refuse(self, status: int, headers: dict[bytes, bytes] | None = None) -> None:
        """
        Answer a request that cannot be read (or may not be) and close: the
        rest of what the client sends is ignored.
        """
        if self._refused:
            return
        self._refused = True
        self._stop_deadline()
        request = self.requests[-1] if self.requests else None
        if isinstance(request, BalancerRequest):
            request.refused = True
            request.method = getattr(self, "_command", b"-")
            request.uri = getattr(self, "_path", b"-")
            request.clientproto = getattr(self, "_version", b"-")
            request.code = status
            request.note = "refused"
            request.log_access()
        else:
            self.site.access_log.log_refusal(self.getPeer(), status)
        self.write(errors.raw_response(status, headers))
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
            self.loseConnection()
            return
        network: Any = self._networkProducer
        network.unregisterProducer()
        transport.loseWriteConnection()
        self._lingering = self.callLater(self.LINGER, transport.abortConnection)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_deadline()
        if self._lingering is not None and self._lingering.active():
            self._lingering.cancel()
        super().connectionLost(reason)


class ClientConnection(_GenericHTTPChannelProtocol):
    """
    A client connection: HTTP/1.x through L{BalancerChannel}, or HTTP/2 when
    TLS negotiated C{h2} by ALPN (twisted.web's own switch); counted by the
    site for its connection caps and for draining.
    """

    host = ""

    def makeConnection(self, transport: Any) -> None:
        # The IProtocol methods go to the channel; this is where the
        # connection begins for this wrapper.
        self.transport = transport
        self.host = getattr(transport.getPeer(), "host", "") or ""
        self.site.connections.opened(self)
        super().makeConnection(transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.site.connections.closed(self)
        super().connectionLost(reason)

    @property
    def idle(self) -> bool:
        """
        No request is being read or answered on this connection.
        """
        channel = self._channel
        if isinstance(channel, BalancerChannel):
            return not channel.requests and not channel._receivedHeaderSize
        return not getattr(channel, "streams", None)

    def close_when_done(self) -> None:
        """
        Answer what is under way with C{Connection: close}, then close; close
        at once if nothing is.
        """
        channel = self._channel
        if isinstance(channel, BalancerChannel):
            channel.persistent = False
        if self.idle:
            self.transport.loseConnection()


def _client_connection() -> ClientConnection:
    return ClientConnection(BalancerChannel())


class BalancerSite(server.Site):
    """
    Serves every request with one resource, the balancer, under l7lb's limits.
    C{scheme} is C{https} for a TLS listener's site.
    """

    requestFactory = BalancerRequest  # type: ignore[assignment]
    protocol = staticmethod(_client_connection)

    def __init__(
        self,
        resource: IResource,
        limits: LBConfig,
        access_log: AccessLog,
        clock: IReactorTime,
        timeout: float,
        scheme: bytes = b"http",
        trusted: TrustedProxies | None = None,
        connections: ConnectionCounts | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(resource, reactor=clock, timeout=timeout)
        self.limits = limits
        self.access_log = access_log
        self.clock = clock
        self.scheme = scheme
        self.date = HTTPDate(clock)
        self.trusted = trusted or TrustedProxies(())
        self.metrics = metrics or Metrics()
        self.connections = connections or ConnectionCounts(self.metrics)
        # Requests begun and not yet logged: what draining waits for.
        self.requests_in_flight = 0
        self.draining = False

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if not self.connections.admits(addr, self.limits):
            return None  # the reactor closes it at once
        protocol = super().buildProtocol(addr)
        if protocol is not None and self.draining:
            protocol._channel.persistent = False
        return protocol

    def log(self, request: Any) -> None:
        """
        The access log is written by L{BalancerRequest}, which also sees
        exchanges that end without a finished response.
        """
