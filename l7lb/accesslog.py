# -*- test-case-name: tests.test_accesslog -*-
"""
The access log: one line per request, however the exchange ended.

    2026-11-27T22:49:03.123Z 127.0.0.1 "GET /apiA/x HTTP/1.1" 200 1234 0.004
        route=api-a backend=127.0.0.1:8081 id=5f0c... [end="client closed"]

(one line in the file). Lines are buffered and flushed every second, when
the buffer fills, and at shutdown, so logging costs no system call per
request. Several processes may append to one log (C{[lb] workers}): a file
is opened with C{O_APPEND}, and every C{write(2)} carries whole lines only,
never more than a pipe writes at once on standard output, so no line is
ever split or mixed with another process's.
"""

from __future__ import annotations

import json
import os
import select
import stat
import time
from typing import TYPE_CHECKING, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

if TYPE_CHECKING:
    from l7lb.request import ClientRequest

# Flush once this much is buffered, whatever the timer says.
_FLUSH_AT = 64 * 1024
# The most one write(2) to a regular file carries.
_FILE_CHUNK = 64 * 1024

log = Logger()

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


class Output(Protocol):
    """
    Where flushed lines go: each C{write} is given whole lines.
    """

    def write(self, data: bytes, /) -> object: ...

    def close(self) -> None: ...


class LineOutput:
    """
    A file descriptor written with one C{write(2)} per chunk of whole lines:
    up to 64 KiB for a regular file (appended as a whole under
    C{O_APPEND}), up to C{PIPE_BUF} for anything else (a pipe keeps only
    writes that small in one piece when several processes share it).
    """

    def __init__(self, fd: int, owned: bool) -> None:
        self.fd = fd
        self.owned = owned
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        self.chunk_size = _FILE_CHUNK if regular else select.PIPE_BUF

    @classmethod
    def append_to(cls, path: str) -> LineOutput:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        return cls(os.open(path, flags, 0o644), owned=True)

    def write(self, data: bytes, /) -> object:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:
                # Someone made the descriptor non-blocking: wait as a
                # blocking write would.
                select.select([], [self.fd], [])
                continue
            view = view[written:]
        return None

    def close(self) -> None:
        if self.owned:
            os.close(self.fd)


class AccessLog:
    """
    Formats and buffers access-log lines; C{out=None} turns logging off.
    C{json} writes one JSON object per line instead of the text format.
    """

    def __init__(
        self, out: Output | None, clock: IReactorTime, json_lines: bool = False
    ) -> None:
        self._out = out
        self._clock = clock
        self._json = json_lines
        self._second = -1
        self._stamp = b""
        self._lines: list[bytes] = []
        self._buffered = 0
        self._failures = 0

    @property
    def enabled(self) -> bool:
        return self._out is not None

    @classmethod
    def open(
        cls, destination: str | None, clock: IReactorTime, form: str = "combined"
    ) -> AccessLog:
        """
        C{"-"} is standard output, C{None} is off, anything else a file path
        (opened for appending).
        """
        access_log = cls(None, clock)
        access_log.reopen(destination, form)
        return access_log

    def reopen(self, destination: str | None, form: str = "combined") -> None:
        """
        Write to C{destination} from now on (the same path again after
        logrotate moved the file away): what is buffered goes to the old one.
        """
        self.close()
        self._json = form == "json"
        if destination == "-":
            # Descriptor 1, not sys.stdout: twistd replaces that object with
            # one that turns writes into log events.
            self._out = LineOutput(1, owned=False)
        elif destination is not None:
            self._out = LineOutput.append_to(destination)

    def _timestamp(self, now: float) -> bytes:
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime(
                "%Y-%m-%dT%H:%M:%S", time.gmtime(second)
            ).encode()
        return b"%s.%03dZ" % (self._stamp, int((now - second) * 1000))

    def log(self, request: ClientRequest) -> None:
        if self._out is None:
            return
        now = self._clock.seconds()
        if self._json:
            self._line(self._json_line(request, now))
            return
        line = b'%s %s "%s %s %s" %d %d %.3f route=%s backend=%s id=%s' % (
            self._timestamp(now),
            request.client_address.encode("ascii", "replace"),
            _escape(request.method or b"-"),
            _escape(request.uri or b"-"),
            _escape(request.version or b"-"),
            request.code,
            request.sent_length,
            max(0.0, now - request.started),
            request.route_name.encode(),
            request.backend_address.encode(),
            request.request_id,
        )
        if request.note:
            line += b' end="%s"' % request.note.encode()
        self._line(line + b"\n")

    def _json_line(self, request: ClientRequest, now: float) -> bytes:
        record = {
            "time": self._timestamp(now).decode(),
            "client": request.client_address,
            "method": _text(request.method),
            "target": _text(request.uri),
            "protocol": _text(request.version),
            "status": request.code,
            "bytes": request.sent_length,
            "duration": round(max(0.0, now - request.started), 6),
            "route": request.route_name,
            "pool": request.pool_name,
            "backend": request.backend_address,
            "request_id": request.request_id.decode("latin-1"),
        }
        if request.note:
            record["end"] = request.note
        return json.dumps(record, separators=(",", ":")).encode() + b"\n"

    def log_refusal(self, host: str, status: int) -> None:
        """
        A request refused before it could be read (its line was too long).
        """
        if self._out is None:
            return
        now = self._clock.seconds()
        if self._json:
            record = {
                "time": self._timestamp(now).decode(),
                "client": host or "-",
                "status": status,
                "end": "refused",
            }
            self._line(json.dumps(record, separators=(",", ":")).encode() + b"\n")
            return
        self._line(
            b'%s %s "- - -" %d 0 0.000 route=- backend=- id=- end="refused"\n'
            % (self._timestamp(now), (host or "-").encode("ascii", "replace"), status)
        )

    def _line(self, line: bytes) -> None:
        self._lines.append(line)
        self._buffered += len(line)
        if self._buffered >= _FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """
        Write what is buffered, whole lines per write: as many as fit in
        one chunk of the output (a longer line goes alone).
        """
        lines, self._lines, self._buffered = self._lines, [], 0
        out = self._out
        if out is None or not lines:
            return
        limit = getattr(out, "chunk_size", _FILE_CHUNK)
        chunk: list[bytes] = []
        size = 0
        try:
            for line in lines:
                if chunk and size + len(line) > limit:
                    out.write(b"".join(chunk))
                    chunk, size = [], 0
                chunk.append(line)
                size += len(line)
            out.write(b"".join(chunk))
        except OSError as e:
            # A full disk or a closed pipe costs these lines, not the
            # balancer (nor the flushing that later lines need).
            self._failures += 1
            if self._failures == 1 or self._failures % 1000 == 0:
                log.error(
                    "access log lines lost ({count} writes failed so far): {error}",
                    count=self._failures,
                    error=str(e),
                )

    def close(self) -> None:
        if self._out is not None:
            self.flush()
            self._out.close()
            self._out = None


def _text(value: bytes | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return value.decode("latin-1")
