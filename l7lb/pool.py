# -*- test-case-name: tests.test_balancing -*-
"""
Pools and their backends as they run: rotation state, slow start, requests
in flight, sticky-session tokens, the connections to each backend.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import sys
from collections import deque
from collections.abc import Callable, Container, Sequence
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from l7lb.config import PoolConfig, ServerConfig

if TYPE_CHECKING:
    from l7lb.balancing import Balancer
    from l7lb.outlier import PassiveHealth
    from l7lb.upstream import UpstreamClient

# A backend starting its slow start gets this share of its weight at first.
SLOW_START_FLOOR = 0.01
UNLIMITED = sys.maxsize


class _NoClock:
    def seconds(self) -> float:
        return 0.0

    def callLater(
        self, delay: float, f: Callable[..., object], *args: object
    ) -> IDelayedCall:
        raise RuntimeError("this pool was made without a clock")


class Backend:
    """
    One server of a pool. Identity matters: strategies keep per-backend state
    keyed by the object, so a backend is never rebuilt while it serves.

    It is in rotation while its active health checks pass, passive health
    has not ejected it, and it is not being drained; C{max_inflight} caps
    its concurrent requests (circuit breaking).
    """

    __slots__ = (
        "_clock",
        "_ramp_until",
        "address",
        "client",
        "config",
        "draining",
        "ejected",
        "healthy",
        "in_rotation",
        "inflight",
        "last_latency",
        "max_inflight",
        "passive",
        "retired",
        "slow_start",
        "weight",
    )

    def __init__(
        self,
        config: ServerConfig,
        client: UpstreamClient,
        slow_start: float = 0.0,
        clock: IReactorTime | None = None,
        max_inflight: int = 0,
    ) -> None:
        self.config = config
        self.address = config.address
        self.weight = config.weight
        self.client = client
        self.healthy = True
        self.ejected = False
        self.draining = False
        self.in_rotation = True
        self.inflight = 0
        self.last_latency: float | None = None
        self.max_inflight = max_inflight or UNLIMITED
        self.passive: PassiveHealth | None = None
        self.retired = False
        self.slow_start = slow_start
        self._clock: IReactorTime | _NoClock = clock or _NoClock()
        self._ramp_until = 0.0

    def set_healthy(self, healthy: bool) -> None:
        """
        The verdict of active health checks.
        """
        self.healthy = healthy
        self._update()

    def set_ejected(self, ejected: bool) -> None:
        """
        The verdict of passive health (outlier detection).
        """
        self.ejected = ejected
        self._update()

    def set_draining(self, draining: bool) -> None:
        self.draining = draining
        self._update()

    def _update(self) -> None:
        was = self.in_rotation
        self.in_rotation = self.healthy and not self.ejected and not self.draining
        if self.in_rotation and not was and self.slow_start:
            # Back in rotation: the share ramps up from near zero.
            self._ramp_until = self._clock.seconds() + self.slow_start
        elif not self.in_rotation:
            self._ramp_until = 0.0

    def can_take(self, exclude: Container[Backend] = ()) -> bool:
        """
        Whether a request may go here now: in rotation, under its cap, and
        not one of C{exclude} (the backends a retry must avoid).
        """
        return (
            self.in_rotation
            and self.inflight < self.max_inflight
            and self not in exclude
        )

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


class Waiter:
    """
    A request queued for a free slot. When a slot frees up, C{resume(True)}
    is offered to each waiter in turn until one takes it (returns C{True};
    one that cannot use it, say a retry that must avoid that backend, stays
    queued with its deadline). C{resume(False)} when C{queue_timeout}
    passes first.
    """

    __slots__ = ("resume", "timer")

    def __init__(self, resume: Callable[[bool], bool]) -> None:
        self.resume = resume
        self.timer: IDelayedCall | None = None


# Retries may always use this many concurrent slots, whatever the budget says
# (as Envoy's min_retry_concurrency), so a quiet pool can still retry.
MIN_RETRY_CONCURRENCY = 3


class Pool:
    """
    A named set of backends and the strategy that spreads requests over them,
    with sticky sessions on top when the pool asks for them, caps on
    concurrent requests (per backend and for the pool), a queue for
    requests that meet the caps, and a budget for retries.
    """

    def __init__(
        self,
        config: PoolConfig,
        backends: Sequence[Backend],
        balancer: Balancer,
        secret: bytes = b"",
        clock: IReactorTime | None = None,
    ) -> None:
        self.config = config
        self.backends = list(backends)
        self.balancer = balancer
        self.token_of: dict[Backend, bytes] = {}
        self._by_token: dict[bytes, Backend] = {}
        self.clock: IReactorTime | _NoClock = clock or _NoClock()
        self.inflight = 0
        self.queue: deque[Waiter] = deque()
        self.retries_inflight = 0
        self.retried = 0
        self.queued = 0
        self.shed = 0
        self._configure(config, secret)

    def _configure(self, config: PoolConfig, secret: bytes) -> None:
        self.config = config
        self.name = config.name
        self.max_inflight = config.pool_max_connections or UNLIMITED
        self.hashes = config.balance == "hash"
        self.sticky_cookie = (
            config.sticky_cookie.encode("ascii") if config.sticky_cookie else None
        )
        self._secret = secret
        self.token_of = {}
        self._by_token = {}
        if self.sticky_cookie is not None:
            for backend in self.backends:
                self._remember(backend)
        health = config.health
        # A backend that left rotation needs at least `rise` checks to return.
        self.retry_after = (
            b"%d" % max(1, math.ceil(health.interval * health.rise)) if health else b"1"
        )

    def reconfigure(
        self,
        config: PoolConfig,
        backends: Sequence[Backend],
        secret: bytes,
        balancer: Balancer | None = None,
    ) -> None:
        """
        Take a new configuration in place: counters, the queue and requests
        in flight carry on; the strategy too, unless a new one is given.
        """
        if balancer is not None:
            self.balancer = balancer
        self.backends = list(backends)
        self._configure(config, secret)

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

    def acquire(self, backend: Backend) -> None:
        backend.inflight += 1
        self.inflight += 1

    def release(self, backend: Backend) -> None:
        """
        A request to C{backend} is over; a queued request may take its slot.
        """
        backend.inflight -= 1
        self.inflight -= 1
        if backend.retired and backend.inflight == 0:
            backend.client.close()
        if not self.queue:
            return
        for waiter in list(self.queue):
            if waiter in self.queue and waiter.resume(True):
                self.cancel(waiter)
                break

    def at_capacity(self) -> bool:
        """
        Whether the pool as a whole has as many requests in flight as it may.
        """
        return self.inflight >= self.max_inflight

    def any_in_rotation(self, exclude: Container[Backend] = ()) -> bool:
        return any(b.in_rotation and b not in exclude for b in self.backends)

    def wait(self, resume: Callable[[bool], bool]) -> Waiter | None:
        """
        Queue a request until a slot frees up, or C{None} when the queue is
        full (the request is then refused at once).
        """
        if len(self.queue) >= self.config.max_queue:
            self.shed += 1
            return None
        waiter = Waiter(resume)
        waiter.timer = self.clock.callLater(
            self.config.queue_timeout, self._expire, waiter
        )
        self.queue.append(waiter)
        self.queued += 1
        return waiter

    def _expire(self, waiter: Waiter) -> None:
        waiter.timer = None
        self.cancel(waiter)
        waiter.resume(False)

    def cancel(self, waiter: Waiter) -> None:
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        with contextlib.suppress(ValueError):
            self.queue.remove(waiter)

    def may_retry(self) -> bool:
        """
        The retry budget: retries in flight stay below C{retry_budget} of
        all requests in flight, so a failing pool is not hit twice as hard.
        """
        allowed = max(MIN_RETRY_CONCURRENCY, self.config.retry_budget * self.inflight)
        return self.retries_inflight < allowed

    def sticky_backend(
        self, token: bytes | None, exclude: Container[Backend] = ()
    ) -> Backend | None:
        """
        The backend a sticky cookie names, if it may take the request.
        """
        if token is None:
            return None
        backend = self._by_token.get(token)
        if backend is None or not backend.can_take(exclude):
            return None
        return backend
