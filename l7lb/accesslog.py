# -*- test-case-name: tests.test_accesslog -*-
"""
The access log: one line per request, however the exchange ended.

    2026-11-27T22:49:03.123Z 127.0.0.1 "GET /apiA/x HTTP/1.1" 200 1234 0.004
        route=api-a backend=127.0.0.1:8081 id=5f0c... [end="client closed"]

(one line in the file). Lines are buffered and flushed every second, when
the buffer fills, and at shutdown, so logging costs no system call per
request.
"""

from __future__ import annotations

import sys
import time
from typing import IO, TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.task import LoopingCall

if TYPE_CHECKING:
    from l7lb.site import BalancerRequest

_PRINTABLE = bytes(range(0x21, 0x7F)).replace(b'"', b"").replace(b"\\", b"")


def _escape(value: bytes) -> bytes:
    """
    Client-supplied bytes, made safe for a line-oriented log.
    """
    if not value.translate(None, _PRINTABLE):
        return value
    return b"".join(
        bytes((byte,)) if bytes((byte,)) in _PRINTABLE else b"\\x%02x" % byte
        for byte in value
    )


def _host(address: IAddress | None) -> bytes:
    host = getattr(address, "host", None)
    return host.encode("ascii", "replace") if isinstance(host, str) else b"-"


class AccessLog:
    """
    Formats and buffers access-log lines; C{out=None} turns logging off.
    """

    def __init__(self, out: IO[bytes] | None, clock: IReactorTime) -> None:
        self._out = out
        self._clock = clock
        self._second = -1
        self._stamp = b""

    @property
    def enabled(self) -> bool:
        return self._out is not None

    @classmethod
    def open(cls, destination: str | None, clock: IReactorTime) -> AccessLog:
        """
        C{"-"} is standard output, C{None} is off, anything else a file path
        (opened for appending).
        """
        if destination is None:
            return cls(None, clock)
        if destination == "-":
            return cls(sys.stdout.buffer, clock)
        return cls(open(destination, "ab"), clock)

    def _timestamp(self, now: float) -> bytes:
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime(
                "%Y-%m-%dT%H:%M:%S", time.gmtime(second)
            ).encode()
        return b"%s.%03dZ" % (self._stamp, int((now - second) * 1000))

    def log(self, request: BalancerRequest) -> None:
        if self._out is None:
            return
        now = self._clock.seconds()
        line = b'%s %s "%s %s %s" %d %d %.3f route=%s backend=%s id=%s' % (
            self._timestamp(now),
            request.client_address.encode("ascii", "replace"),
            _escape(request.method or b"-"),
            _escape(request.uri or b"-"),
            _escape(request.clientproto or b"-"),
            request.code,
            request.sentLength,
            max(0.0, now - request.started),
            request.route_name.encode(),
            request.backend_address.encode(),
            request.request_id,
        )
        if request.note:
            line += b' end="%s"' % request.note.encode()
        self._out.write(line + b"\n")

    def log_refusal(self, peer: IAddress | None, status: int) -> None:
        """
        A request refused before it could be read (its line was too long).
        """
        if self._out is None:
            return
        now = self._clock.seconds()
        self._out.write(
            b'%s %s "- - -" %d 0 0.000 route=- backend=- id=- end="refused"\n'
            % (self._timestamp(now), _host(peer), status)
        )

    def flush(self) -> None:
        if self._out is not None:
            self._out.flush()

    def close(self) -> None:
        if self._out is not None:
            self._out.flush()
            if self._out is not sys.stdout.buffer:
                self._out.close()
            self._out = None


class AccessLogService(Service):
    """
    Flushes the access log every second while l7lb runs, and at the end.
    """

    def __init__(self, access_log: AccessLog, clock: IReactorTime) -> None:
        self.access_log = access_log
        self._flusher = LoopingCall(access_log.flush)
        self._flusher.clock = clock

    def startService(self) -> None:
        super().startService()
        if self.access_log.enabled:
            self._flusher.start(1.0, now=False)

    def stopService(self) -> Any:
        super().stopService()
        if self._flusher.running:
            self._flusher.stop()
        self.access_log.close()
