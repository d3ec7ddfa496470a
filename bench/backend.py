"""A minimal keep-alive HTTP/1.1 backend for the benchmark, standard library only.

Used when NGINX is not installed. It answers every request (``/health``
included) with the same 100-byte body so that the backend does as little work
as possible and the proxy in front of it is what gets measured. With
``--status-port``, that port answers how many requests were served, in the
format of NGINX's ``stub_status``.

    python3 bench/backend.py --port 8081 --port 8082 [--status-port 8083]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

BODY = (b"l7lb bench backend: fixed 100-byte body " + b"." * 100)[:99] + b"\n"
assert len(BODY) == 100

_HEADERS = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % len(BODY)
)
KEEP_ALIVE_RESPONSE = _HEADERS + b"\r\n" + BODY
CLOSE_RESPONSE = _HEADERS + b"Connection: close\r\n\r\n" + BODY
BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
)
MAX_HEADER_BYTES = 64 * 1024


class Head:
    """What the backend needs from a request head: body length and keep-alive."""

    __slots__ = ("body_length", "keep_alive")

    def __init__(self, body_length: int, keep_alive: bool) -> None:
        self.body_length = body_length
        self.keep_alive = keep_alive


def parse_head(head: bytes) -> Head | None:
    """Read only framing and persistence; ``None`` when the head is unusable."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None
    keep_alive = parts[2] == b"HTTP/1.1"
    body_length = 0
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            return None
        name = name.strip().lower()
        value = value.strip().lower()
        if name == b"content-length":
            if not value.isdigit():
                return None
            body_length = int(value)
        elif name == b"transfer-encoding":
            return None  # chunked request bodies are not needed for the benchmark
        elif name == b"connection":
            tokens = {token.strip() for token in value.split(b",")}
            if b"close" in tokens:
                keep_alive = False
            elif b"keep-alive" in tokens:
                keep_alive = True
    return Head(body_length, keep_alive)


class Counter:
    """Requests answered and connections accepted, over every port."""

    def __init__(self) -> None:
        self.requests = 0
        self.connections = 0

    def status(self) -> bytes:
        """A whole HTTP response in the format of NGINX's ``stub_status``."""
        body = (
            "Active connections: 0\nserver accepts handled requests\n"
            f" {self.connections} {self.connections} {self.requests}\n"
        ).encode()
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )


class FixedResponder(asyncio.Protocol):
    """Answer each request on a connection in order, pipelining included."""

    def __init__(self, counter: Counter) -> None:
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._counter = counter

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._counter.connections += 1

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._transport is not None and self._answer_one():
            pass

    def _answer_one(self) -> bool:
        """Answer the first complete request in the buffer; ``False`` if none."""
        assert self._transport is not None
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEADER_BYTES:
                self._close_with(BAD_REQUEST)
            return False
        head = parse_head(bytes(self._buffer[:end]))
        if head is None:
            self._close_with(BAD_REQUEST)
            return False
        total = end + 4 + head.body_length
        if len(self._buffer) < total:
            return False
        del self._buffer[:total]
        self._counter.requests += 1
        if head.keep_alive:
            self._transport.write(KEEP_ALIVE_RESPONSE)
            return True
        self._close_with(CLOSE_RESPONSE)
        return False

    def _close_with(self, response: bytes) -> None:
        assert self._transport is not None
        self._transport.write(response)
        self._transport.close()
        self._transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


class StatusResponder(asyncio.Protocol):
    """Answer the first request head with the counts, then close."""

    def __init__(self, counter: Counter) -> None:
        self._buffer = bytearray()
        self._counter = counter
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._transport is not None and b"\r\n\r\n" in self._buffer:
            self._transport.write(self._counter.status())
            self._transport.close()
            self._transport = None


async def serve(host: str, ports: list[int], status_port: int | None) -> None:
    """Listen on every port until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set_result, None)
    counter = Counter()
    servers = [
        await loop.create_server(
            lambda: FixedResponder(counter), host, port, backlog=4096
        )
        for port in ports
    ]
    if status_port is not None:
        servers.append(
            await loop.create_server(
                lambda: StatusResponder(counter), host, status_port
            )
        )
    try:
        await stop
    finally:
        for server in servers:
            server.close()


def main() -> None:
    """Parse arguments and serve; one process may listen on several ports."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--status-port", type=int, help="serves the request count")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.status_port))


if __name__ == "__main__":
    main()
