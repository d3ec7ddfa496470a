# -*- test-case-name: tests.test_balancing -*-
"""
Pools and their backends as they run: rotation state, requests in flight,
the connections to each backend.
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence
from typing import TYPE_CHECKING

from l7lb.config import PoolConfig, ServerConfig

if TYPE_CHECKING:
    from l7lb.balancing import Balancer
    from l7lb.upstream import UpstreamClient


class Backend:
    """
    One server of a pool. Identity matters: strategies keep per-backend state
    keyed by the object, so a backend is never rebuilt while it serves.
    """

    __slots__ = ("address", "client", "config", "in_rotation", "inflight", "weight")

    def __init__(self, config: ServerConfig, client: UpstreamClient) -> None:
        self.config = config
        self.address = config.address
        self.weight = config.weight
        self.client = client
        self.in_rotation = True
        self.inflight = 0

    def __repr__(self) -> str:
        state = "in" if self.in_rotation else "out"
        return f"<Backend {self.address} {state} inflight={self.inflight}>"


class Pool:
    """
    A named set of backends and the strategy that spreads requests over them.
    """

    def __init__(
        self, config: PoolConfig, backends: Sequence[Backend], balancer: Balancer
    ) -> None:
        self.config = config
        self.name = config.name
        self.backends = list(backends)
        self.balancer = balancer
        health = config.health
        # A backend that left rotation needs at least `rise` checks to return.
        self.retry_after = (
            b"%d" % max(1, math.ceil(health.interval * health.rise)) if health else b"1"
        )

    def choose(self, exclude: Container[Backend] = ()) -> Backend | None:
        """
        The backend for the next request, or C{None} if none is in rotation.
        """
        return self.balancer.choose(self.backends, exclude)
