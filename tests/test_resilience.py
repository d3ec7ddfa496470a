"""
Failing backends on a fake clock: caps on concurrent requests and the
queue, the retry budget, passive health (outlier ejection), and an l7lb bug
costing one request only.
"""

from __future__ import annotations

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from l7lb.config import PoolConfig
from l7lb.pool import MIN_RETRY_CONCURRENCY, Pool
from l7lb.upstream import NoResponse
from tests.test_balancing import backends
from tests.twins import (
    Hanging,
    InMemoryUpstream,
    MemoryBalancer,
    Refusing,
    _MemoryCall,
    status,
)


class Failing(Resource):
    """
    A backend that answers 500 (or 200 once told to).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.code = 500

    def render(self, request):
        request.setResponseCode(self.code)
        return b"answer"


class CircuitBreakerTests(SynchronousTestCase):
    def test_backend_cap_without_queue_is_503_at_once(self):
        a, b = Hanging(), Hanging()
        lb = MemoryBalancer([a, b], max_connections=1)
        first, second = lb.get()[1], lb.get()[1]
        _, third = lb.get()
        self.assertEqual((status(first), status(second)), (None, None))
        self.assertEqual(status(third), 503)
        self.assertEqual((len(a.pending), len(b.pending)), (1, 1))
        self.assertEqual(lb.pool.shed, 1)

    def test_queue_waits_for_a_slot_then_times_out(self):
        upstream = Hanging()
        lb = MemoryBalancer(
            [upstream], max_connections=1, max_queue=2, queue_timeout=5.0
        )
        lb.get()
        _, queued = lb.get()
        _, also_queued = lb.get()
        _, shed = lb.get()
        self.assertEqual(status(shed), 503)  # the queue is full: at once
        self.assertEqual(len(upstream.pending), 1)
        self.assertEqual(len(lb.pool.queue), 2)
        lb.clock.advance(4.0)
        upstream.fail(0)  # the slot frees up
        # The first queued request took the slot; the other still waits.
        self.assertEqual(len(upstream.pending), 2)
        self.assertEqual(status(queued), None)
        lb.clock.advance(1.0)
        self.assertEqual(status(also_queued), 503)
        self.assertEqual(len(lb.pool.queue), 0)

    def test_queued_client_that_leaves_is_forgotten(self):
        upstream = Hanging()
        lb = MemoryBalancer([upstream], max_connections=1, max_queue=5)
        lb.get()
        channel, _ = lb.get()
        self.assertEqual(len(lb.pool.queue), 1)
        channel.connectionLost(ConnectionError())
        self.assertEqual(len(lb.pool.queue), 0)
        # Only the deadlines' tick is left: the wait's timer is gone.
        self.assertEqual(len(lb.clock.getDelayedCalls()), 1)

    def test_pool_cap(self):
        clients = [Hanging(), Hanging(), Hanging()]
        lb = MemoryBalancer(clients, pool_max_connections=2)
        lb.get()
        lb.get()
        _, third = lb.get()
        self.assertEqual(status(third), 503)
        self.assertEqual([len(c.pending) for c in clients], [1, 1, 0])


class RetryTests(SynchronousTestCase):
    def test_retries_go_to_other_backends_up_to_the_limit(self):
        clients = [Refusing(), Refusing(), Refusing(), Refusing()]
        lb = MemoryBalancer(clients, retries=2)
        _, answer = lb.get()
        self.assertEqual(status(answer), 502)
        self.assertEqual(sum(c.calls for c in clients), 3)  # one try, two retries
        self.assertEqual(max(c.calls for c in clients), 1)  # never the same twice

    def test_no_retries(self):
        clients = [Refusing(), Refusing()]
        lb = MemoryBalancer(clients, retries=0)
        _, answer = lb.get()
        self.assertEqual(status(answer), 502)
        self.assertEqual(sum(c.calls for c in clients), 1)

    def test_budget_arithmetic(self):
        pool = Pool(PoolConfig("p", (), retry_budget=0.2), backends(1), None)  # type: ignore[arg-type]
        pool.inflight = 100
        pool.retries_inflight = 19
        self.assertTrue(pool.may_retry())
        pool.retries_inflight = 20
        self.assertFalse(pool.may_retry())
        pool.inflight, pool.retries_inflight = 1, MIN_RETRY_CONCURRENCY - 1
        self.assertTrue(pool.may_retry())  # a quiet pool may still retry a little

    def test_spent_budget_stops_retries(self):
        clients = [Refusing(), Refusing()]
        lb = MemoryBalancer(clients, retries=1)
        lb.pool.retries_inflight = MIN_RETRY_CONCURRENCY  # a retry storm under way
        _, answer = lb.get()
        self.assertEqual(status(answer), 502)
        self.assertEqual(sum(c.calls for c in clients), 1)

    def test_post_not_resent_after_written(self):
        # A reset after the request went out: only idempotent methods retry.
        class Resetting(Refusing):
            def send(self, request, receiver):
                self.calls += 1
                receiver.response_failed(NoResponse("Connection lost"))
                return _MemoryCall()

        clients = [Resetting(), Resetting()]
        lb = MemoryBalancer(clients)
        _, answer = lb.get(method=b"POST")
        self.assertEqual((status(answer), sum(c.calls for c in clients)), (502, 1))
        _, answer = lb.get(method=b"DELETE")
        self.assertEqual((status(answer), sum(c.calls for c in clients)), (502, 3))


class PassiveHealthTests(SynchronousTestCase):
    def setUp(self):
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def ejections(self):
        return [e for e in self.events if "ejected" in e]

    def test_ejected_after_max_fails_then_readmitted_with_doubling(self):
        bad, good = Refusing(), InMemoryUpstream(Failing())
        lb = MemoryBalancer([bad, good], max_fails=2, fail_timeout=10.0, retries=0)
        backend = lb.pool.backends[0]
        lb.get()  # round robin: bad (fails)
        lb.get()  # good
        self.assertTrue(backend.in_rotation)
        lb.get()  # bad again: second consecutive failure
        self.assertFalse(backend.in_rotation)
        for _ in range(4):
            lb.get()
        self.assertEqual(bad.calls, 2)  # no traffic while ejected
        lb.clock.advance(10.0)
        self.assertTrue(backend.in_rotation)
        lb.get()
        lb.get()
        lb.get()
        lb.get()
        self.assertFalse(backend.in_rotation)
        lb.clock.advance(10.0)
        self.assertFalse(backend.in_rotation)  # twice as long the second time
        lb.clock.advance(10.0)
        self.assertTrue(backend.in_rotation)
        changes = [e["ejected"] for e in self.ejections()]
        self.assertEqual(changes, [True, False, True, False])
        self.assertEqual(self.ejections()[2]["duration"], "20s")

    def test_success_resets_the_count(self):
        resource = Failing()
        upstream = InMemoryUpstream(resource)
        lb = MemoryBalancer([upstream], max_fails=2, fail_on_5xx=True)
        backend = lb.pool.backends[0]
        lb.get()
        upstream.agent.flush()
        resource.code = 200
        lb.get()
        upstream.agent.flush()
        resource.code = 500
        lb.get()
        upstream.agent.flush()
        self.assertTrue(backend.in_rotation)  # fail, pass, fail: never two in a row
        lb.get()
        upstream.agent.flush()
        self.assertFalse(backend.in_rotation)

    def test_5xx_counts_only_when_asked(self):
        upstream = InMemoryUpstream(Failing())
        lb = MemoryBalancer([upstream], max_fails=1)
        _, answer = lb.get()
        upstream.agent.flush()
        self.assertEqual(status(answer), 500)  # relayed unchanged
        self.assertTrue(lb.pool.backends[0].in_rotation)

    def test_active_checks_must_also_pass(self):
        lb = MemoryBalancer([Refusing()], max_fails=1, fail_timeout=5.0)
        backend = lb.pool.backends[0]
        lb.get()
        backend.set_healthy(False)  # active checks fail meanwhile
        lb.clock.advance(5.0)
        self.assertFalse(backend.in_rotation)
        backend.set_healthy(True)
        self.assertTrue(backend.in_rotation)

    def test_all_ejected_is_503(self):
        lb = MemoryBalancer([Refusing()], max_fails=1)
        lb.get()
        _, answer = lb.get()
        self.assertEqual(status(answer), 503)
        self.assertIn(b"Retry-After: 1\r\n", answer.value())


class GuardTests(SynchronousTestCase):
    def test_a_bug_costs_one_request(self):
        class Broken:
            def send(self, request, receiver):
                receiver.response_head(object())  # not a response head at all
                return _MemoryCall()

            def close(self):
                return succeed(None)

        lb = MemoryBalancer([Broken()])
        _, answer = lb.get()
        self.assertEqual(status(answer), 500)
        self.assertNotIn(b"Traceback", answer.value())
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)
        upstream = InMemoryUpstream(Failing())
        other = MemoryBalancer([upstream])
        _, fine = other.get()
        upstream.agent.flush()
        self.assertEqual(status(fine), 500)


class ReviewedCornerTests(SynchronousTestCase):
    def test_sticky_cookie_respects_the_cap(self):
        clients = [Hanging(), Hanging()]
        lb = MemoryBalancer(clients, max_connections=1, sticky_cookie="SRV")
        token = lb.pool.token_of[lb.pool.backends[0]]
        for _ in range(3):
            channel, _ = lb.connect()
            channel.dataReceived(
                b"GET /app HTTP/1.1\r\nHost: h\r\nCookie: SRV=" + token + b"\r\n\r\n"
            )
        self.assertEqual([b.inflight for b in lb.pool.backends], [1, 1])

    def test_a_slot_goes_to_the_first_waiter_that_can_use_it(self):
        clock = Clock()
        pool = Pool(
            PoolConfig("p", (), max_queue=5, queue_timeout=10.0),
            backends(1),
            None,
            clock=clock,
        )  # type: ignore[arg-type]
        offered = []

        def waiter(name, takes):
            def resume(ok):
                offered.append(name)
                return takes

            return pool.wait(resume)

        picky = waiter("picky", False)  # a retry that must avoid this backend
        waiter("plain", True)
        backend = pool.backends[0]
        pool.acquire(backend)
        pool.release(backend)
        self.assertEqual(offered, ["picky", "plain"])
        self.assertEqual(list(pool.queue), [picky])  # still waiting...
        clock.advance(9.9)
        self.assertEqual(list(pool.queue), [picky])  # ...with its first deadline
        clock.advance(0.1)
        self.assertEqual(list(pool.queue), [])

    def test_forgiveness_needs_clean_service(self):
        from l7lb.config import ServerConfig
        from l7lb.outlier import MAX_EJECTION, PassiveHealth
        from l7lb.pool import Backend

        clock = Clock()
        backend = Backend(ServerConfig("http://a:1", "http", "a", 1), None, clock=clock)  # type: ignore[arg-type]
        passive = PassiveHealth("p", backend, 1, 10.0, clock)
        lengths = []
        for _ in range(8):
            passive.failure("boom")
            start = clock.seconds()
            while backend.ejected:
                clock.advance(1.0)
            lengths.append(clock.seconds() - start)
            passive.success()  # one good answer right after readmission
        self.assertEqual(lengths, [10, 20, 40, 80, 160, 300, 300, 300])
        clock.advance(MAX_EJECTION)
        passive.success()  # five quiet minutes later: forgiven
        passive.failure("boom")
        start = clock.seconds()
        while backend.ejected:
            clock.advance(1.0)
        self.assertEqual(clock.seconds() - start, 10)
        passive.stop()

    def test_retry_accounting_returns_to_zero(self):
        clients = [Refusing(), Refusing(), InMemoryUpstream(Failing())]
        lb = MemoryBalancer(clients, retries=2)
        for _ in range(6):
            lb.get()
            clients[2].agent.flush()
        self.assertEqual(lb.pool.retries_inflight, 0)
        self.assertEqual(lb.pool.inflight, 0)
        self.assertGreater(lb.pool.retried, 0)
