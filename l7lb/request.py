# -*- test-case-name: tests.test_site -*-
"""
One client request and the answer it gets, whichever protocol carried it.

L{ClientRequest} holds what the balancer decides on (method, target, header
fields, body, who the client is) and what the access log and metrics need
once the exchange is over, however it ended. The protocols write the answer
on the wire: L{l7lb.http1} for HTTP/1.x connections, L{l7lb.http2} for
HTTP/2 streams.
"""

from __future__ import annotations

from typing import IO, TYPE_CHECKING, Any

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure

from l7lb import errors
from l7lb.fields import Fields

if TYPE_CHECKING:
    from l7lb.site import BalancerSite


class ClientRequest:
    """
    One request from a client. The protocol fills in the request and calls
    L{dispatch}; the balancer answers through L{start_response}, L{write},
    L{finish}, or L{respond_error}, or gives up with L{abort}.
    """

    log = Logger()
    http2 = False

    # The request, as received.
    method = b"-"
    uri = b"-"
    version = b"-"
    body: bytes | IO[bytes] | None = None
    body_size = 0

    # What the balancer made of it.
    route_name = "-"
    pool_name = "-"
    backend_address = "-"
    request_id = b"-"
    # The balancer's verdict, once given (see resource.py).
    admission: Any = None
    # Told when the client goes away before the answer is complete.
    exchange: Any = None
    upstream_seconds: float | None = None

    # The answer.
    code = 0
    sent_length = 0
    # Bytes of the answer have gone out (until then an error can replace it).
    started_writing = False
    finished = False
    # The client went away (or the exchange was aborted) before the end.
    gone = False
    refused = False
    note = ""
    _logged = False
    _client_address: str | None = None
    _cookies: dict[bytes, bytes] | None = None

    def __init__(self, site: BalancerSite, client_ip: str) -> None:
        self.site = site
        self.scheme: bytes = site.scheme
        self.client_ip = client_ip
        self.started: float = site.clock.seconds()
        self.headers = Fields()
        # l7lb's own headers for the response (HSTS, rate limit state...).
        self.additions: list[tuple[bytes, bytes]] = []
        site.requests_in_flight += 1

    # What the protocol provides.

    def local_address(self) -> Any:
        """
        The address the client connected to (C{IAddress}).
        """
        raise NotImplementedError

    # Whether the answer's header fields may be given serialised (see
    # start_response's raw).
    takes_raw_fields = False

    def _send_head(
        self,
        code: int,
        reason: bytes,
        fields: list[tuple[bytes, bytes]],
        content_length: bytes | None,
        bodiless: bool,
        raw: bytes,
    ) -> None:
        raise NotImplementedError

    def _send_data(self, data: bytes) -> None:
        raise NotImplementedError

    def _send_end(self) -> None:
        raise NotImplementedError

    def _send_abort(self) -> None:
        raise NotImplementedError

    def register_producer(self, producer: IPushProducer) -> None:
        """
        C{producer} makes the response body; it is paused while the client
        reads slower than it writes.
        """
        raise NotImplementedError

    def unregister_producer(self) -> None:
        raise NotImplementedError

    # What the balancer asks about the request.

    def dispatch(self) -> None:
        """
        The request is complete: hand it to the balancer.
        """
        try:
            self.site.resource.render(self)
        except Exception:
            self.processing_failed(Failure())

    @property
    def client_address(self) -> str:
        """
        Who the client is: the peer, or what a trusted proxy in front of
        l7lb says in X-Forwarded-For (what access lists and rate limits
        judge).
        """
        address = self._client_address
        if address is None:
            address = self._client_address = self.site.trusted.client_address(
                self.client_ip, self.headers.index.get(b"x-forwarded-for")
            )
        return address

    @property
    def cookies(self) -> dict[bytes, bytes]:
        """
        The request's cookies by name (the first of each name).
        """
        cookies = self._cookies
        if cookies is None:
            cookies = self._cookies = {}
            for value in self.headers.index.get(b"cookie", ()):
                for pair in value.split(b";"):
                    name, equals, content = pair.strip().partition(b"=")
                    if equals and name not in cookies:
                        cookies[name] = content
        return cookies

    def local_authority(self) -> bytes:
        """
        The address the client connected to, as a Host value.
        """
        host = self.local_address()
        name = getattr(host, "host", "localhost")
        port = getattr(host, "port", None)
        name = f"[{name}]" if ":" in name else name
        return (f"{name}:{port}" if port else name).encode("ascii", "replace")

    # Answering.

    def start_response(
        self,
        code: int,
        reason: bytes,
        fields: list[tuple[bytes, bytes]],
        content_length: bytes | None = None,
        bodiless: bool = False,
        raw: bytes = b"",
    ) -> None:
        """
        Begin the answer: status and header fields. C{content_length} frames
        the body when it is known; C{bodiless} says there is none (HEAD,
        204, 304), in which case C{content_length} is the representation's.
        C{raw} holds field lines already serialised (each ending in CRLF),
        which come before C{fields}; only where C{takes_raw_fields}.
        """
        if self.gone or self.finished:
            return
        self.code = code
        self._send_head(code, reason, fields, content_length, bodiless, raw)

    def write(self, data: bytes) -> None:
        if self.gone or self.finished or not data:
            return
        self.sent_length += len(data)
        self._send_data(data)

    def finish(self) -> None:
        if self.gone or self.finished:
            return
        self.finished = True
        # Logged first: ending the answer may start the next pipelined
        # request, whose line must come after this one's.
        self.log_access()
        self._send_end()

    def respond_error(
        self, status: int, headers: dict[bytes, bytes] | None = None
    ) -> None:
        """
        Answer with a short plain-text error of l7lb's own.
        """
        if self.gone or self.finished or self.started_writing:
            return
        content = errors.body(status)
        fields = [
            (b"Date", self.site.date()),
            (b"Content-Type", errors.CONTENT_TYPE),
        ]
        if self.request_id != b"-":
            fields.append((b"X-Request-Id", self.request_id))
        fields.extend(self.additions)
        if headers:
            fields.extend(headers.items())
        self.start_response(status, errors.reason(status), fields, b"%d" % len(content))
        self.write(content)
        self.finish()

    def abort(self, note: str) -> None:
        """
        End the exchange without completing the response: the client sees
        the connection (or, in HTTP/2, the stream) reset or closed early,
        never a cut-short body that looks whole.
        """
        if self.gone or self.finished:
            return
        self.note = note
        self.gone = True
        self.log_access()
        self._send_abort()

    def processing_failed(self, reason: Failure) -> None:
        """
        A bug in l7lb must cost one request, never the process.
        """
        self.log.failure("internal error while handling {uri}", reason, uri=self.uri)
        if self.gone or self.finished:
            return
        if self.started_writing:
            self.abort("internal error")
        else:
            self.respond_error(500)

    def connection_lost(self) -> None:
        """
        The client went away before the answer was complete.
        """
        if self.finished or self.gone:
            return
        self.gone = True
        if not self.note:
            self.note = "client closed"
        exchange = self.exchange
        self.log_access()
        if exchange is not None:
            exchange.client_gone()

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
        now = site.clock.seconds()
        site.metrics.request(
            self.route_name,
            self.pool_name,
            self.backend_address,
            self.code,
            now - self.started,
            self.body_size,
            self.sent_length,
        )
        if self.upstream_seconds is not None:
            site.metrics.upstream(
                self.pool_name, self.backend_address, self.upstream_seconds
            )
        if site.draining and site.requests_in_flight == 0:
            site.connections.drained()
        # Nothing needs the body or the exchange any more: a body in a
        # temporary file gives back its disk space and descriptor now, not
        # at the next garbage collection, and no cycle keeps them.
        self.exchange = None
        body = self.body
        if body is not None and not isinstance(body, bytes):
            body.close()
