# -*- test-case-name: tests.test_proxy -*-
"""
The forwarding path: one client request sent to a backend of its pool and
the answer streamed back.

The response body is relayed as it arrives, with back-pressure: the
exchange is the producer of the client's response, so a slow client pauses
the read from the backend instead of growing a buffer. A client that goes
away abandons the backend request. A backend that fails mid-body makes the
client's connection close (or its HTTP/2 stream reset), so a cut-short
response never looks complete. A backend that refuses or fails before
answering gets the request retried on another backend in rotation, within
the pool's retries and retry budget, when that is safe (nothing was sent,
or the method is idempotent).
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from l7lb.deadlines import NEVER, Deadlines
from l7lb.headers import (
    downstream_response_block,
    downstream_response_fields,
    upstream_request_block,
)
from l7lb.pool import Backend, Pool, Waiter
from l7lb.request import ClientRequest
from l7lb.trust import TrustedProxies
from l7lb.upstream import (
    IDEMPOTENT,
    Call,
    ConnectFailed,
    NoResponse,
    ResponseHead,
    UpstreamError,
    UpstreamRequest,
)


class _LocalError(UpstreamError):
    """
    The upstream client refused the request before sending anything.
    """

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.getErrorMessage())
        self.failure = failure


@implementer(IPushProducer)
class _Exchange:
    """
    The life of one proxied request: choosing a backend (or waiting in the
    pool's queue for one), retries within the pool's budget, relaying the
    response, telling passive health how each attempt went, and tidying up
    if either side goes away.

    Its deadline is the response timeout until the response head arrives,
    then the idle timeout between body bytes from the backend; while the
    client is the one holding things up (it does not read, and the backend
    read is paused), the client has C{[lb] send_timeout} to take more.
    """

    deadline = NEVER
    backend: Backend | None = None
    call: Call | None = None
    waiter: Waiter | None = None
    cookie: bytes | None = None
    head_received = False
    timed_out = False
    retrying = False
    client_left = False
    paused = False
    sent_at = 0.0

    def __init__(
        self,
        forwarder: Forwarder,
        request: ClientRequest,
        pool: Pool,
        target: bytes,
    ) -> None:
        self.forwarder = forwarder
        self.request = request
        self.pool = pool
        self.method = request.method
        self.upstream = UpstreamRequest(
            request.method,
            target,
            [],
            request.body,
            request.body_size,
            raw=forwarder.upstream_block(request),
        )
        self.tried: list[Backend] = []

    def start(self) -> None:
        self.request.exchange = self
        self._attempt(None)

    # Choosing a backend

    def _attempt(self, failed_status: int | None) -> None:
        """
        Send the request to a backend not yet tried, or queue it when the
        caps are reached. C{failed_status} is the answer of the attempt
        before, if any, given when no backend is left.
        """
        pool = self.pool
        backend = None if pool.at_capacity() else self._choose()
        if backend is not None:
            self._dispatch(backend)
        elif pool.any_in_rotation(self.tried):
            self._queue(failed_status)
        elif failed_status is None:
            self.request.respond_error(503, {b"Retry-After": pool.retry_after})
        else:
            self.request.respond_error(failed_status)

    def _choose(self) -> Backend | None:
        """
        The backend a sticky cookie names, if it can take the request;
        otherwise the pool's strategy (and a cookie naming its choice).
        """
        pool, request = self.pool, self.request
        cookie_name = pool.sticky_cookie
        if cookie_name is not None:
            token = request.cookies.get(cookie_name)
            backend = pool.sticky_backend(token, self.tried)
            if backend is not None:
                return backend
        key = request_key(pool.config.hash_key, request) if pool.hashes else None
        backend = pool.choose(self.tried, key)
        if cookie_name is not None and backend is not None:
            self.cookie = _sticky_cookie(
                cookie_name, pool.token_of[backend], request.scheme == b"https"
            )
        return backend

    def _queue(self, failed_status: int | None) -> None:
        """
        Every backend that could take the request is at its cap (or the pool
        is): wait for a slot, up to C{queue_timeout}; a full queue means 503
        at once.
        """
        pool = self.pool

        def resume(ok: bool) -> bool:
            if not ok:
                self.waiter = None
                self.request.respond_error(503, {b"Retry-After": b"1"})
                return True
            backend = None if pool.at_capacity() else self._choose()
            if backend is None:
                return False  # not this slot: stay queued, deadline unchanged
            assert self.waiter is not None
            pool.cancel(self.waiter)
            self.waiter = None
            self._dispatch(backend)
            return True

        self.waiter = pool.wait(resume)
        if self.waiter is None:
            self.request.respond_error(503, {b"Retry-After": b"1"})

    def _dispatch(self, backend: Backend) -> None:
        pool, request, forwarder = self.pool, self.request, self.forwarder
        self.tried.append(backend)
        self.backend = backend
        request.backend_address = backend.address
        request.pool_name = pool.name
        pool.acquire(backend)
        if self.retrying:
            pool.retries_inflight += 1
        self.timed_out = False
        self.sent_at = now = forwarder.clock.seconds()
        self.deadline = now + pool.config.response_timeout
        forwarder.deadlines.watch(self)
        attempt = len(self.tried)
        try:
            call = backend.client.send(self.upstream, self)
        except Exception:
            # Refused before anything was sent: l7lb's doing, not the
            # backend's, so passive health must not hear of it.
            self.response_failed(_LocalError(Failure()))
            return
        if self.backend is backend and len(self.tried) == attempt:
            # Still this attempt (an in-memory client may have answered or
            # failed already, inside send).
            self.call = call

    def _release(self) -> Backend | None:
        """
        The attempt is over: its slot goes back (perhaps to a queued request).
        """
        self.forwarder.deadlines.unwatch(self)
        self.call = None
        backend, self.backend = self.backend, None
        if backend is None:
            return None
        if self.retrying:
            self.retrying = False
            self.pool.retries_inflight -= 1
        self.pool.release(backend)
        return backend

    def backend_failed(self, backend: Backend, reason: str) -> None:
        self.forwarder.log.warn(
            "request to backend {backend} of pool {pool} failed: {reason}",
            backend=backend.address,
            pool=self.pool.name,
            reason=reason,
        )
        if backend.passive is not None:
            backend.passive.failure(reason)

    # ResponseReceiver

    def response_head(self, head: ResponseHead) -> None:
        try:
            self._relay_head(head)
        except Exception:
            self._internal_error()

    def _relay_head(self, head: ResponseHead) -> None:
        backend, request, forwarder = self.backend, self.request, self.forwarder
        assert backend is not None
        self.head_received = True
        now = forwarder.clock.seconds()
        request.upstream_seconds = backend.last_latency = now - self.sent_at
        code = head.code
        passive = backend.passive
        if passive is not None:
            if code >= 500 and self.pool.config.fail_on_5xx:
                passive.failure(f"status {code}")
            else:
                passive.success()
        raw = (
            downstream_response_block(
                head.fields,
                via=head.version + b" l7lb",
                request_id=request.request_id,
                additions=request.additions,
            )
            if request.takes_raw_fields
            else None
        )
        if raw is None:
            raw = b""
            fields = downstream_response_fields(
                head.fields,
                via=head.version + b" l7lb",
                request_id=request.request_id,
                additions=request.additions,
            )
        else:
            fields = []
        if self.cookie is not None:
            fields.append((b"Set-Cookie", self.cookie))
        if b"date" not in head.fields.index:
            # RFC 9110 section 6.6.1: a recipient with a clock adds one.
            fields.append((b"Date", request.site.date()))
        content_length, bodiless = _framing(head, self.method)
        request.start_response(code, head.reason, fields, content_length, bodiless, raw)
        self.deadline = now + self.pool.config.idle_timeout
        request.register_producer(self)

    def response_body(self, data: bytes) -> None:
        if not self.paused:
            self.deadline = (
                self.forwarder.clock.seconds() + self.pool.config.idle_timeout
            )
        try:
            self.request.write(data)
        except Exception:
            self._internal_error()

    def response_end(self) -> None:
        self._release()
        request = self.request
        try:
            request.unregister_producer()
            request.finish()
        except Exception:
            request.processing_failed(Failure())

    def response_failed(self, error: UpstreamError) -> None:
        try:
            if self.head_received:
                self._body_failed(str(error) or type(error).__name__, 502)
            else:
                self._attempt_failed(error)
        except Exception:
            self.request.processing_failed(Failure())

    def _internal_error(self) -> None:
        """
        A bug in l7lb while relaying: this exchange ends (a 500, or a cut
        connection if the answer has begun), with one logged traceback.
        """
        failure = Failure()
        call = self.call
        self._release()
        if call is not None:
            call.cancel()
        self.request.processing_failed(failure)

    # Failures

    def _attempt_failed(self, error: UpstreamError) -> None:
        backend = self._release()
        if self.client_left or backend is None:
            return
        request = self.request
        if isinstance(error, _LocalError):
            self.forwarder.log.failure("request could not be sent", error.failure)
            request.respond_error(502)
            return
        status, retry = self._judge(error)
        self.backend_failed(
            backend,
            "no response headers within the response timeout"
            if self.timed_out
            else f"{type(error).__name__}: {error}",
        )
        pool = self.pool
        if retry and len(self.tried) <= pool.config.retries and pool.may_retry():
            self.retrying = True
            pool.retried += 1
            self._attempt(status)
        else:
            request.respond_error(status)

    def _judge(self, error: UpstreamError) -> tuple[int, bool]:
        """
        The status for a failed attempt, and whether another backend may be
        tried: always when no connection was made, for an idempotent request
        when the connection failed before a response arrived.
        """
        if self.timed_out:
            return 504, False
        if isinstance(error, ConnectFailed):
            return (504 if error.timed_out else 502), True
        if isinstance(error, NoResponse):
            return 502, self.method in IDEMPOTENT
        return 502, False

    def _body_failed(self, why: str, status: int) -> None:
        backend = self._release()
        request = self.request
        request.unregister_producer()
        if self.client_left:
            return
        if backend is not None:
            self.backend_failed(backend, f"failed mid-body: {why}")
        if not request.started_writing:
            # Nothing has reached the client yet: it can still have a clean
            # answer instead of a cut one.
            request.respond_error(status)
        else:
            request.abort("backend failed mid-body")

    # Deadlines

    def expired(self) -> None:
        if self.paused:
            self._client_stalled()
            return
        call = self.call
        self.call = None
        if call is not None:
            call.cancel()
        if self.head_received:
            self._body_failed("no body bytes within the idle timeout", 504)
        else:
            self.timed_out = True
            self._attempt_failed(NoResponse("response timeout"))

    # IPushProducer: the client's side of the relay

    def pauseProducing(self) -> None:
        self.paused = True
        request = self.request
        self.deadline = (
            self.forwarder.clock.seconds() + request.site.limits.send_timeout
        )
        if self.call is not None:
            self.call.pause()

    def _client_stalled(self) -> None:
        """
        The client took nothing of the answer for C{send_timeout}: it loses
        the exchange (and its connection), the backend is not to blame.
        """
        self.client_left = True
        call = self.call
        self._release()
        if call is not None:
            call.cancel()
        self.request.abort("client did not read within send_timeout")

    def resumeProducing(self) -> None:
        self.paused = False
        if self.call is not None:
            self.deadline = (
                self.forwarder.clock.seconds() + self.pool.config.idle_timeout
            )
            self.call.resume()

    def stopProducing(self) -> None:
        self.client_left = True
        call = self.call
        self._release()
        if call is not None:
            call.cancel()

    # The client went away

    def client_gone(self) -> None:
        """
        The client is gone: whatever is under way for it stops.
        """
        self.client_left = True
        if self.waiter is not None:
            self.pool.cancel(self.waiter)
            self.waiter = None
        call = self.call
        self._release()
        if call is not None:
            call.cancel()


def _framing(head: ResponseHead, method: bytes) -> tuple[bytes | None, bool]:
    """
    The Content-Length to relay and whether the response has no body: a
    length-delimited body keeps its length; HEAD and 304 keep the
    representation's, without a body.
    """
    if method == b"HEAD" or head.code == 304:
        # The representation's length, relayed only when it is one number.
        lengths = head.fields.index.get(b"content-length") or []
        valid = len(lengths) == 1 and lengths[0].isdigit()
        return (lengths[0] if valid else None), True
    if head.bodiless:
        return None, True
    if head.length is not None:
        return b"%d" % head.length, False
    return None, False


def _sticky_cookie(name: bytes, token: bytes, secure: bool) -> bytes:
    value = b"%s=%s; Path=/; HttpOnly; SameSite=Lax" % (name, token)
    return value + b"; Secure" if secure else value


def request_key(spec: str, request: ClientRequest) -> bytes:
    """
    What a hashing pool hashes: the client's address, a header's value or a
    cookie's (the client's address when the request has neither).
    """
    if spec.startswith("header:"):
        value = request.headers.first(spec[7:].encode())
        if value:
            return value
    elif spec.startswith("cookie:"):
        cookie = request.cookies.get(spec[7:].encode())
        if cookie:
            return cookie
    return request.client_address.encode()


class Forwarder:
    """
    Sends requests to backends and relays their answers; shared by every
    request of a running configuration.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, trusted: TrustedProxies) -> None:
        self.clock = clock
        self.trusted = trusted
        self.deadlines = Deadlines.of(clock)

    def forward(self, request: ClientRequest, pool: Pool, target: bytes) -> None:
        """
        Proxy C{request} to a backend of C{pool}, as C{target} (origin form).
        """
        _Exchange(self, request, pool, target).start()

    def upstream_block(self, request: ClientRequest) -> bytes:
        """
        The header fields to send the backend, serialised.
        """
        client_ip = request.client_ip
        block = upstream_request_block(
            request.headers,
            client_ip=client_ip,
            trusted_peer=self.trusted.contains(client_ip),
            proto=request.scheme,
            via=request.version[5:] + b" l7lb",
            request_id=request.request_id,
        )
        if b"host" not in request.headers.index:
            # An HTTP/1.0 request without Host: name what the client reached
            # (l7lb's own address), never the backend's internal one.
            block = b"Host: %s\r\n%s" % (request.local_authority(), block)
        return block
