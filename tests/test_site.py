"""
Request limits and malformed requests, over real sockets: the statuses the
SPEC names, a readable body, and the connection closed.
"""

from __future__ import annotations

from twisted.internet.defer import inlineCallbacks

from tests.support import IntegrationTest, exchange, fetch, status_of


class LimitTests(IntegrationTest):
    @inlineCallbacks
    def setUp(self):
        self.a = self.backend("a")
        self.service = self.balancer(
            f"""
            [lb]
            listen = tcp:0:interface=127.0.0.1
            access_log = off
            max_header_size = 2KiB
            max_uri_length = 1KiB
            max_body_size = 10KiB
            [pool:a]
            servers = {self.a.url}
            [route:all]
            pool = a
            """
        )
        self.port = self.port_of(self.service)
        yield None

    def assertRefused(self, raw: bytes, status: int, reason: bytes) -> None:
        self.assertEqual(status_of(raw), status, raw[:200])
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 %d %s\r\n" % (status, reason)), head)
        self.assertIn(b"\r\nConnection: close", head)
        self.assertEqual(body, b"%d %s\n" % (status, reason))

    @inlineCallbacks
    def test_long_target_is_414(self):
        path = b"/" + b"a" * 1100
        raw = yield exchange(self.port, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
        self.assertRefused(raw, 414, b"URI Too Long")
        # Longer than any line l7lb would buffer: refused without reading it all.
        raw = yield exchange(
            self.port, b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n"
        )
        self.assertRefused(raw, 414, b"URI Too Long")
        ok = yield fetch(self.port, "/" + "a" * 1000)
        self.assertEqual(ok.status, 200)
        self.assertEqual(len(self.a.requests), 1)

    @inlineCallbacks
    def test_large_header_block_is_431(self):
        headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(25))
        raw = yield exchange(
            self.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
        )
        self.assertRefused(raw, 431, b"Request Header Fields Too Large")
        raw = yield exchange(
            self.port, b"GET / HTTP/1.1\r\nX-Big: " + b"v" * 50_000 + b"\r\n\r\n"
        )
        self.assertRefused(raw, 431, b"Request Header Fields Too Large")
        self.assertEqual(self.a.requests, [])

    @inlineCallbacks
    def test_large_body_is_413(self):
        raw = yield exchange(
            self.port,
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n"
            + b"b" * 20000,
        )
        self.assertRefused(raw, 413, b"Content Too Large")
        chunk = b"b" * 6000
        raw = yield exchange(
            self.port,
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 2
            + b"0\r\n\r\n",
        )
        self.assertRefused(raw, 413, b"Content Too Large")
        ok = yield fetch(self.port, "/", method="POST", body=b"b" * 10240)
        self.assertEqual(ok.status, 200)
        self.assertEqual(len(self.a.requests), 1)

    @inlineCallbacks
    def test_malformed_requests_are_400(self):
        for raw_request in (
            b"GARBAGE\r\n\r\n",
            b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ):
            raw = yield exchange(self.port, raw_request)
            self.assertRefused(raw, 400, b"Bad Request")
        self.assertEqual(self.a.requests, [])

    @inlineCallbacks
    def test_host_rules(self):
        raw = yield exchange(self.port, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        self.assertEqual(status_of(raw), 400)
        raw = yield exchange(
            self.port,
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
        )
        self.assertEqual(status_of(raw), 400)
        raw = yield exchange(self.port, b"GET / HTTP/1.0\r\n\r\n")
        self.assertEqual(status_of(raw), 200)
        self.assertEqual(
            self.a.requests[-1].header(b"Host"), [b"127.0.0.1:%d" % self.port]
        )

    @inlineCallbacks
    def test_absolute_form_routed_by_authority(self):
        raw = yield exchange(
            self.port,
            b"GET http://shop.example:8080/a/../b?q HTTP/1.1\r\nHost: ignored\r\nConnection: close\r\n\r\n",
        )
        self.assertEqual(status_of(raw), 200)
        seen = self.a.requests[-1]
        self.assertEqual(seen.uri, b"/b?q")
        self.assertEqual(seen.header(b"Host"), [b"shop.example:8080"])

    @inlineCallbacks
    def test_http10_closes_after_response(self):
        raw = yield exchange(self.port, b"GET /x HTTP/1.0\r\nHost: x\r\n\r\n")
        self.assertEqual(status_of(raw), 200)
        self.assertIn(b'"backend": "a"', raw)
        self.assertEqual(self.a.requests[-1].header(b"Via"), [b"1.0 l7lb"])
