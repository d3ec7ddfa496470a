# -*- test-case-name: tests.test_resilience -*-
"""
Passive health (outlier detection): live traffic judges backends too.

C{max_fails} consecutive failures of real requests (a connection refused or
reset, a timeout, an invalid response, and optionally a 5xx) eject a backend
from rotation for C{fail_timeout}, twice as long each time it is ejected
again, up to five minutes. When the time is up it returns (if active health
checks are configured, they must also pass: a backend is in rotation only
when neither kind of check holds it out). A backend that serves well for a
full cap period is forgiven its past ejections.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from l7lb.pool import Backend
from l7lb.units import format_duration

MAX_EJECTION = 300.0


class PassiveHealth:
    """
    One backend's record in live traffic.
    """

    log = Logger()

    def __init__(
        self,
        pool: str,
        backend: Backend,
        max_fails: int,
        fail_timeout: float,
        clock: IReactorTime,
    ) -> None:
        self.pool = pool
        self.backend = backend
        self.max_fails = max_fails
        self.fail_timeout = fail_timeout
        self.clock = clock
        self.failures = 0
        self.ejections = 0
        self.total_ejections = 0
        # Since when the backend has served without a failure.
        self.clean_since = clock.seconds()
        self._return: IDelayedCall | None = None

    def success(self) -> None:
        self.failures = 0
        if self.ejections and self.clock.seconds() - self.clean_since >= MAX_EJECTION:
            self.ejections = 0

    def failure(self, reason: str) -> None:
        self.failures += 1
        self.clean_since = self.clock.seconds()
        if self.failures >= self.max_fails and not self.backend.ejected:
            self._eject(reason)

    def _eject(self, reason: str) -> None:
        duration = min(self.fail_timeout * 2**self.ejections, MAX_EJECTION)
        self.ejections += 1
        self.total_ejections += 1
        self.failures = 0
        self.backend.set_ejected(True)
        self._return = self.clock.callLater(duration, self._readmit)
        self.log.warn(
            "backend {backend} of pool {pool} ejected for {duration} after "
            "{count} failed requests: {reason}",
            backend=self.backend.address,
            pool=self.pool,
            duration=format_duration(duration),
            count=self.max_fails,
            reason=reason,
            ejected=True,
        )

    def _readmit(self) -> None:
        self._return = None
        self.clean_since = self.clock.seconds()
        self.backend.set_ejected(False)
        self.log.info(
            "backend {backend} of pool {pool} readmitted after its ejection{waiting}",
            backend=self.backend.address,
            pool=self.pool,
            waiting="" if self.backend.in_rotation else " (waiting for health checks)",
            ejected=False,
        )

    def stop(self) -> None:
        if self._return is not None and self._return.active():
            self._return.cancel()
        self._return = None
