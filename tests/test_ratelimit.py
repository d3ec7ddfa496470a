"""
Token buckets on a fake clock: burst, continuous refill, Retry-After and
the RateLimit fields, idle buckets dropped and the cap on live keys.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from l7lb.config import RateLimitConfig
from l7lb.ratelimit import Decision, RateLimiter


def limiter(rate=10.0, burst=10, max_keys=100, quota=10, window=1, clock=None):
    clock = clock or Clock()
    config = RateLimitConfig(rate, burst, "client_ip", f"{quota}/s", quota, window)
    return RateLimiter("api", config, clock, max_keys), clock


class BucketTests(SynchronousTestCase):
    def test_burst_then_refused(self):
        limit, _ = limiter(rate=10, burst=3)
        decisions = [limit.check("k") for _ in range(4)]
        self.assertEqual([d.allowed for d in decisions], [True, True, True, False])
        self.assertEqual([d.remaining for d in decisions], [2, 1, 0, 0])
        self.assertEqual((limit.allowed, limit.refused), (3, 1))

    def test_continuous_refill(self):
        limit, clock = limiter(rate=10, burst=2)
        limit.check("k")
        limit.check("k")
        self.assertFalse(limit.check("k").allowed)
        clock.advance(0.05)  # half a token: not yet
        self.assertFalse(limit.check("k").allowed)
        clock.advance(0.05)
        self.assertTrue(limit.check("k").allowed)
        self.assertFalse(limit.check("k").allowed)

    def test_fractional_rate_and_retry_after(self):
        limit, clock = limiter(rate=0.25, burst=1)  # one every 4 s
        self.assertEqual(limit.check("k"), Decision(True, 0, 4, 0))
        refused = limit.check("k")
        self.assertEqual(
            (refused.allowed, refused.retry_after, refused.reset), (False, 4, 4)
        )
        clock.advance(2.5)
        self.assertEqual(limit.check("k").retry_after, 2)  # 1.5 s left, rounded up
        clock.advance(1.5)
        self.assertTrue(limit.check("k").allowed)

    def test_retry_after_at_least_one_second(self):
        limit, _clock = limiter(rate=1000, burst=1)
        limit.check("k")
        self.assertEqual(limit.check("k").retry_after, 1)

    def test_refill_capped_at_burst(self):
        limit, clock = limiter(rate=10, burst=5)
        clock.advance(3600)
        self.assertEqual(limit.check("k").remaining, 4)

    def test_keys_have_their_own_buckets(self):
        limit, _ = limiter(rate=1, burst=1)
        self.assertTrue(limit.check("a").allowed)
        self.assertTrue(limit.check("b").allowed)
        self.assertFalse(limit.check("a").allowed)
        self.assertEqual(len(limit), 2)

    def test_headers(self):
        limit, _ = limiter(rate=100, burst=100, quota=100, window=1)
        allowed = limit.check("k")
        self.assertEqual(
            limit.headers(allowed),
            [
                (b"RateLimit-Policy", b'"api";q=100;w=1'),
                (b"RateLimit", b'"api";r=99;t=1'),
            ],
        )
        for _ in range(99):
            limit.check("k")
        refused = limit.check("k")
        self.assertEqual(
            limit.headers(refused)[1:],
            [(b"RateLimit", b'"api";r=0;t=1'), (b"Retry-After", b"1")],
        )


class MemoryTests(SynchronousTestCase):
    def test_idle_buckets_dropped(self):
        limit, clock = limiter(rate=10, burst=10)
        for n in range(50):
            limit.check(f"client-{n}")
        self.assertEqual(len(limit), 50)
        clock.advance(1.0)  # every bucket has refilled: the same as none
        for n in range(20):
            limit.check(f"new-{n}")
        # Each new key sweeps up to four refilled buckets away.
        self.assertEqual(len(limit), 20)
        self.assertFalse(any(key.startswith("client-") for key in limit._buckets))

    def test_busy_buckets_kept(self):
        limit, clock = limiter(rate=1, burst=10)
        for _ in range(5):
            limit.check("busy")
        clock.advance(1.0)  # still 4 tokens short of full
        limit.check("newcomer")
        self.assertIn("busy", limit._buckets)

    def test_cap_drops_least_recently_used(self):
        limit, _clock = limiter(rate=1, burst=10, max_keys=3)
        for key in ("a", "b", "c"):
            limit.check(key)
        limit.check("a")  # a is now the most recently used
        limit.check("d")
        self.assertEqual(list(limit._buckets), ["c", "a", "d"])
        self.assertEqual(len(limit), 3)

    def test_flood_of_keys_bounded(self):
        limit, _ = limiter(rate=1, burst=10, max_keys=1000)
        for n in range(20_000):
            limit.check(f"attacker-{n}")
        self.assertEqual(len(limit), 1000)


class ShareTests(SynchronousTestCase):
    """
    With N worker processes each enforces 1/N of the rate and the burst.
    """

    def test_rate_and_burst_divided(self):
        clock = Clock()
        config = RateLimitConfig(10.0, 4, "global", "10/s", 10, 1)
        limit = RateLimiter("api", config, clock, 100, share=2)
        self.assertEqual((limit.rate, limit.burst), (5.0, 2.0))
        self.assertEqual(
            [limit.check("k").allowed for _ in range(3)], [True, True, False]
        )
        clock.advance(0.2)  # one token at 5/s
        self.assertTrue(limit.check("k").allowed)
        # The policy announced is the route's, as configured.
        self.assertEqual(limit.policy, b'"api";q=10;w=1')

    def test_burst_at_least_one(self):
        config = RateLimitConfig(1.0, 1, "global", "1/s", 1, 1)
        limit = RateLimiter("api", config, Clock(), 100, share=4)
        self.assertEqual((limit.rate, limit.burst), (0.25, 1.0))
        self.assertTrue(limit.check("k").allowed)
