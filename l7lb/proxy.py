# -*- test-case-name: tests.test_proxy -*-
"""
The forwarding path: one client request sent to a backend of its pool and
the answer streamed back.

The response body is relayed as it arrives, with back-pressure: the
backend's connection is registered as the producer of the client's
response, so a slow client pauses the read from the backend instead of
growing a buffer. A client that goes away aborts the backend request. A
backend that fails mid-body closes the client connection, so a cut-short
response never looks complete. A backend that refuses or resets before
answering gets the request retried once on another backend in rotation,
when that is safe (nothing was sent, or the method is idempotent).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import IO, Any, TypeVar, cast

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectError, ConnectingCancelledError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.http import NO_BODY_CODES, PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from l7lb.errors import describe_failure
from l7lb.headers import downstream_response_headers, upstream_request_headers
from l7lb.pool import Backend, Pool, Waiter
from l7lb.site import BalancerRequest
from l7lb.trust import TrustedProxies
from l7lb.upstream import connection_headers


def _guarded(method: _M) -> _M:
    """
    A bug in l7lb while handling one exchange costs that exchange (a 500, or
    the connection when the response has begun) and one logged traceback;
    it never reaches the reactor or another request.
    """

    @functools.wraps(method)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception:
            exchange = getattr(self, "exchange", self)
            exchange.request.processingFailed(Failure())
            return None

    return cast(_M, guarded)


_M = TypeVar("_M", bound=Callable[..., Any])


class _LocalError(Exception):
    """
    The upstream client refused the request before sending anything.
    """

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.getErrorMessage())
        self.failure = failure


# RFC 9110 section 9.2.2: a request that may be sent twice.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


@implementer(IBodyProducer)
class BufferedBody:
    """
    The client's request body, already received in full (in memory, or in a
    temporary file when large), sent with a Content-Length of l7lb's own.
    Writes stop while the backend's socket is full. Each attempt gets a
    producer of its own over the same content, so a retry can replay it
    while the failed attempt's producer is being stopped.
    """

    def __init__(self, content: IO[bytes], length: int) -> None:
        self.content = content
        self.length = length
        self._consumer: IConsumer | None = None
        self._done: Deferred[None] | None = None
        self._paused = False
        self._pumping = False

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self.content.seek(0)
        self._consumer = consumer
        self._paused = False
        self._done = done = Deferred[None]()
        self._pump()
        return done

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._paused and self._done is not None:
                if self.content.closed:  # the exchange is over
                    self._done = None
                    return
                chunk = self.content.read(65536)
                if not chunk:
                    done, self._done = self._done, None
                    done.callback(None)
                    return
                assert self._consumer is not None
                self._consumer.write(chunk)
        finally:
            self._pumping = False

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._done = None


@implementer(IPushProducer)
class _ResponseRelay(Protocol):
    """
    Receives a backend's response body and writes it to the client. It is
    the producer of the client's response: a slow client pauses the read
    from the backend. Between body bytes the backend gets C{idle_timeout},
    a clock that stops while the client is the one holding things up.
    """

    def __init__(self, exchange: _Exchange, backend: Backend) -> None:
        self.exchange = exchange
        self.backend = backend
        self.idle: IDelayedCall | None = None
        self.idled_out = False
        self.paused = False

    def connectionMade(self) -> None:
        exchange = self.exchange
        if exchange.client_gone:
            return
        exchange.request.registerProducer(self, True)
        self._arm()

    def _arm(self) -> None:
        self.idle = self.exchange.forwarder.clock.callLater(
            self.exchange.pool.config.idle_timeout, self._idled
        )

    def _disarm(self) -> None:
        if self.idle is not None and self.idle.active():
            self.idle.cancel()
        self.idle = None

    def _idled(self) -> None:
        self.idle = None
        self.idled_out = True
        self.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.idle is not None:
            self.idle.reset(self.exchange.pool.config.idle_timeout)
        if not self.exchange.client_gone:
            self.exchange.request.write(data)

    def pauseProducing(self) -> None:
        self.paused = True
        self._disarm()
        if self.transport is not None:
            cast(IPushProducer, self.transport).pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        if self.idle is None and not self.idled_out:
            self._arm()
        if self.transport is not None:
            cast(IPushProducer, self.transport).resumeProducing()

    def stopProducing(self) -> None:
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()

    @_guarded
    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        self._disarm()
        exchange = self.exchange
        exchange.relay = None
        exchange.stop_body()
        exchange.release(self.backend)
        if exchange.client_gone:
            return
        request = exchange.request
        request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss):
            request.finish()
            return
        why = (
            "no body bytes within the idle timeout"
            if self.idled_out
            else describe_failure(reason)
        )
        exchange.backend_failed(self.backend, f"failed mid-body: {why}")
        if not request.startedWriting:
            # Nothing has reached the client yet: it can still have a clean
            # answer instead of a cut one.
            request.respond_error(504 if self.idled_out else 502)
        else:
            request.abort("backend failed mid-body")


class _Discard(Protocol):
    """
    Takes a response nobody will read and drops its connection.
    """

    def connectionMade(self) -> None:
        cast(IPushProducer, self.transport).stopProducing()


class _Exchange:
    """
    The life of one proxied request: choosing a backend (or waiting in the
    pool's queue for one), retries within the pool's budget, relaying the
    response, telling passive health how each attempt went, and tidying up
    if either side goes away.
    """

    def __init__(
        self,
        forwarder: Forwarder,
        request: BalancerRequest,
        pool: Pool,
        target: bytes,
    ) -> None:
        self.forwarder = forwarder
        self.request = request
        self.pool = pool
        self.method: bytes = request.method
        self.target = target
        self.body: BufferedBody | None = None
        self.headers = forwarder.upstream_headers(request)
        self.client_gone = False
        self.pending: Deferred[IResponse] | None = None
        self.timer: IDelayedCall | None = None
        self.timed_out = False
        self.relay: _ResponseRelay | None = None
        self.tried: list[Backend] = []
        self.retrying = False
        self.waiter: Waiter | None = None
        self.cookie: bytes | None = None
        self.sent_at = 0.0

    def start(self) -> None:
        self.request.notifyFinish().addErrback(self._client_gone)
        self._attempt(None)

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

    def _dispatch(self, backend: Backend) -> None:
        pool = self.pool
        self.tried.append(backend)
        self.request.backend_address = backend.address
        self.request.pool_name = pool.name
        self.sent_at = self.forwarder.clock.seconds()
        pool.acquire(backend)
        if self.retrying:
            pool.retries_inflight += 1
        self.timed_out = False
        self.timer = self.forwarder.clock.callLater(
            pool.config.response_timeout, self._time_out
        )
        request = self.request
        if request.body_size and request.content is not None:
            self.body = BufferedBody(request.content, request.body_size)
        try:
            d = backend.client.request(
                self.method, self.target, self.headers, self.body
            )
        except Exception:
            # Refused before anything was sent: l7lb's doing, not the
            # backend's, so passive health must not hear of it.
            d = fail(_LocalError(Failure()))
        self.pending = d
        d.addCallbacks(
            self._got_response,
            self._failed,
            callbackArgs=(backend,),
            errbackArgs=(backend,),
        )

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

    def release(self, backend: Backend) -> None:
        """
        An attempt is over: its slot goes back (perhaps to a queued request).
        """
        if self.retrying:
            self.retrying = False
            self.pool.retries_inflight -= 1
        self.pool.release(backend)

    def backend_failed(self, backend: Backend, reason: str) -> None:
        self.forwarder.log.warn(
            "request to backend {backend} of pool {pool} failed: {reason}",
            backend=backend.address,
            pool=self.pool.name,
            reason=reason,
        )
        if backend.passive is not None:
            backend.passive.failure(reason)

    def _choose(self) -> Backend | None:
        """
        The backend a sticky cookie names, if it can take the request;
        otherwise the pool's strategy (and a cookie naming its choice).
        """
        pool, request = self.pool, self.request
        cookie_name = pool.sticky_cookie
        token = None
        if cookie_name is not None:
            token = request.received_cookies.get(cookie_name)
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

    def stop_body(self) -> None:
        """
        Stop sending the request body: the backend has answered (perhaps
        early, before reading it all), failed, or the client has gone.
        """
        if self.body is not None:
            self.body.stopProducing()

    def _time_out(self) -> None:
        self.timer = None
        self.timed_out = True
        if self.pending is not None:
            self.pending.cancel()

    def _settle(self) -> None:
        self.pending = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    @_guarded
    def _failed(self, failure: Failure, backend: Backend) -> None:
        self._settle()
        self.stop_body()
        self.release(backend)
        if self.client_gone:
            return
        if isinstance(failure.value, _LocalError):
            self.forwarder.log.failure(
                "request could not be sent", failure.value.failure
            )
            self.request.respond_error(502)
            return
        status, retry = self._judge(failure)
        self.backend_failed(
            backend,
            "no response headers within the response timeout"
            if self.timed_out
            else describe_failure(failure),
        )
        pool = self.pool
        if retry and len(self.tried) <= pool.config.retries and pool.may_retry():
            self.retrying = True
            pool.retried += 1
            self._attempt(status)
        else:
            self.request.respond_error(status)

    def _judge(self, failure: Failure) -> tuple[int, bool]:
        """
        The status for a failed attempt, and whether another backend may be
        tried: always when nothing was sent, for an idempotent request when
        the connection failed before any response byte arrived.
        """
        if self.timed_out:
            return 504, False
        if failure.check(ConnectTimeout):
            return 504, True
        if failure.check(ConnectError, ConnectingCancelledError):
            return 502, True
        if failure.check(ResponseNeverReceived, RequestTransmissionFailed):
            return 502, self.method in IDEMPOTENT
        return 502, False

    @_guarded
    def _got_response(self, response: IResponse, backend: Backend) -> None:
        self._settle()
        latency = self.forwarder.clock.seconds() - self.sent_at
        self.request.upstream_seconds = backend.last_latency = latency
        if self.client_gone or not 100 <= response.code <= 599:
            self.release(backend)
            self.stop_body()
            response.deliverBody(_Discard())
            if not self.client_gone:
                self.backend_failed(backend, f"invalid status {response.code}")
                self.request.respond_error(502)
            return
        if backend.passive is not None:
            if response.code >= 500 and self.pool.config.fail_on_5xx:
                backend.passive.failure(f"status {response.code}")
            else:
                backend.passive.success()
        request = self.request
        request.setResponseCode(response.code, response.phrase)
        headers = request.responseHeaders = downstream_response_headers(
            response.headers,
            connection_headers(response).getRawHeaders(b"Connection"),
            via=b"%d.%d l7lb" % response.version[1:],
            request_id=request.request_id,
            content_length=_content_length(response, self.method),
            additions=request.additions,
        )
        if self.cookie is not None:
            headers._rawHeaders.setdefault(b"Set-Cookie", []).append(self.cookie)
        raw = headers._rawHeaders
        if b"Date" not in raw:
            # RFC 9110 section 6.6.1: a recipient with a clock adds one.
            raw[b"Date"] = [request.site.date()]
        if not request.keeps_alive:
            raw[b"Connection"] = [b"close"]
        self.relay = _ResponseRelay(self, backend)
        response.deliverBody(self.relay)

    def _client_gone(self, failure: Failure) -> None:
        self.client_gone = True
        self.stop_body()
        if self.waiter is not None:
            self.pool.cancel(self.waiter)
            self.waiter = None
        if self.pending is not None:
            self.pending.cancel()
        if self.relay is not None:
            self.relay.stopProducing()


def _sticky_cookie(name: bytes, token: bytes, secure: bool) -> bytes:
    value = b"%s=%s; Path=/; HttpOnly; SameSite=Lax" % (name, token)
    return value + b"; Secure" if secure else value


def request_key(spec: str, request: BalancerRequest) -> bytes:
    """
    What a hashing pool hashes: the client's address, a header's value or a
    cookie's (the client's address when the request has neither).
    """
    if spec.startswith("header:"):
        values = request.requestHeaders.getRawHeaders(spec[7:].encode())
        if values:
            return values[0]
    elif spec.startswith("cookie:"):
        cookie = request.received_cookies.get(spec[7:].encode())
        if cookie:
            return cookie
    return request.client_address.encode()


def _content_length(response: IResponse, method: bytes) -> bytes | None:
    """
    The backend's Content-Length, relayed as sent when the body (or, for
    HEAD and 304, the representation) is length-delimited.
    """
    if method == b"HEAD":
        values: Sequence[bytes] | None = response.headers.getRawHeaders(
            b"Content-Length"
        )
        return values[0] if values else None
    framing = connection_headers(response)
    if framing.hasHeader(b"Transfer-Encoding"):
        return None
    if response.code in NO_BODY_CODES:
        values = framing.getRawHeaders(b"Content-Length")
        return values[0] if values and response.code == 304 else None
    if response.length is UNKNOWN_LENGTH:
        return None
    return b"%d" % response.length


class Forwarder:
    """
    Sends requests to backends and relays their answers; shared by every
    request of a running configuration.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, trusted: TrustedProxies) -> None:
        self.clock = clock
        self.trusted = trusted

    def forward(self, request: BalancerRequest, pool: Pool, target: bytes) -> None:
        """
        Proxy C{request} to a backend of C{pool}, as C{target} (origin form).
        """
        _Exchange(self, request, pool, target).start()

    def upstream_headers(self, request: BalancerRequest) -> Headers:
        client_ip = request.client_ip
        headers = upstream_request_headers(
            request.requestHeaders,
            client_ip=client_ip,
            trusted_peer=self.trusted.contains(client_ip),
            proto=request.scheme,
            via=request.clientproto[5:] + b" l7lb",
            request_id=request.request_id,
        )
        if b"Host" not in headers._rawHeaders:
            # An HTTP/1.0 request without Host: name what the client reached
            # (l7lb's own address), never the backend's internal one.
            headers._rawHeaders[b"Host"] = [request.local_authority()]
        return headers
