"""
Wire details of the proxy hop found by review: retries that replay a body,
backends that answer early or with nonsense, framing of HEAD/204/304,
Expect, pipelining, Date and Connection, and cut responses to HTTP/1.0
clients.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time

from twisted.internet import threads
from twisted.internet.defer import gatherResults, inlineCallbacks

from tests.support import (
    CLIENT_TIMEOUT,
    IntegrationTest,
    Session,
    fetch,
    pattern,
    status_of,
)


def raw_backend(test, serve, count=10):
    """
    A backend of raw sockets: C{serve(connection)} runs in a thread for
    each of the first C{count} connections.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(CLIENT_TIMEOUT)
    test.addCleanup(listener.close)

    def loop():
        for _ in range(count):
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(connection,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return listener.getsockname()[1]


def read_head(connection):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return None
        data += chunk
    return data


def exchange_with_reset(port, data):
    """
    Send bytes, read to the end; say whether the end was a reset.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return b"".join(chunks), True
            if not chunk:
                return b"".join(chunks), False
            chunks.append(chunk)


class RetryBodyTests(IntegrationTest):
    @inlineCallbacks
    def test_retried_put_replays_its_body_over_a_pooled_connection(self):
        def reset_after_head(connection):
            with connection:
                if read_head(connection) is not None:
                    connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )

        bad = raw_backend(self, reset_after_head)
        good = self.backend("good")
        service = self.one_pool(
            f"http://127.0.0.1:{bad}", good.url, pool_options="response_timeout = 5s"
        )
        port = self.port_of(service)
        warm = yield fetch(port, "/warm")  # leaves an idle connection to `good`
        self.assertEqual(warm.status, 200)
        body = pattern(8 * 1024 * 1024)
        started = time.monotonic()
        reply = yield fetch(port, "/put", method="PUT", body=body)
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json()["body_length"], len(body))
        self.assertLess(time.monotonic() - started, 4.0)
        yield self.until(
            lambda: all(b.inflight == 0 for b in service.pools["p"].backends)
        )


class EarlyAnswerTests(IntegrationTest):
    @inlineCallbacks
    def test_backend_answering_before_reading_the_body(self):
        def refuse_upload(connection):
            with connection:
                read_head(connection)
                connection.sendall(
                    b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nbig!"
                )
                time.sleep(3)

        port_b = raw_backend(self, refuse_upload)
        service = self.one_pool(
            f"http://127.0.0.1:{port_b}", pool_options="response_timeout = 5s"
        )
        reply = yield fetch(
            self.port_of(service), "/up", method="POST", body=b"x" * (20 << 20)
        )
        self.assertEqual((reply.status, reply.body), (413, b"big!"))
        # No error escapes into the reactor afterwards (trial fails the
        # test if one is logged before cleanup).
        yield self.until(lambda: service.pools["p"].backends[0].inflight == 0)


class BadBackendTests(IntegrationTest):
    @inlineCallbacks
    def test_status_out_of_range_is_502(self):
        answers = iter(
            [
                b"HTTP/1.1 2000 Weird\r\nContent-Length: 0\r\n\r\n",
                b"HTTP/1.1 -5 Weird\r\nContent-Length: 0\r\n\r\n",
            ]
        )

        def serve(connection):
            with connection:
                read_head(connection)
                connection.sendall(next(answers))

        port_b = raw_backend(self, serve, count=2)
        service = self.one_pool(f"http://127.0.0.1:{port_b}")
        port = self.port_of(service)
        for _ in range(2):
            reply = yield fetch(port, "/")
            self.assertEqual(reply.status, 502)
        self.assertEqual(service.pools["p"].backends[0].inflight, 0)

    @inlineCallbacks
    def test_http10_client_sees_a_reset_when_close_delimited_body_is_cut(self):
        app = self.backend("app")
        service = self.one_pool(app.url)
        data, reset = yield threads.deferToThread(
            exchange_with_reset,
            self.port_of(service),
            b"GET /cut-chunked HTTP/1.0\r\n\r\n",
        )
        self.assertNotIn(b"Content-Length", data.split(b"\r\n\r\n")[0])
        self.assertTrue(reset)


class FramingTests(IntegrationTest):
    @inlineCallbacks
    def setUp(self):
        def serve(connection):
            with connection:
                buffer = b""
                while True:
                    while b"\r\n\r\n" not in buffer:
                        chunk = connection.recv(65536)
                        if not chunk:
                            return
                        buffer += chunk
                    head, buffer = buffer.split(b"\r\n\r\n", 1)
                    target = head.split(b" ")[1]
                    if target == b"/204":
                        connection.sendall(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
                    elif target == b"/304":
                        connection.sendall(
                            b'HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\nETag: "x"\r\n\r\n'
                        )
                    elif target == b"/head":
                        connection.sendall(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\nDate: Tue, 01 Jan 2030 00:00:00 GMT\r\n\r\n"
                        )
                    else:
                        connection.sendall(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                        )

        port_b = raw_backend(self, serve)
        self.service = self.one_pool(f"http://127.0.0.1:{port_b}")
        self.port = self.port_of(self.service)
        yield None

    @inlineCallbacks
    def test_head_204_304(self):
        session = Session(self.port)
        self.addCleanup(session.close)
        head = yield session.fetch("/head", method="HEAD")
        self.assertEqual((head.status, head.body), (200, b""))
        self.assertEqual(head.header("Content-Length"), ["5000"])
        self.assertEqual(head.header("Date"), ["Tue, 01 Jan 2030 00:00:00 GMT"])
        empty = yield session.fetch("/204")
        self.assertEqual(
            (empty.status, empty.body, empty.header("X-A")), (204, b"", ["1"])
        )
        self.assertEqual(empty.header("Transfer-Encoding"), [])
        not_modified = yield session.fetch("/304")
        self.assertEqual((not_modified.status, not_modified.body), (304, b""))
        self.assertEqual(not_modified.header("ETag"), ['"x"'])
        after = yield session.fetch("/after")  # the connection is still in step
        self.assertEqual(after.body, b"ok")
        self.assertEqual(len(after.header("Date")), 1)  # added: the backend sent none

    @inlineCallbacks
    def test_pipelined_requests_answered_in_order(self):
        raw = yield threads.deferToThread(
            exchange_with_reset,
            self.port,
            b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
            b"HEAD /head HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /204 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            b"GET /ignored HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        data, _ = raw
        statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]
        self.assertEqual(statuses, [200, 200, 204, 200])
        last = data.rsplit(b"HTTP/1.1 ", 1)[1]
        self.assertIn(b"Connection: close", last)

    @inlineCallbacks
    def test_expect_100_continue(self):
        def upload():
            with socket.create_connection(
                ("127.0.0.1", self.port), timeout=CLIENT_TIMEOUT
            ) as s:
                s.sendall(
                    b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
                )
                interim = s.recv(1024)
                s.sendall(b"hello")
                return interim, s.recv(65536)

        interim, final = yield threads.deferToThread(upload)
        self.assertEqual(interim, b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(status_of(final), 200)


class ConnectionHeaderTests(IntegrationTest):
    @inlineCallbacks
    def test_close_echoed_and_own_answers_dated(self):
        app = self.backend("app")
        service = self.one_pool(app.url)
        port = self.port_of(service)
        data, _ = yield threads.deferToThread(
            exchange_with_reset,
            port,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        self.assertIn(b"\r\nConnection: close\r\n", data)
        missing = yield fetch(port, "/nowhere/../../x")
        self.assertEqual(missing.status, 400)
        self.assertEqual(len(missing.header("Date")), 1)

    @inlineCallbacks
    def test_400_closes_the_connection(self):
        app = self.backend("app")
        service = self.one_pool(app.url)
        data, _ = yield threads.deferToThread(
            exchange_with_reset,
            self.port_of(service),
            b"GET /../x HTTP/1.1\r\nHost: x\r\n\r\nGET /fine HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        self.assertEqual(data.count(b"HTTP/1.1 "), 1)
        self.assertEqual(app.requests, [])


class KeepAliveConcurrencyTests(IntegrationTest):
    @inlineCallbacks
    def test_backend_connections_far_below_requests(self):
        app = self.backend("app")
        service = self.one_pool(app.url)
        port = self.port_of(service)
        sessions = [Session(port) for _ in range(8)]
        for session in sessions:
            self.addCleanup(session.close)

        for _ in range(25):
            replies = yield gatherResults([s.fetch("/") for s in sessions])
            self.assertTrue(all(r.status == 200 for r in replies))
        self.assertEqual(len(app.requests), 200)
        self.assertLessEqual(app.connections, 8)
