"""
Balancing strategies: exact sequences, rotation, exclusion.
"""

from twisted.trial.unittest import SynchronousTestCase

from l7lb.balancing import (
    LeastConnections,
    RoundRobin,
    SmoothWeightedRoundRobin,
    balancer_for,
)
from l7lb.config import PoolConfig, ServerConfig
from l7lb.pool import Backend, Pool


def backends(*weights: int) -> list[Backend]:
    return [
        Backend(
            ServerConfig(f"http://{name}:80", "http", name, 80, weight), client=None
        )  # type: ignore[arg-type]
        for name, weight in zip("abcdefgh", weights, strict=False)
    ]


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
