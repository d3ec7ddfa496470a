"""
Balancing strategies: exact sequences, rotation, exclusion.
"""

import random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from l7lb.balancing import (
    ConsistentHash,
    LeastConnections,
    PowerOfTwoChoices,
    RoundRobin,
    SmoothWeightedRoundRobin,
    balancer_for,
)
from l7lb.config import PoolConfig, ServerConfig
from l7lb.pool import SLOW_START_FLOOR, Backend, Pool


def backends(*weights: int) -> list[Backend]:
    return [
        Backend(
            ServerConfig(f"http://{name}:80", "http", name, 80, weight), client=None
        )  # type: ignore[arg-type]
        for name, weight in zip("abcdefgh", weights, strict=False)
    ]


def assert_near(test, value, expected, delta):
    test.assertTrue(
        abs(value - expected) <= delta, f"{value} is not within {delta} of {expected}"
    )


def names(strategy, pool, count, exclude=()):
    picked = []
    for _ in range(count):
        backend = strategy.choose(pool, exclude)
        picked.append(backend.address[0] if backend else None)
    return "".join(p or "-" for p in picked)


class RoundRobinTests(SynchronousTestCase):
    def test_in_turn(self):
        self.assertEqual(names(RoundRobin(), backends(1, 1, 1), 7), "abcabca")

    def test_weights_ignored(self):
        self.assertEqual(names(RoundRobin(), backends(5, 1, 1), 6), "abcabc")

    def test_skips_out_of_rotation(self):
        pool = backends(1, 1, 1)
        strategy = RoundRobin()
        self.assertEqual(names(strategy, pool, 1), "a")
        pool[1].in_rotation = False
        self.assertEqual(names(strategy, pool, 4), "caca")
        pool[1].in_rotation = True
        self.assertEqual(names(strategy, pool, 3), "bca")

    def test_none_in_rotation(self):
        pool = backends(1, 1)
        for backend in pool:
            backend.in_rotation = False
        self.assertIsNone(RoundRobin().choose(pool))
        self.assertIsNone(RoundRobin().choose([]))

    def test_exclude(self):
        pool = backends(1, 1, 1)
        self.assertEqual(names(RoundRobin(), pool, 4, exclude=[pool[0]]), "bcbc")
        self.assertIsNone(RoundRobin().choose(pool[:1], [pool[0]]))


class SmoothWeightedTests(SynchronousTestCase):
    def test_nginx_sequence(self):
        self.assertEqual(
            names(SmoothWeightedRoundRobin(), backends(5, 1, 1), 7), "aabacaa"
        )
        self.assertEqual(
            names(SmoothWeightedRoundRobin(), backends(5, 1, 1), 14), "aabacaa" * 2
        )

    def test_equal_weights_are_round_robin(self):
        self.assertEqual(
            names(SmoothWeightedRoundRobin(), backends(1, 1, 1), 6), "abcabc"
        )

    def test_shares_follow_weights(self):
        picked = names(SmoothWeightedRoundRobin(), backends(3, 2, 1), 600)
        self.assertEqual(
            (picked.count("a"), picked.count("b"), picked.count("c")), (300, 200, 100)
        )

    def test_out_of_rotation_and_exclude(self):
        pool = backends(5, 1, 1)
        pool[0].in_rotation = False
        self.assertEqual(names(SmoothWeightedRoundRobin(), pool, 4), "bcbc")
        pool[0].in_rotation = True
        picked = names(SmoothWeightedRoundRobin(), pool, 6, exclude=[pool[1]])
        self.assertEqual(sorted(picked), sorted("aaaaac"))

    def test_forgets_removed_backends(self):
        pool = backends(1, 1, 1)
        strategy = SmoothWeightedRoundRobin()
        names(strategy, pool, 3)
        names(strategy, pool[:2], 2)
        self.assertEqual(set(strategy._current), set(pool[:2]))


class LeastConnectionsTests(SynchronousTestCase):
    def test_fewest_in_flight(self):
        pool = backends(1, 1, 1)
        pool[0].inflight, pool[1].inflight, pool[2].inflight = 3, 1, 2
        self.assertEqual(names(LeastConnections(), pool, 2), "bb")

    def test_ties_round_robin(self):
        pool = backends(1, 1, 1)
        self.assertEqual(names(LeastConnections(), pool, 6), "abcabc")

    def test_ties_among_the_least_loaded_only(self):
        pool = backends(1, 1, 1)
        pool[1].inflight = 5
        self.assertEqual(names(LeastConnections(), pool, 4), "acac")

    def test_follows_load_as_it_changes(self):
        pool = backends(1, 1)
        strategy = LeastConnections()
        sequence = ""
        for _ in range(4):
            chosen = strategy.choose(pool)
            chosen.inflight += 1  # requests that never finish
            sequence += chosen.address[0]
        self.assertEqual(sequence, "abab")
        pool[0].inflight = 0
        self.assertEqual(strategy.choose(pool), pool[0])

    def test_weight_scales_load(self):
        pool = backends(3, 1)
        pool[0].inflight, pool[1].inflight = 2, 1  # a: 2/3 per weight, b: 1/1
        self.assertEqual(LeastConnections().choose(pool), pool[0])

    def test_skips_out_of_rotation_and_excluded(self):
        pool = backends(1, 1, 1)
        pool[0].in_rotation = False
        self.assertEqual(names(LeastConnections(), pool, 3, exclude=[pool[2]]), "bbb")


class PoolTests(SynchronousTestCase):
    def test_choose_uses_strategy(self):
        config = PoolConfig("p", ())
        pool = Pool(config, backends(1, 1), balancer_for("round_robin"))
        self.assertEqual(
            [pool.choose().address for _ in range(3)], ["a:80", "b:80", "a:80"]
        )
        self.assertEqual(pool.retry_after, b"1")


class PowerOfTwoTests(SynchronousTestCase):
    def test_prefers_the_less_loaded_of_two(self):
        pool = backends(1, 1, 1)
        pool[0].inflight, pool[1].inflight, pool[2].inflight = 10, 0, 10
        strategy = PowerOfTwoChoices(random.Random(7))
        picked = names(strategy, pool, 300)
        # b is picked whenever it is one of the two drawn: about 2/3 of the time.
        self.assertGreater(picked.count("b"), 170)
        self.assertLess(picked.count("b"), 230)

    def test_exact_sequence_with_seed(self):
        pool = backends(1, 1, 1, 1)
        self.assertEqual(
            names(PowerOfTwoChoices(random.Random(1)), pool, 8),
            names(PowerOfTwoChoices(random.Random(1)), pool, 8),
        )

    def test_even_load_spreads(self):
        picked = names(PowerOfTwoChoices(random.Random(3)), backends(1, 1, 1), 3000)
        for name in "abc":
            assert_near(self, picked.count(name) / 3000, 1 / 3, 0.05)

    def test_weights_draw_more_often(self):
        picked = names(PowerOfTwoChoices(random.Random(5)), backends(3, 1), 4000)
        # Equal load (nothing in flight): the first drawn wins, drawn 3:1.
        assert_near(self, picked.count("a") / 4000, 0.75, 0.04)

    def test_one_or_none_in_rotation(self):
        pool = backends(1, 1)
        pool[0].in_rotation = False
        self.assertEqual(names(PowerOfTwoChoices(random.Random(1)), pool, 3), "bbb")
        self.assertIsNone(PowerOfTwoChoices().choose(pool, [pool[1]]))


class ConsistentHashTests(SynchronousTestCase):
    def keys(self, count=10_000):
        return [b"client-%d" % n for n in range(count)]

    def test_same_key_same_backend(self):
        pool = backends(1, 1, 1)
        strategy = ConsistentHash()
        first = [strategy.choose(pool, (), key) for key in self.keys(100)]
        again = [ConsistentHash().choose(pool, (), key) for key in self.keys(100)]
        self.assertEqual(first, again)
        self.assertEqual(len(set(first)), 3)

    def test_removing_one_of_n_moves_about_one_nth(self):
        pool = backends(*[1] * 10)
        strategy = ConsistentHash()
        before = {key: strategy.choose(pool, (), key) for key in self.keys()}
        smaller = [b for b in pool if b is not pool[4]]
        after = {key: strategy.choose(smaller, (), key) for key in self.keys()}
        moved = [key for key in before if before[key] is not after[key]]
        # Only the removed backend's keys move, and they are about a tenth.
        self.assertTrue(all(before[key] is pool[4] for key in moved))
        assert_near(self, len(moved) / len(before), 0.1, 0.03)

    def test_out_of_rotation_hands_keys_on_and_takes_them_back(self):
        pool = backends(1, 1, 1)
        strategy = ConsistentHash()
        before = {key: strategy.choose(pool, (), key) for key in self.keys(1000)}
        pool[1].in_rotation = False
        during = {key: strategy.choose(pool, (), key) for key in self.keys(1000)}
        self.assertNotIn(pool[1], during.values())
        unchanged = [k for k in before if before[k] is not pool[1]]
        self.assertTrue(all(before[k] is during[k] for k in unchanged))
        pool[1].in_rotation = True
        self.assertEqual(
            before, {key: strategy.choose(pool, (), key) for key in self.keys(1000)}
        )

    def test_weights_own_more_keys(self):
        pool = backends(3, 1)
        strategy = ConsistentHash()
        picked = [strategy.choose(pool, (), key) for key in self.keys()]
        assert_near(self, picked.count(pool[0]) / len(picked), 0.75, 0.05)

    def test_none_in_rotation(self):
        pool = backends(1, 1)
        for backend in pool:
            backend.in_rotation = False
        self.assertIsNone(ConsistentHash().choose(pool, (), b"k"))
        self.assertIsNone(ConsistentHash().choose([], (), b"k"))


class SlowStartTests(SynchronousTestCase):
    def backend(self, clock, weight=4):
        return Backend(
            ServerConfig("http://a:80", "http", "a", 80, weight),
            None,
            30.0,
            clock,  # type: ignore[arg-type]
        )

    def test_linear_ramp(self):
        clock = Clock()
        backend = self.backend(clock)
        self.assertEqual(backend.current_weight(), 4)  # in rotation from the start
        backend.set_healthy(False)
        backend.set_healthy(True)
        self.assertAlmostEqual(backend.current_weight(), 4 * SLOW_START_FLOOR)
        clock.advance(15)
        self.assertAlmostEqual(backend.current_weight(), 2.0)
        clock.advance(7.5)
        self.assertAlmostEqual(backend.current_weight(), 3.0)
        clock.advance(7.5)
        self.assertEqual(backend.current_weight(), 4)

    def test_strategies_send_a_returning_backend_little_at_first(self):
        clock = Clock()
        for strategy in (
            SmoothWeightedRoundRobin(),
            LeastConnections(),
            PowerOfTwoChoices(random.Random(2)),
        ):
            pool = [self.backend(clock, 1), self.backend(clock, 1)]
            pool[1].set_healthy(False)
            pool[1].set_healthy(True)
            clock.advance(3)  # 10% into the ramp
            chosen = []
            for _ in range(1000):
                backend = strategy.choose(pool)
                backend.inflight += 1  # nothing finishes: load builds up
                chosen.append(backend)
            share = chosen.count(pool[1]) / 1000
            self.assertLess(share, 0.2, strategy)
            self.assertGreater(share, 0.0, strategy)


class StickyTests(SynchronousTestCase):
    def pool(self, secret=b"s" * 32):
        config = PoolConfig("p", (), sticky_cookie="SRV")
        return Pool(config, backends(1, 1), balancer_for("round_robin"), secret)

    def test_tokens_opaque_stable_and_secret(self):
        pool = self.pool()
        tokens = [pool.token_of[b] for b in pool.backends]
        self.assertEqual(len(set(tokens)), 2)
        for token in tokens:
            self.assertEqual(len(token), 32)
            self.assertTrue(all(c in b"0123456789abcdef" for c in token))
        again = self.pool()
        self.assertEqual(tokens, [again.token_of[b] for b in again.backends])
        other = self.pool(b"t" * 32)
        self.assertNotEqual(tokens, [other.token_of[b] for b in other.backends])

    def test_cookie_names_a_backend_in_rotation(self):
        pool = self.pool()
        _a, b = pool.backends
        self.assertIs(pool.sticky_backend(pool.token_of[b]), b)
        self.assertIsNone(pool.sticky_backend(b"forged"))
        self.assertIsNone(pool.sticky_backend(None))
        b.in_rotation = False
        self.assertIsNone(pool.sticky_backend(pool.token_of[b]))
        b.in_rotation = True
        self.assertIsNone(pool.sticky_backend(pool.token_of[b], [b]))
