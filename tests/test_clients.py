"""
Client-side limits over real sockets: connection caps, the body deadline.
"""

from __future__ import annotations

import socket
import time

from twisted.internet import threads
from twisted.internet.defer import inlineCallbacks

from tests.support import CLIENT_TIMEOUT, IntegrationTest, Session, read_all, status_of


class ConnectionCapTests(IntegrationTest):
    @inlineCallbacks
    def test_per_ip_cap_refuses_new_connections_only(self):
        app = self.backend("app")
        service = self.one_pool(app.url, lb_options="max_connections_per_ip = 2")
        port = self.port_of(service)
        first, second = Session(port), Session(port)
        self.addCleanup(first.close)
        self.addCleanup(second.close)
        reply = yield first.fetch("/1")
        self.assertEqual(reply.status, 200)
        reply = yield second.fetch("/2")
        self.assertEqual(reply.status, 200)
        extra = socket.create_connection(("127.0.0.1", port))
        self.addCleanup(extra.close)
        extra.sendall(b"GET /3 HTTP/1.1\r\nHost: x\r\n\r\n")
        refused = yield threads.deferToThread(read_all, extra)
        self.assertEqual(refused, b"")  # closed at once, unanswered
        reply = yield first.fetch("/4")  # the established ones go on
        self.assertEqual(reply.status, 200)
        self.assertEqual([r.uri for r in app.requests], [b"/1", b"/2", b"/4"])
        second.close()
        yield self.until(lambda: sum(service_counts(service).values()) == 1)
        again = Session(port)
        self.addCleanup(again.close)
        reply = yield again.fetch("/5")
        self.assertEqual(reply.status, 200)

    @inlineCallbacks
    def test_listener_cap(self):
        app = self.backend("app")
        service = self.one_pool(app.url, lb_options="max_connections = 1")
        port = self.port_of(service)
        held = Session(port)
        self.addCleanup(held.close)
        reply = yield held.fetch("/")
        self.assertEqual(reply.status, 200)
        extra = socket.create_connection(("127.0.0.1", port))
        self.addCleanup(extra.close)
        extra.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        refused = yield threads.deferToThread(read_all, extra)
        self.assertEqual(refused, b"")


def service_counts(service):
    return service.runtime.site.connections.by_address


class BodyDeadlineTests(IntegrationTest):
    @inlineCallbacks
    def test_slow_body_gets_408(self):
        app = self.backend("app")
        service = self.one_pool(app.url, lb_options="client_body_timeout = 500ms")
        port = self.port_of(service)

        def slow_upload() -> tuple[bytes, float]:
            with socket.create_connection(
                ("127.0.0.1", port), timeout=CLIENT_TIMEOUT
            ) as s:
                s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
                started = time.monotonic()
                try:
                    for _ in range(20):
                        s.sendall(b"x")
                        time.sleep(0.1)
                except OSError:
                    pass
                return read_all(s), time.monotonic() - started

        answer, _ = yield threads.deferToThread(slow_upload)
        self.assertEqual(status_of(answer), 408)
        self.assertEqual(app.requests, [])
