"""
The balancer end to end: real sockets, real fake backends, the stdlib's
HTTP client.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import socket
import struct

from twisted.internet import threads
from twisted.internet.defer import inlineCallbacks

from tests.support import (
    CLIENT_TIMEOUT,
    IntegrationTest,
    Session,
    closed_port,
    exchange,
    fetch,
    pattern,
    status_of,
)


class RoutingTests(IntegrationTest):
    @inlineCallbacks
    def setUp(self):
        self.a = self.backend("a")
        self.b = self.backend("b")
        self.d1 = self.backend("d1")
        self.d2 = self.backend("d2")
        self.service = self.balancer(
            f"""
            [pool:a]
            servers = {self.a.url}
            [pool:b]
            servers = {self.b.url}
            [pool:default]
            servers =
                {self.d1.url}
                {self.d2.url}
            [route:api-a]
            path_prefix = /apiA
            pool = a
            [route:api-b]
            path_prefix = /apiB
            pool = b
            strip_prefix = on
            [route:default]
            pool = default
            """
        )
        self.port = self.port_of(self.service)
        yield None

    @inlineCallbacks
    def test_prefixes_route_to_their_pools(self):
        a = yield fetch(self.port, "/apiA/users?id=7")
        self.assertEqual((a.status, a.json()["backend"]), (200, "a"))
        self.assertEqual(a.json()["uri"], "/apiA/users?id=7")
        exact = yield fetch(self.port, "/apiA")
        self.assertEqual(exact.json()["backend"], "a")
        other = yield fetch(self.port, "/apiAB")
        self.assertIn(other.json()["backend"], ("d1", "d2"))

    @inlineCallbacks
    def test_strip_prefix(self):
        reply = yield fetch(self.port, "/apiB/items/3?x=1")
        self.assertEqual(reply.json()["backend"], "b")
        self.assertEqual(reply.json()["uri"], "/items/3?x=1")
        root = yield fetch(self.port, "/apiB")
        self.assertEqual(root.json()["uri"], "/")

    @inlineCallbacks
    def test_default_pool_round_robin(self):
        names = []
        for _ in range(6):
            reply = yield fetch(self.port, "/anything")
            names.append(reply.json()["backend"])
        self.assertEqual(names, ["d1", "d2"] * 3)

    @inlineCallbacks
    def test_spellings_cannot_reach_another_route(self):
        for spelling in ("/apiB/../apiA/x", "/%61piA/x", "//apiA/x", "/./apiA/x"):
            reply = yield fetch(self.port, spelling)
            self.assertEqual(reply.json()["backend"], "a", spelling)
            self.assertEqual(reply.json()["uri"], "/apiA/x", spelling)

    @inlineCallbacks
    def test_unsafe_spellings_are_refused(self):
        for spelling in ("/../apiA", "/apiA/..%2f..%2fetc", "/apiA%00", "/a\\b"):
            reply = yield fetch(self.port, spelling)
            self.assertEqual(reply.status, 400, spelling)
            self.assertEqual(reply.body, b"400 Bad Request\n")
        self.assertEqual(self.a.requests, [])

    @inlineCallbacks
    def test_no_route_is_404(self):
        service = self.balancer(
            f"""
            [pool:a]
            servers = {self.a.url}
            [route:only]
            path_prefix = /only
            pool = a
            """
        )
        reply = yield fetch(self.port_of(service), "/elsewhere")
        self.assertEqual(reply.status, 404)
        self.assertEqual(reply.body, b"404 Not Found\n")
        self.assertEqual(reply.header("Content-Type"), ["text/plain; charset=utf-8"])
        self.assertEqual(len(reply.header("X-Request-Id")), 1)

    @inlineCallbacks
    def test_host_method_and_header_conditions(self):
        service = self.balancer(
            f"""
            [pool:a]
            servers = {self.a.url}
            [pool:b]
            servers = {self.b.url}
            [pool:default]
            servers = {self.d1.url}
            [route:exact]
            host = api.example.com
            pool = a
            [route:wild]
            host = *.example.com
            methods = GET
            pool = b
            [route:canary]
            header = X-Canary: 1
            pool = b
            [route:default]
            pool = default
            """
        )
        port = self.port_of(service)
        cases = [
            ({"Host": "API.example.com:8080"}, "GET", "a"),
            ({"Host": "www.example.com"}, "GET", "b"),
            ({"Host": "www.example.com"}, "POST", "d1"),
            ({"Host": "example.com"}, "GET", "d1"),
            ({"Host": "other.test", "X-Canary": "1"}, "GET", "b"),
            ({"Host": "other.test", "X-Canary": "2"}, "GET", "d1"),
        ]
        for headers, method, expected in cases:
            reply = yield fetch(port, "/", method=method, headers=headers)
            self.assertEqual(reply.json()["backend"], expected, (headers, method))


class HeaderTests(IntegrationTest):
    @inlineCallbacks
    def setUp(self):
        self.a = self.backend("a")
        self.service = self.balancer(
            f"""
            [pool:a]
            servers = {self.a.url}
            [route:all]
            pool = a
            """
        )
        self.port = self.port_of(self.service)
        yield None

    @inlineCallbacks
    def test_forwarded_headers_added(self):
        reply = yield fetch(
            self.port,
            "/x",
            headers={
                "Host": "shop.example.com:8080",
                "X-Forwarded-For": "6.6.6.6",
                "Forwarded": "for=6.6.6.6",
                "X-Forwarded-Proto": "https",
            },
        )
        seen = self.a.requests[-1]
        self.assertEqual(seen.header(b"Host"), [b"shop.example.com:8080"])
        self.assertEqual(seen.header(b"X-Forwarded-For"), [b"127.0.0.1"])
        self.assertEqual(seen.header(b"X-Forwarded-Proto"), [b"http"])
        self.assertEqual(seen.header(b"X-Forwarded-Host"), [b"shop.example.com:8080"])
        self.assertEqual(
            seen.header(b"Forwarded"),
            [b'for=127.0.0.1;host="shop.example.com:8080";proto=http'],
        )
        self.assertEqual(seen.header(b"Via"), [b"1.1 l7lb"])
        request_id = seen.header(b"X-Request-Id")
        self.assertEqual(len(request_id), 1)
        self.assertEqual(reply.header("X-Request-Id"), [request_id[0].decode()])
        self.assertEqual(reply.header("Via"), ["1.1 l7lb"])

    @inlineCallbacks
    def test_trusted_proxy_values_extended(self):
        service = self.balancer(
            f"""
            [lb]
            listen = tcp:0:interface=127.0.0.1
            access_log = off
            trusted_proxies = 127.0.0.0/8
            [pool:a]
            servers = {self.a.url}
            [route:all]
            pool = a
            """
        )
        yield fetch(
            self.port_of(service),
            "/",
            headers={
                "X-Forwarded-For": "203.0.113.9",
                "X-Forwarded-Proto": "https",
                "Forwarded": "for=203.0.113.9;proto=https",
                "Via": "1.1 edge",
            },
        )
        seen = self.a.requests[-1]
        self.assertEqual(seen.header(b"X-Forwarded-For"), [b"203.0.113.9, 127.0.0.1"])
        self.assertEqual(seen.header(b"X-Forwarded-Proto"), [b"https"])
        self.assertEqual(
            seen.header(b"Forwarded"),
            [
                b'for=203.0.113.9;proto=https, for=127.0.0.1;host="127.0.0.1:%d";proto=http'
                % self.port_of(service)
            ],
        )
        self.assertEqual(seen.header(b"Via"), [b"1.1 edge, 1.1 l7lb"])

    @inlineCallbacks
    def test_client_request_id_kept_when_well_formed(self):
        reply = yield fetch(self.port, "/", headers={"X-Request-Id": "abc-123:x.y_z"})
        self.assertEqual(
            self.a.requests[-1].header(b"X-Request-Id"), [b"abc-123:x.y_z"]
        )
        self.assertEqual(reply.header("X-Request-Id"), ["abc-123:x.y_z"])
        reply = yield fetch(self.port, "/", headers={"X-Request-Id": "bad id!"})
        replaced = self.a.requests[-1].header(b"X-Request-Id")
        self.assertNotEqual(replaced, [b"bad id!"])
        self.assertEqual(reply.header("X-Request-Id"), [replaced[0].decode()])

    @inlineCallbacks
    def test_hop_by_hop_headers_stripped_towards_backend(self):
        yield fetch(
            self.port,
            "/",
            headers={
                "Connection": "keep-alive, X-Secret",
                "X-Secret": "drop me",
                "Keep-Alive": "timeout=5",
                "TE": "trailers",
                "Trailer": "X-Foo",
                "Upgrade": "websocket",
                "Proxy-Authorization": "Basic Zm9vOmJhcg==",
                "Proxy-Connection": "keep-alive",
                "X-Kept": "yes",
            },
        )
        seen = self.a.requests[-1]
        names = {name.lower() for name, _ in seen.headers}
        for gone in (
            b"x-secret",
            b"keep-alive",
            b"te",
            b"trailer",
            b"upgrade",
            b"proxy-authorization",
            b"proxy-connection",
        ):
            self.assertNotIn(gone, names)
        self.assertEqual(seen.header(b"X-Kept"), [b"yes"])

    @inlineCallbacks
    def test_connection_cannot_remove_forwarding_headers(self):
        yield fetch(
            self.port,
            "/",
            headers={
                "Connection": "X-Forwarded-For, Forwarded, Via, X-Request-Id, Host"
            },
        )
        seen = self.a.requests[-1]
        for name in (
            b"X-Forwarded-For",
            b"Forwarded",
            b"Via",
            b"X-Request-Id",
            b"Host",
        ):
            self.assertEqual(len(seen.header(name)), 1, name)

    @inlineCallbacks
    def test_gzip_body_and_accept_encoding_untouched(self):
        reply = yield fetch(self.port, "/gzip", headers={"Accept-Encoding": "gzip, br"})
        self.assertEqual(self.a.requests[-1].header(b"Accept-Encoding"), [b"gzip, br"])
        self.assertEqual(reply.header("Content-Encoding"), ["gzip"])
        self.assertEqual(
            gzip.decompress(reply.body), b"hello, compressed world\n" * 100
        )
        plain = yield fetch(self.port, "/status/200")
        self.assertEqual(self.a.requests[-1].header(b"Accept-Encoding"), [b"identity"])
        self.assertEqual(plain.header("Content-Encoding"), [])

    @inlineCallbacks
    def test_status_reason_and_headers_relayed(self):
        reply = yield fetch(self.port, "/status/418")
        self.assertEqual((reply.status, reply.reason), (418, "I'm a teapot"))
        reply = yield fetch(self.port, "/status/503")
        self.assertEqual(reply.status, 503)
        self.assertEqual(reply.body, b"status\n")
        self.assertEqual(reply.header("Retry-After"), [])

    @inlineCallbacks
    def test_hop_by_hop_headers_stripped_towards_client(self):
        def serve(connection: socket.socket) -> None:
            connection.recv(65536)
            connection.sendall(
                b"HTTP/1.1 200 Fine Thanks\r\n"
                b"Content-Length: 2\r\n"
                b"Connection: X-Internal, keep-alive\r\n"
                b"X-Internal: secret\r\n"
                b"Keep-Alive: timeout=5\r\n"
                b"Proxy-Authenticate: Basic\r\n"
                b"X-Public: yes\r\n"
                b"\r\nok"
            )

        port = self.one_shot_backend(serve)
        service = self.one_pool(f"http://127.0.0.1:{port}")
        reply = yield fetch(self.port_of(service), "/")
        self.assertEqual(
            (reply.status, reply.reason, reply.body), (200, "Fine Thanks", b"ok")
        )
        names = {name.lower() for name, _ in reply.headers}
        self.assertNotIn("x-internal", names)
        self.assertNotIn("keep-alive", names)
        self.assertNotIn("proxy-authenticate", names)
        self.assertEqual(reply.header("X-Public"), ["yes"])
        self.assertEqual(reply.header("Content-Length"), ["2"])

    def one_shot_backend(self, serve):
        """
        A raw socket backend that serves one connection with C{serve}.
        """
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(CLIENT_TIMEOUT)
        self.addCleanup(listener.close)

        def accept_and_serve():
            connection, _ = listener.accept()
            with connection:
                serve(connection)

        served = threads.deferToThread(accept_and_serve)
        self.addCleanup(lambda: served)
        return listener.getsockname()[1]


class BodyTests(IntegrationTest):
    @inlineCallbacks
    def setUp(self):
        self.a = self.backend("a")
        self.service = self.one_pool(self.a.url)
        self.port = self.port_of(self.service)
        yield None

    @inlineCallbacks
    def test_one_mebibyte_upload_intact(self):
        body = pattern(1024 * 1024 + 17)
        reply = yield fetch(self.port, "/upload", method="POST", body=body)
        self.assertEqual(reply.json()["body_length"], len(body))
        self.assertEqual(reply.json()["body_sha256"], hashlib.sha256(body).hexdigest())

    @inlineCallbacks
    def test_upload_framed_once_with_content_length(self):
        body = b"x" * 5000

        def chunks():
            yield body[:1000]
            yield body[1000:]

        reply = yield fetch(
            self.port,
            "/chunked",
            method="PUT",
            body=chunks(),
            headers={"Transfer-Encoding": "chunked"},
        )
        self.assertEqual(reply.json()["body_length"], 5000)
        head = self.a.raw[-1].split(b"\r\n\r\n", 1)[0].lower()
        self.assertEqual(head.count(b"content-length:"), 1)
        self.assertIn(b"content-length: 5000", head)
        self.assertNotIn(b"transfer-encoding", head)

    @inlineCallbacks
    def test_fifty_mebibyte_download_streamed_intact(self):
        size = 50 * 1024 * 1024

        def download():
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            connection.request("GET", f"/stream/{size}")
            response = connection.getresponse()
            digest = hashlib.sha256()
            total = 0
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                total += len(chunk)
            connection.close()
            return response.status, total, digest.hexdigest()

        status, total, digest = yield threads.deferToThread(download)
        self.assertEqual((status, total), (200, size))
        self.assertEqual(digest, hashlib.sha256(pattern(size)).hexdigest())

    @inlineCallbacks
    def test_slow_client_pauses_backend(self):
        """
        A client that reads nothing makes the backend stop writing, instead
        of the balancer buffering the whole body.
        """
        size = 200 * 1024 * 1024
        client = socket.create_connection(("127.0.0.1", self.port))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.addCleanup(client.close)
        client.sendall(b"GET /stream/%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
        yield self.until(lambda: bool(self.a.streams))
        stream = self.a.streams[0]
        # Without back-pressure the balancer would read the whole body into
        # memory in well under a second; with it, the backend ends up paused
        # for good, having written no more than socket buffers hold.
        yield self.until(lambda: stream.settled(quiet=0.3), deadline=30)
        self.assertFalse(stream.stopped)
        self.assertLess(self.a.streamed, 32 * 1024 * 1024)
        client.close()
        yield self.until(lambda: self.a.lost > 0)


class KeepAliveTests(IntegrationTest):
    @inlineCallbacks
    def test_backend_connections_reused(self):
        a = self.backend("a")
        service = self.one_pool(a.url)
        session = Session(self.port_of(service))
        self.addCleanup(session.close)
        for _ in range(50):
            reply = yield session.fetch("/")
            self.assertEqual(reply.status, 200)
        self.assertEqual(len(a.requests), 50)
        self.assertLessEqual(a.connections, 2)


class ErrorTests(IntegrationTest):
    @inlineCallbacks
    def test_refused_backend_retried_on_another(self):
        a = self.backend("a")
        service = self.one_pool(f"http://127.0.0.1:{closed_port()}", a.url)
        port = self.port_of(service)
        for method in ("GET", "POST"):
            for _ in range(4):
                reply = yield fetch(
                    port, "/", method=method, body=b"" if method == "POST" else None
                )
                self.assertEqual(reply.status, 200, method)
        self.assertEqual(len(a.requests), 8)

    @inlineCallbacks
    def test_refused_everywhere_is_502(self):
        service = self.one_pool(
            f"http://127.0.0.1:{closed_port()}", f"http://127.0.0.1:{closed_port()}"
        )
        reply = yield fetch(self.port_of(service), "/")
        self.assertEqual(reply.status, 502)
        self.assertEqual(reply.body, b"502 Bad Gateway\n")
        self.assertNotIn(b"127.0.0.1", reply.body)

    @inlineCallbacks
    def test_reset_before_answer_retried_for_idempotent_only(self):
        resets = []

        def serve_reset(connection: socket.socket) -> None:
            connection.recv(65536)
            resets.append(1)
            connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )

        def reset_backend():
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            listener.settimeout(CLIENT_TIMEOUT)
            self.addCleanup(listener.close)

            def loop():
                for _ in range(3):
                    try:
                        connection, _ = listener.accept()
                    except OSError:
                        return
                    with connection:
                        serve_reset(connection)

            done = threads.deferToThread(loop)
            self.addCleanup(lambda: done)
            return listener.getsockname()[1]

        good = self.backend("good")
        bad_port = reset_backend()
        service = self.one_pool(f"http://127.0.0.1:{bad_port}", good.url)
        port = self.port_of(service)
        reply = yield fetch(port, "/first")
        self.assertEqual(reply.status, 200)
        self.assertEqual(len(resets), 1)
        # Round robin tries the resetting backend first each time.
        yield fetch(port, "/second")
        self.assertEqual(len(resets), 2)
        reply = yield fetch(port, "/post", method="POST", body=b"once")
        self.assertEqual(reply.status, 502)
        self.assertEqual(len(resets), 3)
        self.assertEqual([r.uri for r in good.requests], [b"/first", b"/second"])

    @inlineCallbacks
    def test_no_headers_within_response_timeout_is_504(self):
        a = self.backend("a")
        service = self.one_pool(a.url, pool_options="response_timeout = 300ms")
        reply = yield fetch(self.port_of(service), "/hang")
        self.assertEqual(reply.status, 504)
        self.assertEqual(reply.body, b"504 Gateway Timeout\n")
        yield self.until(lambda: a.lost == 1)

    @inlineCallbacks
    def test_backend_dying_mid_body_closes_client(self):
        a = self.backend("a")
        service = self.one_pool(a.url)
        port = self.port_of(service)
        for path in ("/cut/100000", "/cut-chunked"):
            raw = yield exchange(
                port, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode()
            )
            head, _, body = raw.partition(b"\r\n\r\n")
            self.assertEqual(status_of(raw), 200)
            if path == "/cut-chunked":
                self.assertIn(b"transfer-encoding: chunked", head.lower())
                self.assertFalse(body.endswith(b"0\r\n\r\n"))
            else:
                self.assertIn(b"Content-Length: 100000", head)
                self.assertLess(len(body), 100000)

    @inlineCallbacks
    def test_client_disconnect_aborts_backend_request(self):
        a = self.backend("a")
        service = self.one_pool(a.url)
        client = socket.create_connection(("127.0.0.1", self.port_of(service)))
        client.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        yield self.until(lambda: len(a.hanging) == 1)
        client.close()
        yield self.until(lambda: a.lost == 1)
        backend = service.pools["p"].backends[0]
        yield self.until(lambda: backend.inflight == 0)
