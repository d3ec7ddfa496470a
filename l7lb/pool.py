# -*- test-case-name: tests.test_balancing -*-
"""
Pools and their backends as they run: rotation state, slow start, requests
in flight, sticky-session tokens, the connections to each backend.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Container, Sequence
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime

from l7lb.config import PoolConfig, ServerConfig

if TYPE_CHECKING:
    from l7lb.balancing import Balancer
    from l7lb.upstream import UpstreamClient

# A backend starting its slow start gets this share of its weight at first.
SLOW_START_FLOOR = 0.01


class _NoClock:
    def seconds(self) -> float:
        return 0.0


class Backend:
    """
    One server of a pool. Identity matters: strategies keep per-backend state
    keyed by the object, so a backend is never rebuilt while it serves.
    """

    __slots__ = (
        "_clock",
        "_ramp_until",
        "address",
        "client",
        "config",
        "in_rotation",
        "inflight",
        "slow_start",
        "weight",
    )

    def __init__(
        self,
        config: ServerConfig,
        client: UpstreamClient,
        slow_start: float = 0.0,
        clock: IReactorTime | None = None,
    ) -> None:
        self.config = config
        self.address = config.address
        self.weight = config.weight
        self.client = client
        self.in_rotation = True
        self.inflight = 0
        self.slow_start = slow_start
        self._clock: IReactorTime | _NoClock = clock or _NoClock()
        self._ramp_until = 0.0

    def return_to_rotation(self) -> None:
        """
        Back in rotation; with slow start its share ramps up from near zero.
        """
        self.in_rotation = True
        if self.slow_start:
            self._ramp_until = self._clock.seconds() + self.slow_start

    def leave_rotation(self) -> None:
        self.in_rotation = False
        self._ramp_until = 0.0

    def current_weight(self) -> float:
        """
        The weight strategies use now: the configured one, or during slow
        start a share of it growing linearly over the window.
        """
        if not self._ramp_until:
            return self.weight
        left = self._ramp_until - self._clock.seconds()
        if left <= 0:
            self._ramp_until = 0.0
            return self.weight
        return self.weight * max(SLOW_START_FLOOR, 1.0 - left / self.slow_start)

    def __repr__(self) -> str:
        state = "in" if self.in_rotation else "out"
        return f"<Backend {self.address} {state} inflight={self.inflight}>"


class Pool:
    """
    A named set of backends and the strategy that spreads requests over them,
    with sticky sessions on top when the pool asks for them.
    """

    def __init__(
        self,
        config: PoolConfig,
        backends: Sequence[Backend],
        balancer: Balancer,
        secret: bytes = b"",
    ) -> None:
        self.config = config
        self.name = config.name
        self.backends = list(backends)
        self.balancer = balancer
        self.sticky_cookie = (
            config.sticky_cookie.encode("ascii") if config.sticky_cookie else None
        )
        self.hashes = config.balance == "hash"
        self._secret = secret
        self.token_of: dict[Backend, bytes] = {}
        self._by_token: dict[bytes, Backend] = {}
        if self.sticky_cookie is not None:
            for backend in self.backends:
                self._remember(backend)
        health = config.health
        # A backend that left rotation needs at least `rise` checks to return.
        self.retry_after = (
            b"%d" % max(1, math.ceil(health.interval * health.rise)) if health else b"1"
        )

    def _remember(self, backend: Backend) -> None:
        """
        A backend's sticky token: opaque, not guessable, the same for every
        l7lb that shares the secret.
        """
        message = f"{self.name}\0{backend.config.url}".encode()
        token = (
            hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:32].encode()
        )
        self.token_of[backend] = token
        self._by_token[token] = backend

    def choose(
        self, exclude: Container[Backend] = (), key: bytes | None = None
    ) -> Backend | None:
        """
        The backend for the next request, or C{None} if none is in rotation.
        C{key} is what a hashing strategy hashes.
        """
        return self.balancer.choose(self.backends, exclude, key)

    def sticky_backend(
        self, token: bytes | None, exclude: Container[Backend] = ()
    ) -> Backend | None:
        """
        The backend a sticky cookie names, if it may take the request.
        """
        if token is None:
            return None
        backend = self._by_token.get(token)
        if backend is None or not backend.in_rotation or backend in exclude:
            return None
        return backend
