# -*- test-case-name: tests.test_ratelimit -*-
"""
Token-bucket rate limiting, per reactor (each process keeps its own buckets;
with C{[lb] workers = N} each worker process enforces a share of C{1/N} of
the rate and of the burst, at least one token, so that together they admit
what the route allows).

A bucket holds up to C{burst} tokens and refills continuously at C{rate}
tokens a second, on the injected clock; a request takes one token or is
refused. Buckets are kept per key (the whole route, a client address, a
header's value) in bounded memory: a bucket that has refilled completely is
the same as no bucket and is dropped, and when C{max_keys} buckets exist the
least recently used one goes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from l7lb.config import RateLimitConfig


@dataclass(frozen=True, slots=True)
class Decision:
    """
    The outcome of one request against a limit: whether it may pass, the
    whole tokens left, the seconds until the bucket is full again, and (when
    refused) the seconds until a token is there.
    """

    allowed: bool
    remaining: int
    reset: int
    retry_after: int


class RateLimiter:
    """
    One route's limit: a token bucket per key. C{share} is how many
    processes enforce the limit together; this one takes its part of it.
    """

    # How many idle buckets one request may sweep away, to keep each request's
    # cost bounded while memory still drains.
    _SWEEP = 4

    def __init__(
        self,
        name: str,
        config: RateLimitConfig,
        clock: IReactorTime,
        max_keys: int,
        share: int = 1,
    ) -> None:
        self.name = name
        self.config = config
        self.share = share
        self.rate = config.rate / share
        self.burst = max(1.0, config.burst / share)
        self.max_keys = max_keys
        self._clock = clock
        # key -> [tokens, time of last update], least recently used first.
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self._refill_time = self.burst / self.rate
        self.allowed = 0
        self.refused = 0
        self.policy = _policy(name, config)

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, key: str) -> Decision:
        """
        Spend a token of C{key}'s bucket, if there is one.
        """
        now = self._clock.seconds()
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            self._make_room(now)
            tokens = self.burst
        else:
            buckets.move_to_end(key)
            tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        if tokens >= 1.0:
            tokens -= 1.0
            allowed = True
            self.allowed += 1
            retry_after = 0
        else:
            allowed = False
            self.refused += 1
            retry_after = max(1, math.ceil((1.0 - tokens) / self.rate))
        if bucket is None:
            buckets[key] = [tokens, now]
        else:
            bucket[0], bucket[1] = tokens, now
        reset = math.ceil((self.burst - tokens) / self.rate)
        return Decision(allowed, int(tokens), reset, retry_after)

    def _make_room(self, now: float) -> None:
        """
        Drop buckets that have refilled (idle ones), oldest first, and the
        least recently used one if the table is still full.
        """
        buckets = self._buckets
        for _ in range(self._SWEEP):
            if not buckets:
                break
            oldest = next(iter(buckets.values()))
            if now - oldest[1] < self._refill_time * (1.0 - oldest[0] / self.burst):
                break
            buckets.popitem(last=False)
        while len(buckets) >= self.max_keys:
            buckets.popitem(last=False)

    def headers(self, decision: Decision) -> list[tuple[bytes, bytes]]:
        """
        The IETF httpapi draft's fields for a response: the policy and the
        current state, plus Retry-After on a refusal.
        """
        state = b'"%s";r=%d;t=%d' % (
            self.name.encode(),
            decision.remaining,
            decision.reset,
        )
        fields = [(b"RateLimit-Policy", self.policy), (b"RateLimit", state)]
        if not decision.allowed:
            fields.append((b"Retry-After", b"%d" % decision.retry_after))
        return fields


def _policy(name: str, config: RateLimitConfig) -> bytes:
    """
    C{"api-a";q=100;w=1} for C{100/s}: the quota as written, per window.
    """
    quota, window = config.quota, config.window
    return b'"%s";q=%d;w=%d' % (name.encode(), quota, window)
