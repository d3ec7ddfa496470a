# -*- test-case-name: tests.test_reactor -*-
"""
The reactor l7lb runs on: Twisted's epoll reactor, dispatching each I/O
event straight to its connection.

Twisted's reactors call every C{doRead}/C{doWrite} through
C{log.callWithLogger}, which sets up a logging context (the connection's
log prefix, for the legacy C{twisted.python.log} API) and copies a context
dictionary for each event. l7lb logs through C{twisted.logger}, which does
not read that context, and a proxied request makes at least two such
events; skipping that bookkeeping makes a request about a sixth cheaper
(see the README's performance section). This reactor skips it;
everything else, including how errors in an event are caught, logged and
turned into a lost connection, is Twisted's epoll reactor unchanged.

C{twistd l7lb} installs it unless another reactor was asked for with
C{twistd --reactor NAME}; C{trial --reactor l7lb} runs tests on it.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet import epollreactor
from twisted.internet.main import installReactor
from twisted.logger import Logger

log = Logger()


class EPollReactor(epollreactor.EPollReactor):
    """
    Twisted's epoll reactor without a logging context per I/O event.
    """

    def doPoll(self, timeout: float | None) -> None:
        if timeout is None:
            timeout = -1  # wait indefinitely
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                handle(selectable, fd, event)
            except Exception:
                # _doReadOrWrite catches what the connection raises; this is
                # for a failure while tearing it down, which must not stop
                # the other events of this turn.
                log.failure(
                    "unexpected error handling an event of {selectable}",
                    selectable=selectable,
                )

    doIteration = doPoll


def install() -> Any:
    """
    Make L{EPollReactor} the global reactor.
    """
    reactor = EPollReactor()
    installReactor(reactor)
    return reactor


__all__ = ["EPollReactor", "install"]
