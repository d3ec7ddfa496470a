"""
Health checks: the rise/fall state machine, the checker's schedule on a
fake clock, the HTTP probe's verdicts, and health moving real traffic.
"""

from __future__ import annotations

from treq.testing import StubTreq
from twisted.internet.defer import (
    Deferred,
    fail,
    inlineCallbacks,
    succeed,
)
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from l7lb.config import HealthCheckConfig, ServerConfig
from l7lb.health import HealthChecker, HTTPProbe, ProbeResult, RiseFall
from l7lb.pool import Backend
from tests.support import IntegrationTest, fetch

CHECK = HealthCheckConfig(path="/health", interval=10.0, timeout=2.0, rise=2, fall=3)


class RiseFallTests(SynchronousTestCase):
    def run_sequence(self, state: RiseFall, checks: str) -> str:
        """
        Feed passes (+) and failures (-); note each change as U or D.
        """
        changes = ""
        for check in checks:
            change = state.record(check == "+")
            changes += "." if change is None else ("U" if change else "D")
        return changes

    def test_fall_after_consecutive_failures(self):
        self.assertEqual(self.run_sequence(RiseFall(2, 3), "--+---"), ".....D")
        self.assertEqual(self.run_sequence(RiseFall(2, 1), "-"), "D")

    def test_rise_after_consecutive_passes(self):
        state = RiseFall(2, 3, up=False)
        self.assertEqual(self.run_sequence(state, "+-++"), "...U")
        self.assertTrue(state.up)

    def test_changes_reported_once(self):
        self.assertEqual(self.run_sequence(RiseFall(1, 1), "--++--"), "D.U.D.")


class FakeProbe:
    def __init__(self) -> None:
        self.results: list[ProbeResult] = []
        self.calls = 0
        self.cancelled = False
        self.pending: Deferred[ProbeResult] | None = None

    def probe(self) -> Deferred[ProbeResult]:
        self.calls += 1
        if self.results:
            return succeed(self.results.pop(0))
        self.pending = Deferred(lambda d: setattr(self, "cancelled", True))
        return self.pending


def backend() -> Backend:
    return Backend(
        ServerConfig("http://10.0.0.1:80", "http", "10.0.0.1", 80), client=None
    )  # type: ignore[arg-type]


class CheckerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.probe = FakeProbe()
        self.backend = backend()
        self.checker = HealthChecker("p", self.backend, self.probe, CHECK, self.clock)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.addCleanup(self.checker.stop)

    def test_first_check_at_start_then_every_interval(self):
        self.probe.results = [ProbeResult(True, "ok")] * 3
        self.checker.start()
        self.assertEqual(self.probe.calls, 1)
        self.clock.advance(9.9)
        self.assertEqual(self.probe.calls, 1)
        self.clock.advance(0.1)
        self.assertEqual(self.probe.calls, 2)

    def test_out_after_fall_back_after_rise_logged_once(self):
        fails = [ProbeResult(False, "connection refused")] * 4
        passes = [ProbeResult(True, "status 200")] * 3
        self.probe.results = fails + passes
        self.checker.start()
        self.clock.advance(10.0)
        self.assertTrue(self.backend.in_rotation)
        self.assertEqual(len(self.events), 0)
        self.clock.advance(10.0)
        self.assertFalse(self.backend.in_rotation)
        self.clock.advance(10.0)  # a fourth failure: no new event
        self.assertEqual(len(self.events), 1)
        self.assertEqual(self.events[0]["reason"], "connection refused")
        self.assertFalse(self.events[0]["in_rotation"])
        self.clock.advance(10.0)
        self.assertFalse(self.backend.in_rotation)
        self.clock.advance(10.0)
        self.assertTrue(self.backend.in_rotation)
        self.clock.advance(10.0)
        self.assertEqual([e["in_rotation"] for e in self.events], [False, True])
        self.assertEqual(self.checker.last, ProbeResult(True, "status 200"))

    def test_slow_probe_delays_next_one(self):
        self.checker.start()
        self.assertEqual(self.probe.calls, 1)
        self.clock.advance(25.0)
        self.assertEqual(self.probe.calls, 1)  # never two probes at once
        assert self.probe.pending is not None
        self.probe.pending.callback(ProbeResult(True, "ok"))
        self.clock.advance(5.0)  # the next slot on the 10 s grid
        self.assertEqual(self.probe.calls, 2)

    def test_stop_drops_the_probe_under_way(self):
        self.checker.start()
        pending = self.probe.pending
        assert pending is not None
        self.checker.stop()
        self.assertTrue(self.probe.cancelled)
        self.assertIsNone(self.checker.last)  # its result is not recorded
        self.assertTrue(self.backend.in_rotation)

    def test_stop(self):
        self.probe.results = [ProbeResult(True, "ok")] * 5
        self.checker.start()
        self.checker.stop()
        self.clock.advance(100)
        self.assertEqual(self.probe.calls, 1)


class _Health(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.status = 200
        self.hang = False
        self.requests: list[bytes] = []

    def render(self, request):
        self.requests.append(request.getHeader(b"user-agent"))
        if self.hang:
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        return b"x" * 10


class ProbeTests(SynchronousTestCase):
    def setUp(self):
        self.resource = _Health()
        self.treq = StubTreq(self.resource)
        self.clock = Clock()
        self.probe = HTTPProbe(
            self.treq, "http://10.0.0.1:80/health", CHECK, self.clock
        )

    def result(self) -> ProbeResult:
        d = self.probe.probe()
        self.treq.flush()
        result: ProbeResult = self.successResultOf(d)
        return result

    def test_status_in_range_passes(self):
        for status in (200, 301, 399):
            self.resource.status = status
            self.assertEqual(self.result(), ProbeResult(True, f"status {status}"))
        self.assertEqual(self.resource.requests[-1], b"l7lb-health-check")

    def test_status_out_of_range_fails(self):
        self.resource.status = 500
        self.assertEqual(
            self.result(), ProbeResult(False, "status 500 outside 200-399")
        )
        self.resource.status = 199
        self.assertFalse(self.result().ok)

    def test_timeout(self):
        self.resource.hang = True
        d = self.probe.probe()
        self.treq.flush()
        self.assertNoResult(d)
        self.clock.advance(2.0)
        self.assertEqual(
            self.successResultOf(d), ProbeResult(False, "no answer within 2s")
        )

    def test_connection_refused(self):
        class Refusing:
            def get(self, url, **kwargs):
                return fail(ConnectionRefusedError())

        probe = HTTPProbe(Refusing(), "http://10.0.0.1:80/health", CHECK, self.clock)
        self.assertEqual(
            self.successResultOf(probe.probe()),
            ProbeResult(False, "connection refused"),
        )


class HealthTrafficTests(IntegrationTest):
    @inlineCallbacks
    def test_unhealthy_backend_leaves_rotation_and_returns(self):
        a = self.backend("a")
        b = self.backend("b")
        service = self.one_pool(
            a.url,
            b.url,
            pool_options="health_path = /health\nhealth_interval = 50ms\nhealth_timeout = 1s\nrise = 2\nfall = 2",
        )
        port = self.port_of(service)
        backend_a = service.pools["p"].backends[0]
        a.health_status = 503
        yield self.until(lambda: not backend_a.in_rotation)
        seen = set()
        for _ in range(4):
            reply = yield fetch(port, "/")
            seen.add(reply.json()["backend"])
        self.assertEqual(seen, {"b"})
        a.health_status = 200
        yield self.until(lambda: backend_a.in_rotation)
        seen = set()
        for _ in range(4):
            reply = yield fetch(port, "/")
            seen.add(reply.json()["backend"])
        self.assertEqual(seen, {"a", "b"})

    @inlineCallbacks
    def test_all_out_of_rotation_is_503_with_retry_after(self):
        a = self.backend("a")
        a.health_status = 500
        service = self.one_pool(
            a.url,
            pool_options="health_path = /health\nhealth_interval = 2s\nrise = 3\nfall = 1",
        )
        backend_a = service.pools["p"].backends[0]
        yield self.until(lambda: not backend_a.in_rotation)
        reply = yield fetch(self.port_of(service), "/")
        self.assertEqual(reply.status, 503)
        self.assertEqual(reply.header("Retry-After"), ["6"])
        self.assertEqual(reply.body, b"503 Service Unavailable\n")
        self.assertEqual([r.uri for r in a.requests], [b"/health"])
