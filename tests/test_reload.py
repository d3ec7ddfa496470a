"""
Reloading a running balancer and stopping it: no request dropped, state
kept, bad files refused, listeners and certificates following the file,
in-flight requests finishing at shutdown.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import textwrap
import threading
import time

from twisted.internet import threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from l7lb.config import load
from l7lb.runtime import Runtime
from tests.support import CLIENT_TIMEOUT, IntegrationTest, closed_port, fetch
from tests.tlssupport import Certificates, handshake


class ReloadTestCase(IntegrationTest):
    def write(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(textwrap.dedent(text))

    def start(self, text: str):
        service = self.balancer(text)
        self.path = service.config_path
        return service


def _hammer(port: int, stop: threading.Event, results: list) -> None:
    """
    Requests back to back on keep-alive connections until told to stop.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    while not stop.is_set():
        try:
            connection.request("GET", "/load")
            response = connection.getresponse()
            response.read()
            results.append(response.status)
            if response.getheader("Connection") == "close":
                connection.close()
                connection = http.client.HTTPConnection(
                    "127.0.0.1", port, timeout=CLIENT_TIMEOUT
                )
        except Exception as e:  # every failure is a finding
            results.append(repr(e))
            connection.close()
            connection = http.client.HTTPConnection(
                "127.0.0.1", port, timeout=CLIENT_TIMEOUT
            )
    connection.close()


class ReloadTests(ReloadTestCase):
    @inlineCallbacks
    def test_reload_under_load_drops_nothing(self):
        a, b, c = self.backend("a"), self.backend("b"), self.backend("c")
        base = """
            [lb]
            listen = tcp:0:interface=127.0.0.1
            access_log = off
            [pool:p]
            servers = {servers}
            [route:all]
            pool = p
            """
        service = self.start(base.replace("{servers}", a.url))
        port = self.port_of(service)
        stop, results = threading.Event(), []
        clients = [
            threads.deferToThread(_hammer, port, stop, results) for _ in range(4)
        ]
        variants = [
            f"{a.url} {b.url}",
            f"{b.url} {c.url}",
            c.url,
            f"{a.url} {c.url} weight=2",
            a.url,
        ]
        for servers in variants * 2:
            self.write(base.replace("{servers}", servers))
            seen = len(results)
            yield self.until(lambda seen=seen: len(results) > seen + 20)
            self.assertEqual(service.reload(), [])
        seen = len(results)
        yield self.until(lambda: len(results) > seen + 20)
        stop.set()
        yield from clients
        failures = [r for r in results if r != 200]
        self.assertEqual(failures, [])
        self.assertGreater(len(results), 200)
        self.assertEqual({b.name for b in (a, b, c) if b.requests}, {"a", "b", "c"})

    @inlineCallbacks
    def test_invalid_file_keeps_the_running_configuration(self):
        a = self.backend("a")
        service = self.start(
            f"""
            [lb]
            listen = tcp:0:interface=127.0.0.1
            access_log = off
            [pool:p]
            servers = {a.url}
            [route:all]
            pool = p
            """
        )
        self.write("[lb]\nlisten = nonsense\n[pool:p]\nservers = ftp://x\n")
        problems = service.reload()
        self.assertEqual(len(problems), 3)
        self.assertTrue(all(p.startswith(self.path) for p in problems))
        reply = yield fetch(self.port_of(service), "/")
        self.assertEqual(reply.json()["backend"], "a")

    @inlineCallbacks
    def test_backends_keep_their_state_and_connections(self):
        a, b = self.backend("a"), self.backend("b")
        a.health_status = 500
        text = f"""
            [lb]
            listen = tcp:0:interface=127.0.0.1
            access_log = off
            [pool:p]
            servers = {a.url} {b.url}
            health_path = /health
            health_interval = 10s
            fall = 1
            [route:all]
            pool = p
            """
        service = self.start(text)
        pool = service.pools["p"]
        old_a, old_b = pool.backends
        yield self.until(lambda: not old_a.in_rotation)
        reply = yield fetch(self.port_of(service), "/")
        self.assertEqual(reply.json()["backend"], "b")
        connections = b.connections
        self.write(
            text.replace(
                "[route:all]",
                "[route:extra]\npath_prefix = /extra\npool = p\n[route:all]",
            )
        )
        self.assertEqual(service.reload(), [])
        self.assertIs(service.pools["p"], pool)
        self.assertEqual(pool.backends, [old_a, old_b])
        self.assertFalse(
            old_a.in_rotation
        )  # no new check has run: the state carried over
        reply = yield fetch(self.port_of(service), "/extra")
        self.assertEqual(reply.json()["backend"], "b")
        self.assertEqual(b.connections, connections)  # the pooled connection was reused

    @inlineCallbacks
    def test_listeners_follow_the_file(self):
        a = self.backend("a")
        first = closed_port()
        service = self.start(
            f"""
            [lb]
            listen = tcp:{first}:interface=127.0.0.1
            access_log = off
            [pool:p]
            servers = {a.url}
            [route:all]
            pool = p
            """
        )
        second = closed_port()
        self.write(
            f"""
            [lb]
            listen = tcp:{second}:interface=127.0.0.1
            access_log = off
            [pool:p]
            servers = {a.url}
            [route:all]
            pool = p
            """
        )
        self.assertEqual(service.reload(), [])
        reply = yield fetch(second, "/")
        self.assertEqual(reply.status, 200)
        refused = yield threads.deferToThread(_connect_refused, first)
        self.assertTrue(refused)

    @inlineCallbacks
    def test_certificates_reloaded(self):
        a = self.backend("a")
        certs = Certificates(os.path.abspath(self.mktemp()))
        pem = certs.issue("site", "old.example.test")
        service = self.start(
            f"""
            [lb]
            tls_listen = tcp:0:interface=127.0.0.1
            access_log = off
            [tls]
            certificates = {pem}
            [pool:p]
            servers = {a.url}
            [route:all]
            pool = p
            """
        )
        port = service.tls_listeners[0].port.getHost().port
        before = yield handshake(port, certs.client_context(check_hostname=False), None)
        self.assertEqual(before.names, ["old.example.test"])
        certs.issue("site", "new.example.test")  # the same file, new contents
        self.assertEqual(service.reload(), [])
        after = yield handshake(port, certs.client_context(check_hostname=False), None)
        self.assertEqual(after.names, ["new.example.test"])


def _connect_refused(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


class ShutdownTests(ReloadTestCase):
    @inlineCallbacks
    def test_graceful_stop_finishes_in_flight_requests(self):
        a = self.backend("a")
        service = self.balancer(
            f"""
            [lb]
            listen = tcp:0:interface=127.0.0.1
            access_log = off
            drain_timeout = 10s
            [pool:p]
            servers = {a.url}
            [route:all]
            pool = p
            """
        )
        port = self.port_of(service)
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
        yield threads.deferToThread(
            lambda: (idle.request("GET", "/"), idle.getresponse().read())
        )
        slow = threads.deferToThread(_get_with_headers, port, "/hang")
        yield self.until(lambda: len(a.hanging) == 1)
        stopping = service.stopService()
        # No new connections (the port closes on the reactor's next turn);
        # the idle keep-alive one is closed.
        deadline = time.monotonic() + 5
        refused = False
        while not refused and time.monotonic() < deadline:
            # A connection queued just before the port closed times out.
            with contextlib.suppress(OSError):
                refused = yield threads.deferToThread(_connect_refused, port)
        self.assertTrue(refused)
        closed = yield threads.deferToThread(_closed_by_server, idle)
        self.assertTrue(closed)
        self.assertFalse(stopping.called)  # waiting for the slow one
        started = time.monotonic()
        a.hanging[0].write(b"done at last")
        a.hanging[0].finish()
        status, headers, body = yield slow
        self.assertEqual((status, body), (200, b"done at last"))
        self.assertEqual(headers.get("Connection"), "close")
        yield stopping
        self.assertLess(time.monotonic() - started, 5)

    @inlineCallbacks
    def test_drain_timeout_cuts_the_stragglers(self):
        a = self.backend("a")
        service = self.balancer(
            f"""
            [lb]
            listen = tcp:0:interface=127.0.0.1
            access_log = off
            drain_timeout = 300ms
            [pool:p]
            servers = {a.url}
            [route:all]
            pool = p
            """
        )
        slow = threads.deferToThread(_get_with_headers, self.port_of(service), "/hang")
        yield self.until(lambda: len(a.hanging) == 1)
        started = time.monotonic()
        yield service.stopService()
        self.assertLess(time.monotonic() - started, 3)
        yield self.assertFailure(
            slow, http.client.RemoteDisconnected, ConnectionResetError
        )


def _get_with_headers(port: int, path: str):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, dict(response.getheaders()), response.read()


def _closed_by_server(connection: http.client.HTTPConnection) -> bool:
    connection.sock.settimeout(5)
    try:
        return connection.sock.recv(1) == b""
    except ConnectionResetError:
        return True


class _Closing:
    """
    An upstream client whose connections take until C{finish()} to close.
    """

    def __init__(self, reactor, server, pool) -> None:
        self.closing: Deferred[None] = Deferred()

    def send(self, request, receiver):
        raise AssertionError("no request in this test")

    def close(self) -> Deferred[None]:
        return self.closing


class RetiredBackendTests(SynchronousTestCase):
    def test_stop_waits_for_the_connections_of_a_removed_backend(self):
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "lb.ini")

        def write(servers: str) -> None:
            with open(path, "w") as f:
                f.write(
                    "[lb]\nlisten = tcp:0:interface=127.0.0.1\naccess_log = off\n"
                    f"[pool:p]\nservers = {servers}\n[route:r]\npool = p\n"
                )

        write("http://127.0.0.1:1 http://127.0.0.1:2")
        runtime = Runtime(Clock(), _Closing)
        runtime.apply(load(path))
        removed = runtime.pools["p"].backends[1]
        write("http://127.0.0.1:1")
        runtime.apply(load(path))
        self.assertTrue(removed.retired)
        for backend in runtime.pools["p"].backends:
            backend.client.closing.callback(None)
        stopped = runtime.stop()
        self.assertNoResult(stopped)
        removed.client.closing.callback(None)
        self.successResultOf(stopped)
