# -*- test-case-name: tests.test_deadlines -*-
"""
Coarse deadlines for many objects at once.

Every client connection has a deadline (the idle keep-alive timeout, the
request head's, the body's), so does every request sent to a backend (the
response timeout, then the idle timeout between body bytes) and every idle
backend connection. Scheduling and cancelling a reactor timer for each of
those costs several microseconds a request; here an object just writes its
deadline into an attribute, and one timer per reactor looks at all of them
C{TICKS_PER_SECOND} times a second. A deadline is therefore met up to one
tick late, which no timeout in the configuration is fine enough to notice.
"""

from __future__ import annotations

import math
from typing import Protocol
from weakref import WeakKeyDictionary, ref

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()

NEVER = math.inf
TICKS_PER_SECOND = 4


class Watched(Protocol):
    """
    Something with a deadline: C{expired()} is called once the clock has
    passed C{deadline} (and C{deadline} stays as it is unless C{expired}
    changes it).
    """

    deadline: float

    def expired(self) -> None: ...


class Deadlines:
    """
    The watched objects of one clock, checked each tick while there are any.
    """

    _registry: WeakKeyDictionary[IReactorTime, Deadlines] = WeakKeyDictionary()

    def __init__(self, clock: IReactorTime) -> None:
        # Weakly: the registry must not keep a clock (and all it watches) alive.
        self._clock = ref(clock)
        self.items: set[Watched] = set()
        self._tick: IDelayedCall | None = None

    @classmethod
    def of(cls, clock: IReactorTime) -> Deadlines:
        """
        The one instance for C{clock}.
        """
        deadlines = cls._registry.get(clock)
        if deadlines is None:
            deadlines = cls._registry[clock] = cls(clock)
        return deadlines

    def watch(self, item: Watched) -> None:
        self.items.add(item)
        if self._tick is None:
            self._tick = self.clock.callLater(1 / TICKS_PER_SECOND, self._check)

    def unwatch(self, item: Watched) -> None:
        items = self.items
        items.discard(item)
        if not items:
            self.stop()

    @property
    def clock(self) -> IReactorTime:
        clock = self._clock()
        assert clock is not None, "the clock of live deadlines is gone"
        return clock

    def _check(self) -> None:
        self._tick = None
        try:
            now = self.clock.seconds()
            for item in [item for item in self.items if item.deadline <= now]:
                if item in self.items and item.deadline <= now:
                    try:
                        item.expired()
                    except Exception:
                        # One failure must not stop the others' deadlines.
                        log.failure("deadline of {item} failed", item=item)
        finally:
            if self.items and self._tick is None:
                self._tick = self.clock.callLater(1 / TICKS_PER_SECOND, self._check)

    def stop(self) -> None:
        """
        Stop ticking (the items stay, and ticking resumes with the next one
        watched).
        """
        if self._tick is not None and self._tick.active():
            self._tick.cancel()
        self._tick = None
