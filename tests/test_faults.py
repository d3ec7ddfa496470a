"""
Backends that fail in every way we know, on real sockets: what the client
gets for each (the fault matrix of the README), and that passive health
notices.
"""

from __future__ import annotations

import socket
import time

from twisted.internet import threads
from twisted.internet.defer import inlineCallbacks

from tests.support import CLIENT_TIMEOUT, IntegrationTest, closed_port
from tests.test_hop import exchange_with_reset, raw_backend, read_head


def _answer(response: bytes, then: str = "close", pause: float = 0.0):
    """
    A backend that reads a request head, sends C{response}, and then closes,
    resets, or keeps the connection open (C{then}).
    """

    def serve(connection: socket.socket) -> None:
        with connection:
            if read_head(connection) is None:
                return
            if response:
                connection.sendall(response)
            if then == "reset":
                connection.setsockopt(
                    socket.SOL_SOCKET,
                    socket.SO_LINGER,
                    b"\x01\x00\x00\x00\x00\x00\x00\x00",
                )
            elif then == "hold":
                time.sleep(pause)

    return serve


def _drip(chunks: int, every: float):
    """
    Headers, then a chunked body one byte at a time, C{every} seconds apart.
    """

    def serve(connection: socket.socket) -> None:
        with connection:
            read_head(connection)
            connection.sendall(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n"
            )
            try:
                for _ in range(chunks):
                    time.sleep(every)
                    connection.sendall(b"1\r\nx\r\n")
                connection.sendall(b"0\r\n\r\n")
            except OSError:
                return

    return serve


FAULTS = {
    # fault: (backend behaviour, pool options, expected status or "cut")
    "refused": (None, "", 502),
    "reset before headers": (_answer(b"", "reset"), "", 502),
    "closed before headers": (_answer(b"", "close"), "", 502),
    "garbage status line": (_answer(b"HELLO THERE\r\n\r\n"), "", 502),
    "status out of range": (
        _answer(b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n"),
        "",
        502,
    ),
    "two different Content-Length": (
        _answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"),
        "",
        502,
    ),
    "response head over 64 KiB": (
        _answer(b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"v" * 70000 + b"\r\n\r\n"),
        "",
        502,
    ),
    "hang before headers": (_answer(b"", "hold", 2.0), "response_timeout = 300ms", 504),
    "reset mid-body": (
        _answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part", "reset"),
        "",
        "cut",
    ),
    "closed mid-body (length)": (
        _answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part"),
        "",
        "cut",
    ),
    "closed mid-body (chunked)": (
        _answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\npart\r\n"),
        "",
        "cut",
    ),
    "slow drip past idle_timeout": (_drip(10, 0.5), "idle_timeout = 200ms", "cut"),
    "headers then silence": (
        _answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", "hold", 2.0),
        "idle_timeout = 200ms",
        504,
    ),
    "slow drip within idle_timeout": (_drip(3, 0.05), "idle_timeout = 2s", 200),
    "own 503": (
        _answer(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy"),
        "",
        503,
    ),
}


class FaultMatrixTests(IntegrationTest):
    @inlineCallbacks
    def check(self, fault: str):
        behaviour, options, expected = FAULTS[fault]
        port_b = (
            closed_port()
            if behaviour is None
            else raw_backend(self, behaviour, count=3)
        )
        service = self.one_pool(
            f"http://127.0.0.1:{port_b}",
            pool_options=options + "\nretries = 0\nmax_fails = 0",
        )
        started = time.monotonic()
        data, reset = yield threads.deferToThread(
            exchange_with_reset,
            self.port_of(service),
            b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        self.assertLess(time.monotonic() - started, CLIENT_TIMEOUT / 2)
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        if expected == "cut":
            self.assertEqual(status, 200)
            complete = (
                body.endswith(b"0\r\n\r\n")
                if b"chunked" in head.lower()
                else b"Content-Length: 100" not in head or len(body) == 100
            )
            self.assertFalse(complete and not reset, data)
        else:
            self.assertEqual(status, expected, data[:200])
            self.assertNotIn(b"127.0.0.1", body)
        backend = service.pools["p"].backends[0]
        yield self.until(lambda: backend.inflight == 0)


for _fault in FAULTS:

    def _test(self, fault=_fault):
        return self.check(fault)

    _test.__name__ = "test_" + _fault.replace(" ", "_").replace("(", "").replace(
        ")", ""
    ).replace("-", "_")
    setattr(FaultMatrixTests, _test.__name__, _test)


class PassiveEjectionTests(IntegrationTest):
    @inlineCallbacks
    def test_failing_backend_ejected_from_live_traffic(self):
        good = self.backend("good")
        service = self.one_pool(
            f"http://127.0.0.1:{closed_port()}",
            good.url,
            pool_options="max_fails = 2\nfail_timeout = 30s",
        )
        port = self.port_of(service)
        from tests.support import fetch

        for _ in range(6):
            reply = yield fetch(port, "/")
            self.assertEqual(reply.status, 200)  # refused attempts are retried
        dead = service.pools["p"].backends[0]
        self.assertFalse(dead.in_rotation)
        self.assertTrue(dead.ejected)
