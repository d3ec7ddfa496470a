# -*- test-case-name: tests.test_clients -*-
"""
Client connections as the balancer counts them: open per listener and per
client address, for the caps C{[lb] max_connections} and
C{max_connections_per_ip} (a connection past a cap is closed as soon as it
is accepted; established ones are not disturbed), and for draining at
shutdown.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger

from l7lb.config import LBConfig

if TYPE_CHECKING:
    from l7lb.metrics import Metrics


class ConnectionCounts:
    """
    Open client connections of one listener's site; the per-address counts
    are shared by every listener (C{by_address}).
    """

    log = Logger()

    def __init__(
        self, metrics: Metrics, by_address: Counter[str] | None = None
    ) -> None:
        self.metrics = metrics
        self.by_address: Counter[str] = Counter() if by_address is None else by_address
        self.open: set[Any] = set()
        self.refused = 0
        self._warned = False
        self._drained: list[Deferred[None]] = []
        self._closed: list[Deferred[None]] = []

    def admits(self, addr: IAddress | None, limits: LBConfig) -> bool:
        host: str = getattr(addr, "host", "") or ""
        if limits.max_connections and len(self.open) >= limits.max_connections:
            return self._refuse(host, "this listener's")
        per_ip = limits.max_connections_per_ip
        if per_ip and host and self.by_address[host] >= per_ip:
            return self._refuse(host, "this address's")
        return True

    def _refuse(self, host: str, whose: str) -> bool:
        self.refused += 1
        if not self._warned:
            # Once per listener: a flood must not flood the log too.
            self._warned = True
            self.log.warn(
                "connection from {host} refused: {whose} connection cap is reached "
                "(later refusals are counted, not logged)",
                host=host,
                whose=whose,
            )
        return False

    def opened(self, connection: Any) -> None:
        self.open.add(connection)
        if connection.host:
            self.by_address[connection.host] += 1
        self.metrics.connections_open += 1
        self.metrics.connections_total += 1

    def closed(self, connection: Any) -> None:
        if connection not in self.open:
            return
        self.open.discard(connection)
        host = connection.host
        if host:
            self.by_address[host] -= 1
            if self.by_address[host] <= 0:
                del self.by_address[host]
        self.metrics.connections_open -= 1
        if not self.open:
            waiting, self._closed = self._closed, []
            for d in waiting:
                d.callback(None)

    def close_all_when_done(self) -> None:
        for connection in list(self.open):
            connection.close_when_done()

    def abort_all(self) -> None:
        for connection in list(self.open):
            connection.transport.abortConnection()

    def when_drained(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d

    def when_closed(self) -> Deferred[None]:
        """
        Fires once no connection is open.
        """
        d: Deferred[None] = Deferred()
        if self.open:
            self._closed.append(d)
        else:
            d.callback(None)
        return d

    def drained(self) -> None:
        waiting, self._drained = self._drained, []
        for d in waiting:
            d.callback(None)
