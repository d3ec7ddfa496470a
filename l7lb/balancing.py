# -*- test-case-name: tests.test_balancing -*-
"""
Balancing strategies: which backend of a pool takes the next request.

A strategy sees the pool's backends in their configured order and picks one
that is in rotation and not excluded (a retry excludes the backend that just
failed), or C{None} when there is none.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from typing import Protocol

from l7lb.pool import Backend


class Balancer(Protocol):
    """
    Picks a backend for the next request.
    """

    def choose(
        self, backends: Sequence[Backend], exclude: Container[Backend] = ()
    ) -> Backend | None: ...


class RoundRobin:
    """
    Each backend in turn, weights ignored.
    """

    def __init__(self) -> None:
        self._next = 0

    def choose(
        self, backends: Sequence[Backend], exclude: Container[Backend] = ()
    ) -> Backend | None:
        count = len(backends)
        start = self._next
        for step in range(count):
            index = (start + step) % count
            backend = backends[index]
            if backend.in_rotation and backend not in exclude:
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
        self._current: dict[Backend, int] = {}

    def choose(
        self, backends: Sequence[Backend], exclude: Container[Backend] = ()
    ) -> Backend | None:
        current = self._current
        total = 0
        best: Backend | None = None
        best_weight = 0
        for backend in backends:
            if not backend.in_rotation or backend in exclude:
                continue
            weight = current.get(backend, 0) + backend.weight
            current[backend] = weight
            total += backend.weight
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
        self, backends: Sequence[Backend], exclude: Container[Backend] = ()
    ) -> Backend | None:
        count = len(backends)
        start = self._next
        best: Backend | None = None
        best_index = 0
        for step in range(count):
            index = (start + step) % count
            backend = backends[index]
            if not backend.in_rotation or backend in exclude:
                continue
            if best is None or (
                backend.inflight * best.weight < best.inflight * backend.weight
            ):
                best, best_index = backend, index
        if best is not None:
            self._next = best_index + 1
        return best


STRATEGIES: dict[str, Callable[[], Balancer]] = {
    "round_robin": RoundRobin,
    "weighted_round_robin": SmoothWeightedRoundRobin,
    "least_connections": LeastConnections,
}


def balancer_for(name: str) -> Balancer:
    """
    A fresh strategy of the kind the configuration names.
    """
    return STRATEGIES[name]()
