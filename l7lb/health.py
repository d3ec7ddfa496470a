# -*- test-case-name: tests.test_health -*-
"""
Active health checks: a probe per backend on a timer, and the rise/fall
state machine that moves the backend out of rotation and back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import (
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    ResponseDone,
    _HTTP11ClientFactory,
)
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from l7lb.config import HealthCheckConfig
from l7lb.errors import describe_failure
from l7lb.pool import Backend
from l7lb.units import format_duration


class _QuietClientFactory(_HTTP11ClientFactory):
    """
    Twisted's client factory without a log line for every new connection.
    """

    noisy = False


def quiet_pool(reactor: Any, persistent: bool) -> HTTPConnectionPool:
    """
    A connection pool for probes that does not log each connection it opens.
    """
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool._factory = _QuietClientFactory
    return pool


@implementer(IAgentEndpointFactory)
class _FixedEndpoint:
    """
    Every request of an agent goes to one prepared endpoint, so the agent
    neither re-parses nor re-resolves the backend's address per request.
    """

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def endpointForURI(self, uri: object) -> IStreamClientEndpoint:
        return self._endpoint


def fixed_agent(
    reactor: Any, endpoint: IStreamClientEndpoint, pool: HTTPConnectionPool
) -> Agent:
    """
    An agent (for treq) whose every request goes to C{endpoint}.
    """
    agent: Agent = Agent.usingEndpointFactory(
        reactor, _FixedEndpoint(endpoint), pool=pool
    )
    return agent


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """
    One health check's verdict and, when it failed, why.
    """

    ok: bool
    reason: str


class HealthProbe(Protocol):
    """
    Checks a backend once. The Deferred always fires with a L{ProbeResult};
    it never fails.
    """

    def probe(self) -> Deferred[ProbeResult]: ...


class _HTTPClient(Protocol):
    """
    The part of treq's C{HTTPClient} (and of C{StubTreq}) a probe uses.
    """

    def get(
        self,
        url: str,
        /,
        *,
        headers: Any = ...,
        allow_redirects: bool = ...,
        unbuffered: bool = ...,
    ) -> Deferred[Any]: ...


class _Drain(TwistedProtocol):
    """
    Reads and drops a probe's response body, so its connection is released;
    cancelling the returned Deferred drops the connection instead.
    """

    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred(lambda d: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if not self.done.called:
            self.done.callback(None)


class HTTPProbe:
    """
    C{GET health_path} on the backend with treq, over the checker's own
    connections (never the proxy's), judged by status within the timeout.
    """

    def __init__(
        self,
        client: _HTTPClient,
        url: str,
        check: HealthCheckConfig,
        clock: IReactorTime,
    ) -> None:
        self._client = client
        self._url = url
        self._check = check
        self._clock = clock

    def probe(self) -> Deferred[ProbeResult]:
        timed_out = False

        def time_out() -> None:
            nonlocal timed_out
            timed_out = True
            d.cancel()

        def settle(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        def explain(failure: Failure) -> ProbeResult:
            if timed_out:
                limit = format_duration(self._check.timeout)
                return ProbeResult(False, f"no answer within {limit}")
            return self._explain(failure)

        d = self._client.get(
            self._url,
            headers={b"User-Agent": [b"l7lb-health-check"]},
            allow_redirects=False,
            unbuffered=True,
        )
        timer = self._clock.callLater(self._check.timeout, time_out)
        result = cast("Deferred[ProbeResult]", d.addCallback(self._judge))
        result.addBoth(settle)
        return result.addErrback(explain)

    def _judge(self, response: IResponse) -> Deferred[ProbeResult]:
        check = self._check
        if check.status_low <= response.code <= check.status_high:
            result = ProbeResult(True, f"status {response.code}")
        else:
            expected = f"{check.status_low}-{check.status_high}"
            result = ProbeResult(False, f"status {response.code} outside {expected}")
        drain = _Drain()
        response.deliverBody(drain)
        return drain.done.addCallback(lambda _: result)

    def _explain(self, failure: Failure) -> ProbeResult:
        if failure.check(ConnectionRefusedError):
            reason = "connection refused"
        elif failure.check(DNSLookupError):
            reason = "name lookup failed"
        elif failure.check(ConnectError):
            reason = f"cannot connect: {failure.getErrorMessage()}"
        else:
            reason = describe_failure(failure)
        return ProbeResult(False, reason)


class RiseFall:
    """
    The health state machine: C{fall} consecutive failures take a backend
    out of rotation, C{rise} consecutive passes bring it back.
    """

    def __init__(self, rise: int, fall: int, up: bool = True) -> None:
        self.rise = rise
        self.fall = fall
        self.up = up
        self._streak = 0

    def record(self, ok: bool) -> bool | None:
        """
        Count a check; return the new state if it changed, else C{None}.
        """
        if ok == self.up:
            self._streak = 0
            return None
        self._streak += 1
        if self._streak < (self.rise if ok else self.fall):
            return None
        self.up = ok
        self._streak = 0
        return ok


class HealthChecker:
    """
    Checks one backend every C{interval} (the first check at start) and keeps
    its rotation state. Each change of state is logged once, with the reason.
    """

    log = Logger()

    def __init__(
        self,
        pool: str,
        backend: Backend,
        probe: HealthProbe,
        check: HealthCheckConfig,
        clock: IReactorTime,
    ) -> None:
        self.pool = pool
        self.backend = backend
        self.probe = probe
        self.check = check
        self.state = RiseFall(check.rise, check.fall, up=backend.healthy)
        self.last: ProbeResult | None = None
        # When and why the state last changed, for the admin API.
        self.changed: tuple[float, str] | None = None
        self.clock = clock
        self.on_result: Callable[[ProbeResult], None] | None = None
        self._loop = LoopingCall(self.run_check)
        self._loop.clock = clock
        self._probing: Deferred[ProbeResult] | None = None

    def start(self) -> None:
        self._loop.start(self.check.interval, now=True)

    def stop(self) -> None:
        """
        No more checks; one under way is dropped (its connection closed),
        its result ignored.
        """
        if self._loop.running:
            self._loop.stop()
        probing, self._probing = self._probing, None
        if probing is not None:
            probing.cancel()

    def run_check(self) -> Deferred[None]:
        probing = self._probing = self.probe.probe()

        def done(result: ProbeResult) -> None:
            if self._probing is probing:
                self._probing = None
                self._record(result)

        def dropped(failure: Failure) -> None:
            failure.trap(CancelledError)  # by stop()

        return probing.addCallbacks(done, dropped)

    def _record(self, result: ProbeResult) -> None:
        self.last = result
        if self.on_result is not None:
            self.on_result(result)
        change = self.state.record(result.ok)
        if change is None:
            return
        self.changed = (self.clock.seconds(), result.reason)
        self.backend.set_healthy(change)
        if change:
            self.log.info(
                "backend {backend} of pool {pool} is healthy again after "
                "{count} passed checks ({reason})",
                backend=self.backend.address,
                pool=self.pool,
                count=self.check.rise,
                reason=result.reason,
                in_rotation=True,
            )
        else:
            self.log.warn(
                "backend {backend} of pool {pool} is out of rotation after "
                "{count} failed checks: {reason}",
                backend=self.backend.address,
                pool=self.pool,
                count=self.check.fall,
                reason=result.reason,
                in_rotation=False,
            )
