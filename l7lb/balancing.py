# -*- test-case-name: tests.test_balancing -*-
"""
Balancing strategies: which backend of a pool takes the next request.

A strategy sees the pool's backends in their configured order and picks one
that is in rotation, below its cap on concurrent requests and not excluded
(a retry excludes the backends already tried), or C{None} when there is
none. Weights, scaled down during a
backend's slow start, are honoured by every strategy except round_robin
(which is plain rotation by definition) and hash (where moving keys to
follow a changing weight would defeat the point of consistent hashing).
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Container, Sequence
from typing import Protocol

from l7lb.pool import Backend


class Balancer(Protocol):
    """
    Picks a backend for the next request. C{key} identifies the client for
    strategies that hash it; others ignore it.
    """

    def choose(
        self,
        backends: Sequence[Backend],
        exclude: Container[Backend] = (),
        key: bytes | None = None,
    ) -> Backend | None: ...


class RoundRobin:
    """
    Each backend in turn, weights ignored.
    """

    def __init__(self) -> None:
        self._next = 0

    def choose(
        self,
        backends: Sequence[Backend],
        exclude: Container[Backend] = (),
        key: bytes | None = None,
    ) -> Backend | None:
        count = len(backends)
        start = self._next
        for step in range(count):
            index = (start + step) % count
            backend = backends[index]
            if backend.can_take(exclude):
                self._next = index + 1
                return backend
        return None


class SmoothWeightedRoundRobin:
    """
    NGINX's smooth weighted round robin: weights 5, 1, 1 give a, a, b, a, c,
    a, a, spreading the light backends between the heavy one's turns instead
    of sending it five requests in a row.
    """

    def __init__(self) -> None:
        self._current: dict[Backend, float] = {}

    def choose(
        self,
        backends: Sequence[Backend],
        exclude: Container[Backend] = (),
        key: bytes | None = None,
    ) -> Backend | None:
        current = self._current
        total = 0.0
        best: Backend | None = None
        best_weight = 0.0
        for backend in backends:
            if not backend.can_take(exclude):
                continue
            effective = backend.current_weight()
            weight = current.get(backend, 0.0) + effective
            current[backend] = weight
            total += effective
            if best is None or weight > best_weight:
                best, best_weight = backend, weight
        if best is not None:
            current[best] = best_weight - total
        if len(current) > len(backends):
            present = set(backends)
            for gone in [b for b in current if b not in present]:
                del current[gone]
        return best


class LeastConnections:
    """
    The backend with the fewest requests in flight relative to its weight;
    ties go round robin so that an idle pool still spreads its load.
    """

    def __init__(self) -> None:
        self._next = 0

    def choose(
        self,
        backends: Sequence[Backend],
        exclude: Container[Backend] = (),
        key: bytes | None = None,
    ) -> Backend | None:
        count = len(backends)
        start = self._next
        best: Backend | None = None
        best_weight = 1.0
        best_index = 0
        for step in range(count):
            index = (start + step) % count
            backend = backends[index]
            if not backend.can_take(exclude):
                continue
            weight = backend.current_weight()
            if best is None or backend.inflight * best_weight < best.inflight * weight:
                best, best_weight, best_index = backend, weight, index
        if best is not None:
            self._next = best_index + 1
        return best


class PowerOfTwoChoices:
    """
    Two backends drawn at random (in proportion to weight), the one with
    fewer requests in flight per weight taken: nearly as good as least
    connections, without every balancer herding onto the same backend.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = rng or random.Random()

    def choose(
        self,
        backends: Sequence[Backend],
        exclude: Container[Backend] = (),
        key: bytes | None = None,
    ) -> Backend | None:
        candidates = [b for b in backends if b.can_take(exclude)]
        if len(candidates) < 2:
            return candidates[0] if candidates else None
        weights = [b.current_weight() for b in candidates]
        first = self._draw(candidates, weights, None)
        second = self._draw(candidates, weights, first)
        a, b = candidates[first], candidates[second]
        if b.inflight * weights[first] < a.inflight * weights[second]:
            return b
        return a

    def _draw(
        self, candidates: list[Backend], weights: list[float], skip: int | None
    ) -> int:
        total = sum(w for i, w in enumerate(weights) if i != skip)
        point = self._random.random() * total
        for index, weight in enumerate(weights):
            if index == skip:
                continue
            point -= weight
            if point < 0:
                return index
        return max(i for i in range(len(candidates)) if i != skip)


def _hash(data: bytes) -> int:
    """
    A stable 64-bit hash (the same in every process, unlike hash()).
    """
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class ConsistentHash:
    """
    A hash ring: each backend owns C{POINTS} points per unit of weight, a key
    goes to the owner of the next point clockwise. Removing one of N backends
    moves only the keys it owned (about 1/N); a backend out of rotation hands
    its keys to the next points' owners until it returns.
    """

    POINTS = 160

    def __init__(self) -> None:
        self._built_for: tuple[Backend, ...] = ()
        self._points: list[int] = []
        self._owners: list[Backend] = []

    def _build(self, backends: Sequence[Backend]) -> None:
        ring = sorted(
            (_hash(b"%s#%d" % (backend.config.url.encode(), i)), backend)
            for backend in backends
            for i in range(min(self.POINTS * backend.weight, 16_000))
        )
        self._points = [point for point, _ in ring]
        self._owners = [owner for _, owner in ring]
        self._built_for = tuple(backends)

    def choose(
        self,
        backends: Sequence[Backend],
        exclude: Container[Backend] = (),
        key: bytes | None = None,
    ) -> Backend | None:
        if tuple(backends) != self._built_for:
            self._build(backends)
        owners = self._owners
        if not owners:
            return None
        start = bisect.bisect(self._points, _hash(key or b""))
        count = len(owners)
        seen: set[Backend] = set()
        for step in range(count):
            backend = owners[(start + step) % count]
            if backend in seen:
                continue
            if backend.can_take(exclude):
                return backend
            seen.add(backend)
            if len(seen) == len(self._built_for):
                break
        return None


STRATEGIES: dict[str, Callable[[], Balancer]] = {
    "round_robin": RoundRobin,
    "weighted_round_robin": SmoothWeightedRoundRobin,
    "least_connections": LeastConnections,
    "power_of_two": PowerOfTwoChoices,
    "hash": ConsistentHash,
}


def balancer_for(name: str) -> Balancer:
    """
    A fresh strategy of the kind the configuration names.
    """
    return STRATEGIES[name]()
