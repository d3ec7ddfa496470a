# -*- test-case-name: tests.test_resilience -*-
"""
Caps on client connections: per listener (C{[lb] max_connections}) and per
client address across all listeners (C{max_connections_per_ip}). A
connection past a cap is closed as soon as it is accepted; established
connections are not disturbed.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.interfaces import IAddress, IProtocolFactory, IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure


class ConnectionCounts:
    """
    Open connections per client address, shared by every listener.
    """

    def __init__(self, per_ip: int) -> None:
        self.per_ip = per_ip
        self.by_address: Counter[str] = Counter()


class _Counted(ProtocolWrapper):
    factory: ConnectionLimitFactory

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.factory.closed(self.host)
        super().connectionLost(reason)


class ConnectionLimitFactory(WrappingFactory):
    """
    Wraps a listener's factory; refuses connections past the caps.
    """

    protocol = _Counted
    noisy = False
    log = Logger()

    def __init__(
        self,
        wrapped: IProtocolFactory,
        maximum: int,
        counts: ConnectionCounts,
        clock: IReactorTime,
    ) -> None:
        super().__init__(wrapped)
        self.maximum = maximum
        self.counts = counts
        self.clock = clock
        self.open = 0
        self.refused = 0
        self._last_warning = -60.0

    def buildProtocol(self, addr: IAddress | None) -> Any:
        host: str = getattr(addr, "host", "") or ""
        counts = self.counts
        if (self.maximum and self.open >= self.maximum) or (
            counts.per_ip and host and counts.by_address[host] >= counts.per_ip
        ):
            self.refused += 1
            self._warn(host)
            return None  # the reactor closes the connection at once
        protocol: Any = super().buildProtocol(addr)
        if protocol is None:
            return None
        protocol.host = host
        self.open += 1
        if host:
            counts.by_address[host] += 1
        return protocol

    def closed(self, host: str) -> None:
        self.open -= 1
        if host:
            counts = self.counts.by_address
            counts[host] -= 1
            if counts[host] <= 0:
                del counts[host]

    def _warn(self, host: str) -> None:
        """
        At most one line a minute, however many connections are refused.
        """
        now = self.clock.seconds()
        if now - self._last_warning >= 60:
            self._last_warning = now
            self.log.warn(
                "connection from {host} refused: connection cap reached "
                "({refused} refused so far)",
                host=host,
                refused=self.refused,
            )
