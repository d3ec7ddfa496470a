"""
l7lb's HTTP/1.x server side: the strict parsing functions, the request body
buffer, and HTTP1Connection on a StringTransport with time on a Clock,
answered by a scripted balancer (or, for Expect, the real resource of
tests.twins).
"""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from l7lb import errors
from l7lb.chunked import ChunkedDecoder
from l7lb.config import LBConfig
from l7lb.fields import Fields
from l7lb.http1 import (
    BODY_IN_MEMORY,
    CLOSE_GRACE,
    LINGER,
    PIPELINE_BUFFER,
    BadRequest,
    BodyBuffer,
    body_framing,
    parse_fields,
    parse_request_line,
)
from l7lb.resource import Refusal
from l7lb.site import BalancerSite
from tests.twins import TICK, Hanging, MemoryBalancer

LIMITS = LBConfig()
PEER = IPv4Address("TCP", "192.0.2.1", 5555)


class ParseRequestLineTests(SynchronousTestCase):
    def refused(self, line: bytes, limits: LBConfig = LIMITS) -> int:
        with self.assertRaises(BadRequest, msg=repr(line)) as caught:
            parse_request_line(line, limits)
        return caught.exception.status

    def test_valid(self):
        for line, parts in [
            (b"GET /x?y=1 HTTP/1.1", (b"GET", b"/x?y=1", b"HTTP/1.1")),
            (b"POST / HTTP/1.0", (b"POST", b"/", b"HTTP/1.0")),
            (b"GET http://h:8/p HTTP/1.1", (b"GET", b"http://h:8/p", b"HTTP/1.1")),
            (b"OPTIONS * HTTP/1.1", (b"OPTIONS", b"*", b"HTTP/1.1")),
            (b"CONNECT h:443 HTTP/1.1", (b"CONNECT", b"h:443", b"HTTP/1.1")),
            (b"M-SEARCH * HTTP/1.1", (b"M-SEARCH", b"*", b"HTTP/1.1")),
        ]:
            self.assertEqual(parse_request_line(line, LIMITS), parts)

    def test_method_case_kept(self):
        self.assertEqual(parse_request_line(b"get / HTTP/1.1", LIMITS)[0], b"get")

    def test_not_three_parts(self):
        for line in (
            b"GET /x",
            b"GET",
            b"",
            b"GET  /x HTTP/1.1",
            b"GET /x HTTP/1.1 ",
            b" GET /x HTTP/1.1",
            b"GET /x y HTTP/1.1",
            b"GET\t/x\tHTTP/1.1",
        ):
            self.assertEqual(self.refused(line), 400)

    def test_versions(self):
        for version in (
            b"HTTP/2.0",
            b"HTTP/1.2",
            b"HTTP/0.9",
            b"http/1.1",
            b"HTTP/1.10",
            b"HTTP/1",
            b"HTTPS/1.1",
        ):
            self.assertEqual(self.refused(b"GET / " + version), 400)

    def test_malformed_methods(self):
        for method in (b"G(T", b"GE/T", b"G\x00T", b"G\xffT", b"GET:", b'"GET"'):
            self.assertEqual(self.refused(method + b" / HTTP/1.1"), 400)

    def test_tab_in_the_target(self):
        self.assertEqual(self.refused(b"GET /a\tb HTTP/1.1"), 400)

    def test_target_length(self):
        limits = LBConfig(max_uri_length=10)
        self.assertEqual(
            parse_request_line(b"GET /123456789 HTTP/1.1", limits)[1], b"/123456789"
        )
        self.assertEqual(self.refused(b"GET /1234567890 HTTP/1.1", limits), 414)

    def test_request_notes_a_three_part_line(self):
        """
        For the access log: what the line held, even when it is refused.
        """
        request = SimpleNamespace(method=b"-", uri=b"-", version=b"-")
        with self.assertRaises(BadRequest):
            parse_request_line(b"GET /x HTTP/9.9", LIMITS, request)
        self.assertEqual(
            (request.method, request.uri, request.version),
            (b"GET", b"/x", b"HTTP/9.9"),
        )

    def test_request_untouched_by_a_shapeless_line(self):
        request = SimpleNamespace(method=b"-", uri=b"-", version=b"-")
        with self.assertRaises(BadRequest):
            parse_request_line(b"GET /x", LIMITS, request)
        self.assertEqual((request.method, request.uri, request.version), (b"-",) * 3)


class ParseFieldsTests(SynchronousTestCase):
    def refused(self, lines: list[bytes], limits: LBConfig = LIMITS) -> int:
        with self.assertRaises(BadRequest, msg=repr(lines)) as caught:
            parse_fields(lines, limits)
        return caught.exception.status

    def test_order_spelling_and_whitespace(self):
        fields = parse_fields(
            [b"Host: h", b"x-A:1", b"X-a: \t two words \t", b"Empty:", b"Tab:\ta\tb"],
            LIMITS,
        )
        self.assertEqual(
            list(fields),
            [
                (b"Host", b"h"),
                (b"x-A", b"1"),
                (b"X-a", b"two words"),
                (b"Empty", b""),
                (b"Tab", b"a\tb"),
            ],
        )
        self.assertEqual(fields.get(b"x-a"), [b"1", b"two words"])

    def test_no_fields(self):
        self.assertEqual(len(parse_fields([], LIMITS)), 0)

    def test_value_keeps_colons(self):
        fields = parse_fields([b"Host: h:8080"], LIMITS)
        self.assertEqual(fields.first(b"host"), b"h:8080")

    def test_malformed_lines(self):
        for line in (
            b"No-Colon",
            b": no-name",
            b"Space Before : colon",
            b"Host : h",
            b"Host\t: h",
            b" folded continuation",
            b"\tfolded continuation",
            b"Na(me: v",
            b"N\xe4me: v",
        ):
            self.assertEqual(self.refused([b"Host: h", line]), 400)

    def test_number_of_fields(self):
        limits = LBConfig(max_headers=3)
        self.assertEqual(len(parse_fields([b"A: 1", b"B: 2", b"C: 3"], limits)), 3)
        self.assertEqual(
            self.refused([b"A: 1", b"B: 2", b"C: 3", b"D: 4"], limits), 431
        )

    def test_size_of_fields(self):
        """
        The size counts each line with its CRLF.
        """
        limits = LBConfig(max_header_size=20)
        lines = [b"A: 12345", b"B: 1234"]  # 10 + 9 = 19
        self.assertEqual(len(parse_fields(lines, limits)), 2)
        self.assertEqual(len(parse_fields([b"A: 12345", b"B: 12345"], limits)), 2)
        self.assertEqual(self.refused([b"A: 12345", b"B: 123456"], limits), 431)


class BodyFramingTests(SynchronousTestCase):
    def framing(self, pairs, version=b"HTTP/1.1", limits=LIMITS):
        return body_framing(Fields.of(pairs), version, limits)

    def refused(self, pairs, version=b"HTTP/1.1", limits=LIMITS) -> int:
        with self.assertRaises(BadRequest, msg=repr(pairs)) as caught:
            self.framing(pairs, version, limits)
        return caught.exception.status

    def test_no_body(self):
        self.assertEqual(self.framing([(b"Host", b"h")]), (0, False))
        self.assertEqual(self.framing([], b"HTTP/1.0"), (0, False))

    def test_content_length(self):
        self.assertEqual(self.framing([(b"Content-Length", b"10")]), (10, False))
        self.assertEqual(self.framing([(b"content-length", b"0")]), (0, False))
        self.assertEqual(self.framing([(b"CONTENT-LENGTH", b"007")]), (7, False))
        self.assertEqual(
            self.framing([(b"Content-Length", b"3")], b"HTTP/1.0"), (3, False)
        )

    def test_malformed_content_length(self):
        for value in (
            b"",
            b"-1",
            b"+1",
            b" 1",
            b"1 ",
            b"0x10",
            b"1.0",
            b"1,1",
            b"5, 5",
            b"1e3",
            b"1" * 19,
        ):
            self.assertEqual(self.refused([(b"Content-Length", value)]), 400, value)

    def test_repeated_content_length(self):
        pairs = [(b"Content-Length", b"5"), (b"content-length", b"5")]
        self.assertEqual(self.refused(pairs), 400)

    def test_content_length_over_the_body_limit(self):
        limits = LBConfig(max_body_size=100)
        self.assertEqual(
            self.framing([(b"Content-Length", b"100")], limits=limits), (100, False)
        )
        self.assertEqual(
            self.refused([(b"Content-Length", b"101")], limits=limits), 413
        )

    def test_chunked(self):
        self.assertEqual(self.framing([(b"Transfer-Encoding", b"chunked")]), (0, True))
        self.assertEqual(self.framing([(b"transfer-encoding", b"Chunked")]), (0, True))

    def test_both_content_length_and_transfer_encoding(self):
        for pairs in (
            [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
            [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")],
        ):
            self.assertEqual(self.refused(pairs), 400)

    def test_transfer_encodings_other_than_chunked(self):
        for values in (
            [b"gzip"],
            [b"identity"],
            [b"gzip, chunked"],
            [b"chunked, chunked"],
            [b"chunked", b"chunked"],
            [b"gzip", b"chunked"],
            [b"chunked;q=1"],
            [b""],
        ):
            pairs = [(b"Transfer-Encoding", value) for value in values]
            self.assertEqual(self.refused(pairs), 400, values)

    def test_chunked_in_http_1_0(self):
        self.assertEqual(
            self.refused([(b"Transfer-Encoding", b"chunked")], b"HTTP/1.0"), 400
        )


class BodyBufferTests(SynchronousTestCase):
    def test_empty(self):
        self.assertEqual(BodyBuffer().result(), b"")
        self.assertEqual(BodyBuffer().size, 0)

    def test_small_body_in_memory(self):
        body = BodyBuffer()
        body.append(b"abc")
        body.append(b"def")
        self.assertEqual(body.result(), b"abcdef")
        self.assertEqual(body.size, 6)

    def test_up_to_the_limit_in_memory(self):
        body = BodyBuffer()
        body.append(b"x" * (BODY_IN_MEMORY - 1))
        body.append(b"y")
        self.assertEqual(body.result(), b"x" * (BODY_IN_MEMORY - 1) + b"y")

    def test_past_the_limit_in_a_file(self):
        body = BodyBuffer()
        body.append(b"a" * 1000)
        body.append(b"b" * BODY_IN_MEMORY)
        body.append(b"c" * 10)  # after the spill, straight to the file
        result = body.result()
        self.assertNotIsInstance(result, bytes)
        self.addCleanup(result.close)
        self.assertEqual(body.size, 1010 + BODY_IN_MEMORY)
        self.assertEqual(result.read(), b"a" * 1000 + b"b" * BODY_IN_MEMORY + b"c" * 10)
        # Read from the start each time it is asked for (a retry replays it).
        result.read()
        self.assertEqual(len(body.result().read()), 1010 + BODY_IN_MEMORY)


class RecordingLog:
    """
    The access log's seam: what was logged, and refusals without a request.
    """

    enabled = True

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes, int, str]] = []
        self.refusals: list[tuple[str, int]] = []

    def log(self, request) -> None:
        self.requests.append((request.method, request.uri, request.code, request.note))

    def log_refusal(self, host: str, status: int) -> None:
        self.refusals.append((host, status))


class Script:
    """
    A balancer that holds every request until the test answers it, or
    answers at once when C{auto} is set; C{verdict} is what it admits a
    request with (a L{Refusal} refuses it).
    """

    def __init__(self) -> None:
        self.requests: list = []
        self.events: list[tuple[str, bytes]] = []
        self.verdict = None
        self.auto = False

    def admit(self, request, method, uri):
        self.events.append(("admit", uri))
        request.admission = self.verdict or "admitted"
        return request.admission

    def render(self, request) -> None:
        self.events.append(("render", request.uri))
        self.requests.append(request)
        if self.auto:
            answer(request, b"auto " + request.uri)


def answer(request, body: bytes = b"ok", length: bool = True, code: int = 200) -> None:
    request.start_response(
        code,
        b"OK",
        [(b"X-Uri", request.uri)],
        b"%d" % len(body) if length else None,
    )
    request.write(body)
    request.finish()


def response(uri: bytes, body: bytes = b"ok", close: bool = False) -> bytes:
    """
    What L{answer} puts on the wire for a request of an HTTP/1.1 client.
    """
    return b"HTTP/1.1 200 OK\r\nX-Uri: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
        uri,
        len(body),
        b"Connection: close\r\n" if close else b"",
        body,
    )


class Transport(StringTransport):
    """
    A StringTransport that can half-close, as TCP can, and notes each write
    and an abort.
    """

    write_closed = False
    aborted = False

    def __init__(self) -> None:
        super().__init__(peerAddress=PEER)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class ConnectionTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.script = Script()
        self.log = RecordingLog()

    def connect(self, transport=None, timeout: float = 60.0, **limits):
        site = self.site = BalancerSite(
            self.script, LBConfig(**limits), self.log, self.clock, timeout
        )
        channel = site.buildProtocol(PEER)
        transport = transport if transport is not None else Transport()
        channel.makeConnection(transport)
        return channel, transport

    def uris(self) -> list[bytes]:
        return [request.uri for request in self.script.requests]


def get(uri: bytes, version: bytes = b"HTTP/1.1", extra: bytes = b"") -> bytes:
    return b"GET %s %s\r\nHost: h\r\n%s\r\n" % (uri, version, extra)


class RequestReadingTests(ConnectionTestCase):
    def test_request_dispatched_as_sent(self):
        channel, _ = self.connect()
        channel.dataReceived(
            b"GET /x?q=1 HTTP/1.1\r\nHost: h\r\nX-Custom:  v \r\nx-custom: w\r\n\r\n"
        )
        [request] = self.script.requests
        self.assertEqual(
            (request.method, request.uri, request.version),
            (b"GET", b"/x?q=1", b"HTTP/1.1"),
        )
        self.assertEqual(
            list(request.headers),
            [(b"Host", b"h"), (b"X-Custom", b"v"), (b"x-custom", b"w")],
        )
        self.assertEqual(request.client_ip, "192.0.2.1")
        self.assertIsNone(request.body)

    def test_head_in_pieces(self):
        channel, _ = self.connect()
        data = get(b"/slow")
        for i in range(len(data) - 1):
            channel.dataReceived(data[i : i + 1])
        self.assertEqual(self.script.requests, [])
        channel.dataReceived(data[-1:])
        self.assertEqual(self.uris(), [b"/slow"])

    def test_empty_lines_before_the_request_line(self):
        channel, _ = self.connect()
        channel.dataReceived(b"\r\n\r\n")
        channel.dataReceived(b"\r\n" + get(b"/after-blank"))
        self.assertEqual(self.uris(), [b"/after-blank"])

    def test_body_read_whole_before_dispatch(self):
        channel, _ = self.connect()
        channel.dataReceived(
            b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n"
        )
        channel.dataReceived(b"01234")
        self.assertEqual(self.script.requests, [])
        channel.dataReceived(b"56789")
        [request] = self.script.requests
        self.assertEqual((request.body, request.body_size), (b"0123456789", 10))

    def test_chunked_body_decoded(self):
        channel, _ = self.connect()
        channel.dataReceived(
            b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nabc\r\n"
        )
        self.assertEqual(self.script.requests, [])
        channel.dataReceived(b"2\r\nde\r\n0\r\nTrailer: x\r\n\r\n" + get(b"/next"))
        [request] = self.script.requests
        self.assertEqual((request.body, request.body_size), (b"abcde", 5))
        answer(request)
        self.assertEqual(self.uris(), [b"/c", b"/next"])

    def test_large_body_in_a_file(self):
        channel, _ = self.connect()
        content = bytes(range(256)) * (BODY_IN_MEMORY // 256 + 10)
        channel.dataReceived(
            b"PUT /big HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(content)
        )
        for i in range(0, len(content), 5000):
            channel.dataReceived(content[i : i + 5000])
        [request] = self.script.requests
        self.assertNotIsInstance(request.body, bytes)
        self.addCleanup(request.body.close)
        self.assertEqual(request.body.read(), content)
        self.assertEqual(request.body_size, len(content))

    def test_chunked_body_over_the_limit(self):
        channel, transport = self.connect(max_body_size=10)
        channel.dataReceived(
            b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"8\r\n01234567\r\n"
        )
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"8\r\n01234567\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertEqual(self.script.requests, [])

    def test_content_length_over_the_limit(self):
        channel, transport = self.connect(max_body_size=10)
        channel.dataReceived(
            b"POST /c HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n01234567890"
        )
        self.assertEqual(transport.value(), errors.raw_response(413))

    def test_smuggling_shapes_refused(self):
        for head in (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
            b"Transfer-Encoding: identity\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\n folded: value\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\nX-Smuggled: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\rX-Smuggled: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\x00\r\n\r\n",
            b"GET /\x00 HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: \x7f\r\n\r\n",
        ):
            channel, transport = self.connect()
            channel.dataReceived(head + b"abc")
            self.assertEqual(transport.value(), errors.raw_response(400), head)
            self.assertEqual(self.script.requests, [], head)

    def test_long_request_line_refused_before_its_end(self):
        channel, transport = self.connect(max_uri_length=100)
        channel.dataReceived(b"GET /" + b"a" * 200)
        self.assertEqual(transport.value(), errors.raw_response(414))

    def test_large_head_refused_before_its_end(self):
        channel, transport = self.connect(max_header_size=100)
        channel.dataReceived(b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 200)
        self.assertEqual(transport.value(), errors.raw_response(431))

    def test_connection_lost_mid_body(self):
        channel, _ = self.connect()
        channel.dataReceived(
            b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n01"
        )
        channel.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.script.requests, [])
        self.assertEqual(self.log.requests, [(b"POST", b"/p", 0, "client closed")])
        self.assertEqual(self.site.requests_in_flight, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PipeliningTests(ConnectionTestCase):
    def test_answered_in_order_one_at_a_time(self):
        channel, transport = self.connect()
        channel.dataReceived(get(b"/1") + get(b"/2") + get(b"/3"))
        self.assertEqual(self.uris(), [b"/1"])
        first = self.script.requests[0]
        first.start_response(200, b"OK", [(b"X-Uri", b"/1")], b"2")
        first.write(b"ok")
        # Not finished: the next request waits.
        self.assertEqual(self.uris(), [b"/1"])
        first.finish()
        self.assertEqual(self.uris(), [b"/1", b"/2"])
        answer(self.script.requests[1])
        self.assertEqual(self.uris(), [b"/1", b"/2", b"/3"])
        answer(self.script.requests[2])
        self.assertEqual(
            transport.value(), response(b"/1") + response(b"/2") + response(b"/3")
        )
        self.assertFalse(transport.disconnecting)

    def test_answered_during_dispatch(self):
        """
        A balancer that answers from C{render} itself: every pipelined request
        is answered, in order, within the one read.
        """
        self.script.auto = True
        channel, transport = self.connect()
        channel.dataReceived(get(b"/1") + get(b"/2") + get(b"/3")[:-1])
        self.assertEqual(self.uris(), [b"/1", b"/2"])
        channel.dataReceived(b"\n")
        self.assertEqual(
            transport.value(),
            response(b"/1", b"auto /1")
            + response(b"/2", b"auto /2")
            + response(b"/3", b"auto /3"),
        )

    def test_read_ahead_pauses_past_the_buffer(self):
        channel, transport = self.connect()
        channel.dataReceived(get(b"/first"))
        queued = b"".join(get(b"/%d" % i) for i in range(PIPELINE_BUFFER // 20))
        self.assertGreater(len(queued), PIPELINE_BUFFER + 1)
        channel.dataReceived(queued[:PIPELINE_BUFFER])
        self.assertEqual(transport.producerState, "producing")
        channel.dataReceived(queued[PIPELINE_BUFFER : PIPELINE_BUFFER + 1])
        self.assertEqual(transport.producerState, "paused")
        answer(self.script.requests[0])
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(self.uris(), [b"/first", b"/0"])
        channel.dataReceived(queued[PIPELINE_BUFFER + 1 :])
        answered = 1
        while answered < len(self.script.requests):
            answer(self.script.requests[answered])
            answered += 1
        # Every queued request was read and answered, in order.
        self.assertEqual(len(self.script.requests), 1 + PIPELINE_BUFFER // 20)
        self.assertEqual(
            self.uris()[1:], [b"/%d" % i for i in range(PIPELINE_BUFFER // 20)]
        )

    def test_requests_after_connection_close_ignored(self):
        channel, transport = self.connect()
        channel.dataReceived(get(b"/1", extra=b"Connection: close\r\n") + get(b"/2"))
        channel.dataReceived(get(b"/3"))
        answer(self.script.requests[0])
        self.assertEqual(self.uris(), [b"/1"])
        self.assertEqual(transport.value(), response(b"/1", close=True))
        self.assertTrue(transport.disconnecting)

    def test_pipelined_refusal_after_an_answer(self):
        channel, transport = self.connect()
        channel.dataReceived(get(b"/1") + b"BAD\r\n\r\n")
        answer(self.script.requests[0])
        self.assertEqual(transport.value(), response(b"/1") + errors.raw_response(400))
        self.assertTrue(transport.write_closed)


class ResponseWritingTests(ConnectionTestCase):
    def test_length_framed_response_in_one_write(self):
        channel, transport = self.connect()
        channel.dataReceived(get(b"/one"))
        request = self.script.requests[0]
        request.start_response(200, b"OK", [(b"X-Uri", b"/one")], b"2")
        # The head waits for the body's first bytes.
        self.assertEqual(transport.value(), b"")
        request.write(b"ok")
        request.finish()
        self.assertEqual(transport.writes, [response(b"/one")])

    def test_bodiless_response_written_at_the_end(self):
        channel, transport = self.connect()
        channel.dataReceived(get(b"/e"))
        request = self.script.requests[0]
        request.start_response(204, b"No Content", [(b"X-A", b"1")], None, True)
        self.assertEqual(transport.value(), b"")
        request.finish()
        self.assertEqual(
            transport.writes, [b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n"]
        )
        self.assertFalse(transport.disconnecting)

    def test_chunked_to_http_1_1(self):
        channel, transport = self.connect()
        channel.dataReceived(get(b"/c"))
        request = self.script.requests[0]
        request.start_response(200, b"OK", [(b"X-A", b"1")])
        request.write(b"abc")
        request.write(b"0123456789abcdef!")
        request.finish()
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertEqual(
            head, b"HTTP/1.1 200 OK\r\nX-A: 1\r\nTransfer-Encoding: chunked"
        )
        self.assertEqual(body, b"3\r\nabc\r\n11\r\n0123456789abcdef!\r\n0\r\n\r\n")
        decoded: list[bytes] = []
        self.assertEqual(ChunkedDecoder().feed(body, decoded.append), b"")
        self.assertEqual(b"".join(decoded), b"abc0123456789abcdef!")
        self.assertFalse(transport.disconnecting)
        # The connection goes on.
        channel.dataReceived(get(b"/again"))
        self.assertEqual(self.uris(), [b"/c", b"/again"])

    def test_close_delimited_to_http_1_0(self):
        channel, transport = self.connect()
        channel.dataReceived(get(b"/old", b"HTTP/1.0"))
        request = self.script.requests[0]
        self.assertFalse(channel.persistent)
        request.start_response(200, b"OK", [(b"X-A", b"1")])
        request.write(b"abc")
        request.write(b"de")
        self.assertFalse(transport.disconnecting)
        request.finish()
        self.assertEqual(
            transport.value(),
            b"HTTP/1.1 200 OK\r\nX-A: 1\r\nConnection: close\r\n\r\nabcde",
        )
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.aborted)

    def test_http_1_0_closes_after_a_length_framed_response(self):
        channel, transport = self.connect()
        channel.dataReceived(
            get(b"/1", b"HTTP/1.0", b"Connection: keep-alive\r\n") + get(b"/2")
        )
        answer(self.script.requests[0])
        self.assertEqual(transport.value(), response(b"/1", close=True))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.uris(), [b"/1"])

    def test_http_1_1_connection_close(self):
        channel, transport = self.connect()
        channel.dataReceived(get(b"/1", extra=b"Connection: Keep-Alive, CLOSE\r\n"))
        answer(self.script.requests[0])
        self.assertEqual(transport.value(), response(b"/1", close=True))
        self.assertTrue(transport.disconnecting)

    def test_head_gets_no_body(self):
        channel, transport = self.connect()
        channel.dataReceived(b"HEAD /h HTTP/1.1\r\nHost: h\r\n\r\n")
        answer(self.script.requests[0], b"hello")
        self.assertEqual(
            transport.value(),
            b"HTTP/1.1 200 OK\r\nX-Uri: /h\r\nContent-Length: 5\r\n\r\n",
        )
        # Persistent: the next request is read.
        channel.dataReceived(get(b"/next"))
        self.assertEqual(self.uris(), [b"/h", b"/next"])

    def test_head_without_a_length_is_not_chunked(self):
        channel, transport = self.connect()
        channel.dataReceived(b"HEAD /h HTTP/1.1\r\nHost: h\r\n\r\n")
        answer(self.script.requests[0], b"hello", length=False)
        self.assertEqual(transport.value(), b"HTTP/1.1 200 OK\r\nX-Uri: /h\r\n\r\n")
        self.assertFalse(transport.disconnecting)

    def test_head_to_http_1_0(self):
        channel, transport = self.connect()
        channel.dataReceived(b"HEAD /h HTTP/1.0\r\n\r\n")
        answer(self.script.requests[0], b"hello", length=False)
        self.assertEqual(
            transport.value(),
            b"HTTP/1.1 200 OK\r\nX-Uri: /h\r\nConnection: close\r\n\r\n",
        )
        self.assertTrue(transport.disconnecting)

    def test_error_400_closes_the_connection(self):
        channel, transport = self.connect()
        channel.dataReceived(get(b"/1") + get(b"/2"))
        self.script.requests[0].respond_error(400)
        value = transport.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 400 Bad Request\r\n"), value)
        self.assertIn(b"\r\nConnection: close\r\n", value)
        self.assertTrue(value.endswith(errors.body(400)), value)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.uris(), [b"/1"])

    def test_error_404_keeps_the_connection(self):
        channel, transport = self.connect()
        channel.dataReceived(get(b"/1") + get(b"/2"))
        self.script.requests[0].respond_error(404)
        self.assertNotIn(b"Connection: close", transport.value())
        self.assertEqual(self.uris(), [b"/1", b"/2"])

    def test_abort_of_a_delimited_body_closes(self):
        """
        A cut chunked body is visible as such: a plain close will do.
        """
        channel, transport = self.connect()
        channel.dataReceived(get(b"/c"))
        request = self.script.requests[0]
        request.start_response(200, b"OK", [])
        request.write(b"part")
        request.abort("backend failed mid-body")
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.aborted)
        self.assertEqual(
            self.log.requests, [(b"GET", b"/c", 200, "backend failed mid-body")]
        )

    def test_abort_of_a_close_delimited_body_resets(self):
        """
        To an HTTP/1.0 client a close would make a cut body look whole.
        """
        channel, transport = self.connect()
        channel.dataReceived(get(b"/c", b"HTTP/1.0"))
        request = self.script.requests[0]
        request.start_response(200, b"OK", [])
        request.write(b"part")
        request.abort("backend failed mid-body")
        self.assertTrue(transport.aborted)

    def test_abort_before_the_head_went_out_resets(self):
        channel, transport = self.connect()
        channel.dataReceived(get(b"/c"))
        request = self.script.requests[0]
        request.start_response(200, b"OK", [], b"10")
        request.abort("gone")
        self.assertTrue(transport.aborted)
        self.assertEqual(transport.value(), b"")

    def test_close_when_done(self):
        channel, transport = self.connect()
        channel.dataReceived(get(b"/1"))
        channel.close_when_done()
        self.assertFalse(transport.disconnecting)
        answer(self.script.requests[0])
        self.assertEqual(transport.value(), response(b"/1", close=True))
        self.assertTrue(transport.disconnecting)

    def test_close_when_done_while_idle(self):
        channel, transport = self.connect()
        self.assertTrue(channel.idle)
        channel.close_when_done()
        self.assertTrue(transport.disconnecting)


class DeadlineTests(ConnectionTestCase):
    def test_header_deadline_from_the_first_byte(self):
        channel, transport = self.connect(client_header_timeout=2.0)
        self.clock.advance(30)  # idle, within the keep-alive timeout
        channel.dataReceived(b"G")
        self.clock.advance(1.9)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.1 + TICK)
        self.assertEqual(transport.value(), errors.raw_response(408))
        self.assertEqual(self.log.refusals, [("192.0.2.1", 408)])

    def test_header_deadline_not_reset_by_trickling_bytes(self):
        channel, transport = self.connect(client_header_timeout=2.0)
        data = get(b"/slow")
        # A byte every 0.45 s, each well within the timeout: the head as a
        # whole is not.
        for i in range(4):
            channel.dataReceived(data[i : i + 1])
            self.clock.advance(0.45)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.2 + TICK)
        self.assertEqual(transport.value(), errors.raw_response(408))
        channel.dataReceived(data[4:])
        self.assertEqual(self.script.requests, [])

    def test_header_deadline_of_a_pipelined_request_starts_with_it(self):
        channel, transport = self.connect(client_header_timeout=2.0)
        channel.dataReceived(get(b"/1") + b"GET /2 HTTP/1.1\r\n")
        self.clock.advance(10)
        answer(self.script.requests[0])
        self.clock.advance(1.5)
        self.assertEqual(transport.value(), response(b"/1"))
        self.clock.advance(0.5 + TICK)
        self.assertEqual(transport.value(), response(b"/1") + errors.raw_response(408))

    def test_body_deadline(self):
        channel, transport = self.connect(client_body_timeout=5.0)
        channel.dataReceived(
            b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n"
        )
        for _ in range(4):
            self.clock.advance(1.2)
            channel.dataReceived(b"x")
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.2 + TICK)
        self.assertEqual(transport.value(), errors.raw_response(408))
        self.assertEqual(self.log.requests, [(b"POST", b"/b", 408, "refused")])
        self.assertEqual(self.script.requests, [])

    def test_no_deadline_while_the_balancer_answers(self):
        channel, transport = self.connect(
            timeout=5.0, client_header_timeout=1.0, client_body_timeout=1.0
        )
        channel.dataReceived(get(b"/long"))
        self.clock.advance(100)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)
        answer(self.script.requests[0])
        self.assertEqual(transport.value(), response(b"/long"))

    def test_idle_new_connection_closed_after_the_keep_alive_timeout(self):
        _, transport = self.connect(timeout=60.0)
        self.clock.advance(59.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1 + TICK)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.write_closed)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.log.refusals, [])

    def test_keep_alive_timeout_runs_from_the_last_answer(self):
        channel, transport = self.connect(timeout=60.0)
        self.clock.advance(50)
        channel.dataReceived(get(b"/1"))
        self.clock.advance(20)
        answer(self.script.requests[0])
        self.clock.advance(59.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1 + TICK)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), response(b"/1"))

    def test_no_timer_left_after_close(self):
        channel, _ = self.connect()
        channel.dataReceived(get(b"/1"))
        answer(self.script.requests[0])
        channel.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RefusalTests(ConnectionTestCase):
    def test_refusal_then_lingering_close(self):
        channel, transport = self.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: x\r\n\r\n")
        self.assertEqual(transport.value(), errors.raw_response(400))
        # The sending side is shut; the connection stays open for reading.
        self.assertTrue(transport.write_closed)
        self.assertFalse(transport.disconnecting)
        # What the client still sends is read and dropped.
        channel.dataReceived(b"body bytes" * 1000 + get(b"/after"))
        self.assertEqual(transport.value(), errors.raw_response(400))
        self.assertEqual(self.script.requests, [])
        self.clock.advance(LINGER - 0.1)
        self.assertFalse(transport.aborted)
        self.clock.advance(0.1 + TICK)
        self.assertTrue(transport.aborted)

    def test_refusal_without_half_close(self):
        """
        A transport that cannot half-close (TLS) is closed at once.
        """
        channel, transport = self.connect(StringTransport(peerAddress=PEER))
        channel.dataReceived(b"BAD\r\n\r\n")
        self.assertEqual(transport.value(), errors.raw_response(400))
        self.assertTrue(transport.disconnecting)

    def test_lingering_connection_closed_by_the_client(self):
        channel, transport = self.connect()
        channel.dataReceived(b"BAD\r\n\r\n")
        channel.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(transport.aborted)

    def test_refused_request_logged_once(self):
        channel, _ = self.connect()
        channel.dataReceived(
            b"GET /x HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n"
        )
        self.clock.advance(LINGER + TICK)
        channel.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.log.requests, [(b"GET", b"/x", 400, "refused")])
        self.assertEqual(self.log.refusals, [])
        self.assertEqual(self.site.requests_in_flight, 0)
        self.assertEqual(sum(self.site.metrics.requests.values()), 1)

    def test_refusal_without_a_request_logged_once(self):
        channel, _ = self.connect(max_uri_length=10)
        channel.dataReceived(b"GET /" + b"a" * 100)
        channel.dataReceived(b"a" * 100)
        channel.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.log.refusals, [("192.0.2.1", 414)])
        self.assertEqual(self.log.requests, [])


class ExpectContinueTests(ConnectionTestCase):
    HEAD = (
        b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )

    def test_continue_after_admission(self):
        channel, transport = self.connect()
        written_at_admission = []
        admit = self.script.admit

        def admit_and_look(request, method, uri):
            written_at_admission.append(transport.value())
            return admit(request, method, uri)

        self.script.admit = admit_and_look
        channel.dataReceived(self.HEAD)
        self.assertEqual(written_at_admission, [b""])
        self.assertEqual(self.script.events, [("admit", b"/upload")])
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        channel.dataReceived(b"hello")
        [request] = self.script.requests
        self.assertEqual(request.body, b"hello")
        self.assertEqual(request.admission, "admitted")
        answer(request)
        self.assertEqual(
            transport.value(),
            b"HTTP/1.1 100 Continue\r\n\r\n" + response(b"/upload"),
        )

    def test_refused_without_continue(self):
        self.script.verdict = Refusal(403)
        channel, transport = self.connect()
        channel.dataReceived(self.HEAD)
        self.assertEqual(transport.value(), errors.raw_response(403))
        self.assertTrue(transport.write_closed)
        channel.dataReceived(b"hello")
        self.assertEqual(transport.value(), errors.raw_response(403))
        self.assertEqual(self.script.requests, [])
        self.assertEqual(self.log.requests, [(b"POST", b"/upload", 403, "refused")])
        channel.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(len(self.log.requests), 1)

    def test_refusal_headers_kept(self):
        self.script.verdict = Refusal(429, {b"Retry-After": b"7"})
        channel, transport = self.connect()
        channel.dataReceived(self.HEAD)
        self.assertEqual(
            transport.value(), errors.raw_response(429, {b"Retry-After": b"7"})
        )

    def test_no_continue_without_a_body(self):
        channel, transport = self.connect()
        channel.dataReceived(
            b"GET /g HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\r\n"
        )
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.uris(), [b"/g"])

    def test_no_continue_to_http_1_0(self):
        channel, transport = self.connect()
        channel.dataReceived(
            b"POST /u HTTP/1.0\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        )
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.script.events, [])
        channel.dataReceived(b"hi")
        self.assertEqual(self.uris(), [b"/u"])

    def test_other_expectations_ignored(self):
        channel, transport = self.connect()
        channel.dataReceived(
            b"POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nExpect: x\r\n\r\nhi"
        )
        self.assertEqual(self.script.events, [("render", b"/u")])
        self.assertEqual(transport.value(), b"")

    def test_with_the_balancer(self):
        """
        The real resource: admitted once, from the head; an unknown route is
        refused before the body is sent.
        """
        hanging = Hanging()
        balancer = MemoryBalancer([hanging], self.clock)
        resource = balancer.site.resource
        admitted = []
        admit = resource.admit

        def counting(request, method, uri):
            admitted.append(uri)
            return admit(request, method, uri)

        resource.admit = counting
        channel, transport = balancer.connect()
        channel.dataReceived(
            b"POST /app/u HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        channel.dataReceived(b"hi")
        self.assertEqual(len(hanging.pending), 1)
        self.assertEqual(admitted, [b"/app/u"])

        channel, transport = balancer.connect()
        channel.dataReceived(
            b"POST /elsewhere HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        self.assertEqual(transport.value(), errors.raw_response(404))
        self.assertEqual(len(hanging.pending), 1)


class ClosingTests(ConnectionTestCase):
    """
    Connections l7lb closes, and what an exchange leaves behind.
    """

    def test_pipelined_requests_logged_in_order(self):
        channel, _ = self.connect()
        self.script.auto = True
        channel.dataReceived(get(b"/a") + get(b"/b") + get(b"/c"))
        self.assertEqual([line[1] for line in self.log.requests], [b"/a", b"/b", b"/c"])

    def test_closing_connection_reset_when_the_client_stops_reading(self):
        _channel, transport = self.connect(timeout=5.0)
        self.clock.advance(5.0 + TICK)  # idle keep-alive timeout: l7lb closes
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.aborted)
        # The client never reads what is left, so the close never completes.
        self.clock.advance(CLOSE_GRACE - 2 * TICK)
        self.assertFalse(transport.aborted)
        self.clock.advance(3 * TICK)
        self.assertTrue(transport.aborted)

    def test_no_request_read_on_a_closing_connection(self):
        channel, _transport = self.connect(timeout=5.0)
        self.clock.advance(5.0 + TICK)
        channel.dataReceived(get(b"/late"))
        self.assertEqual(self.script.requests, [])

    def test_temporary_file_closed_when_the_exchange_ends(self):
        channel, _ = self.connect()
        content = b"x" * (BODY_IN_MEMORY + 1)
        channel.dataReceived(
            b"PUT /big HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s"
            % (len(content), content)
        )
        [request] = self.script.requests
        body = request.body
        self.assertFalse(isinstance(body, bytes) or body.closed)
        answer(request)
        self.assertTrue(body.closed)

    def test_half_read_body_file_closed_when_the_client_goes(self):
        channel, _ = self.connect()
        channel.dataReceived(
            b"PUT /big HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s"
            % (BODY_IN_MEMORY * 4, b"x" * (BODY_IN_MEMORY + 1))
        )
        buffer = channel._body
        spilled = buffer._file
        self.assertIsNotNone(spilled)
        channel.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(spilled.closed)
