# -*- test-case-name: tests.test_chunked -*-
"""
The chunked transfer coding (RFC 9112 section 7.1), decoded strictly, for
request bodies from clients and response bodies from backends alike.
"""

from __future__ import annotations

from collections.abc import Callable

from l7lb.fields import TOKEN_BYTES, VALUE_BYTES

_HEX = b"0123456789abcdefABCDEF"
# The longest chunk-size line (with extensions), and trailer section, read.
MAX_CHUNK_LINE = 4096


class FramingError(ValueError):
    """
    The bytes are not a well-formed chunked body.
    """


class ChunkedDecoder:
    """
    Decodes a chunked body from the bytes handed to L{feed}. Extensions are
    checked and dropped, and so are trailer fields.
    """

    __slots__ = ("_line", "_remaining", "_state", "_trailer_size", "done")

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self) -> None:
        self._state = self._SIZE
        self._remaining = 0
        self._line = b""
        self._trailer_size = 0
        self.done = False

    def feed(self, data: bytes, deliver: Callable[[bytes], object]) -> bytes:
        """
        Decode what C{data} holds, passing the body's bytes to C{deliver};
        return what follows the body's end, once it has ended.
        """
        while data and not self.done:
            state = self._state
            if state == self._DATA:
                take = data[: self._remaining]
                data = data[len(take) :]
                deliver(take)
                self._remaining -= len(take)
                if not self._remaining:
                    self._state = self._DATA_END
                continue
            line, data = self._read_line(data)
            if line is None:
                return b""
            if state == self._SIZE:
                self._chunk_size(line)
            elif state == self._DATA_END:
                if line:
                    raise FramingError("chunk data longer than its size")
                self._state = self._SIZE
            else:
                self._trailer(line)
        return data

    def _read_line(self, data: bytes) -> tuple[bytes | None, bytes]:
        line = self._line + data if self._line else data
        end = line.find(b"\r\n")
        if end < 0:
            # A CR at the very end may be the first half of the line's CRLF.
            if len(line) > MAX_CHUNK_LINE + 1:
                raise FramingError("chunk line too long")
            self._line = line
            return None, b""
        if end > MAX_CHUNK_LINE:
            raise FramingError("chunk line too long")
        self._line = b""
        found = line[:end]
        if b"\r" in found or b"\n" in found:
            raise FramingError("bare CR or LF in chunked framing")
        return found, line[end + 2 :]

    def _chunk_size(self, line: bytes) -> None:
        size, _, extension = line.partition(b";")
        size = size.rstrip(b" \t")
        if not size or size.translate(None, _HEX) or len(size) > 15:
            raise FramingError("malformed chunk size")
        if extension.translate(None, VALUE_BYTES):
            raise FramingError("malformed chunk extension")
        self._remaining = int(size, 16)
        self._state = self._DATA if self._remaining else self._TRAILER

    def _trailer(self, line: bytes) -> None:
        if not line:
            self.done = True
            return
        self._trailer_size += len(line)
        if self._trailer_size > MAX_CHUNK_LINE:
            raise FramingError("trailer section too large")
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, TOKEN_BYTES):
            raise FramingError("malformed trailer field")
        if value.translate(None, VALUE_BYTES):
            raise FramingError("control character in a trailer field")
