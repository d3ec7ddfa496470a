"""
Hostile and broken requests, as hand-written bytes, through the real
service to a recording backend: what the client gets back, and exactly what
reached the backend (never a smuggled second request, never the client's
framing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.defer import inlineCallbacks

from tests.support import IntegrationTest, Seen, exchange


def statuses(raw: bytes) -> list[int]:
    import re

    return [
        int(code)
        for code in re.findall(rb"(?:^|\r\n\r\n|[^\r\n])HTTP/1\.[01] (\d{3}) ", raw)
    ] or [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", raw)]


H = b"Host: lb.test\r\n"
CLOSE = b"Connection: close\r\n"


@dataclass
class Case:
    """
    Bytes sent, the statuses expected back (in order), and the requests
    (method, target) the backend should have seen.
    """

    data: bytes
    answers: list[int]
    forwarded: list[tuple[bytes, bytes]] = field(default_factory=list)
    check: Callable[[IntegrationTest, list[Seen], bytes], None] | None = None


def _no_header(name: bytes) -> Callable[[IntegrationTest, list[Seen], bytes], None]:
    def check(test: IntegrationTest, seen: list[Seen], raw: bytes) -> None:
        test.assertEqual(seen[0].header(name), [])

    return check


def _xff_is_ours(test: IntegrationTest, seen: list[Seen], raw: bytes) -> None:
    test.assertEqual(seen[0].header(b"X-Forwarded-For"), [b"127.0.0.1"])
    test.assertEqual(seen[0].header(b"X_Forwarded_For"), [])


def _framed_once(length: int) -> Callable[[IntegrationTest, list[Seen], bytes], None]:
    def check(test: IntegrationTest, seen: list[Seen], raw: bytes) -> None:
        test.assertEqual(len(seen[0].body), length)
        test.assertEqual(len(seen[0].header(b"Content-Length")), 1)
        test.assertEqual(seen[0].header(b"Transfer-Encoding"), [])

    return check


CASES: dict[str, Case] = {
    # Framing and smuggling.
    "cl_and_te": Case(
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        [400],
    ),
    "te_and_cl": Case(
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
        [400],
    ),
    "two_lengths_differ": Case(
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        [400],
    ),
    "two_lengths_same": Case(
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        [400],
    ),
    "length_list": Case(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\nhello", [400]
    ),
    "length_signed_plus": Case(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello", [400]
    ),
    "length_negative": Case(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", [400]
    ),
    "length_not_a_number": Case(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5x\r\n\r\nhello", [400]
    ),
    "length_hex": Case(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x5\r\n\r\nhello", [400]
    ),
    "length_overflow": Case(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999999\r\n\r\n",
        [400],
    ),
    "te_identity": Case(
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: identity\r\n\r\nGET /smuggled HTTP/1.1\r\n"
        + H
        + b"\r\n",
        [400],
    ),
    "te_gzip_chunked": Case(
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        [400],
    ),
    "te_chunked_identity": Case(
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        [400],
    ),
    "te_twice": Case(
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        [400],
    ),
    "te_not_chunked": Case(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        [400],
    ),
    "te_folded": Case(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        [400],
    ),
    "te_tab_value": Case(
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding:\tchunked\r\n"
        + CLOSE
        + b"\r\n3\r\nabc\r\n0\r\n\r\n",
        [200],
        [(b"POST", b"/")],
        _framed_once(3),
    ),
    "chunk_size_garbage": Case(
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        [400],
    ),
    "chunk_size_negative": Case(
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
        [400],
    ),
    "chunk_size_spaces": Case(
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n3 3\r\nabc\r\n0\r\n\r\n",
        [400],
    ),
    "chunk_no_crlf_after_data": Case(
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
        [400],
    ),
    "chunked_with_extension_and_trailer": Case(
        b"POST /up HTTP/1.1\r\n"
        + H
        + CLOSE
        + b"Transfer-Encoding: chunked\r\n\r\n5;name=val\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n",
        [200],
        [(b"POST", b"/up")],
        _framed_once(5),
    ),
    "get_with_body": Case(
        b"GET /g HTTP/1.1\r\n" + H + CLOSE + b"Content-Length: 3\r\n\r\nabc",
        [200],
        [(b"GET", b"/g")],
        _framed_once(3),
    ),
    # Header syntax.
    "space_before_colon": Case(b"GET / HTTP/1.1\r\nHost : lb.test\r\n\r\n", [400]),
    "tab_before_colon": Case(b"GET / HTTP/1.1\r\n" + H + b"X-A\t: 1\r\n\r\n", [400]),
    "no_colon": Case(b"GET / HTTP/1.1\r\n" + H + b"Just text\r\n\r\n", [400]),
    "empty_name": Case(b"GET / HTTP/1.1\r\n" + H + b": value\r\n\r\n", [400]),
    "name_not_a_token": Case(b"GET / HTTP/1.1\r\n" + H + b"X(y): 1\r\n\r\n", [400]),
    "bare_cr_in_value": Case(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n", [400]),
    "bare_lf_in_value": Case(
        b"GET / HTTP/1.1\r\n" + H + b"X-A: a\nX-B: b\r\n\r\n", [400]
    ),
    "nul_in_value": Case(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", [400]),
    "control_in_value": Case(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x01b\r\n\r\n", [400]),
    "del_in_value": Case(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x7fb\r\n\r\n", [400]),
    "obs_fold": Case(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n", [400]),
    "too_many_headers": Case(
        b"GET / HTTP/1.1\r\n"
        + H
        + b"".join(b"X-%d: v\r\n" % n for n in range(101))
        + b"\r\n",
        [431],
    ),
    "obs_text_value_passes": Case(
        b"GET /t HTTP/1.1\r\n" + H + CLOSE + b"X-A: caf\xe9\r\n\r\n",
        [200],
        [(b"GET", b"/t")],
    ),
    # Request line.
    "double_space": Case(b"GET  / HTTP/1.1\r\n" + H + b"\r\n", [400]),
    "version_2": Case(b"GET / HTTP/2.0\r\n" + H + b"\r\n", [400]),
    "version_lowercase": Case(b"GET / http/1.1\r\n" + H + b"\r\n", [400]),
    "version_missing": Case(b"GET /\r\n" + H + b"\r\n", [400]),
    "method_not_a_token": Case(b"G(ET / HTTP/1.1\r\n" + H + b"\r\n", [400]),
    "asterisk_get": Case(b"GET * HTTP/1.1\r\n" + H + b"\r\n", [400]),
    "fragment": Case(b"GET /a#b HTTP/1.1\r\n" + H + b"\r\n", [400]),
    # Host.
    "no_host": Case(b"GET / HTTP/1.1\r\n\r\n", [400]),
    "two_hosts": Case(b"GET / HTTP/1.1\r\n" + H + H + b"\r\n", [400]),
    "host_with_path": Case(b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", [400]),
    "host_with_userinfo": Case(b"GET / HTTP/1.1\r\nHost: u@h\r\n\r\n", [400]),
    "host_bad_port": Case(b"GET / HTTP/1.1\r\nHost: h:8o\r\n\r\n", [400]),
    "absolute_form": Case(
        b"GET http://shop.test:81/x/../y?q HTTP/1.1\r\nHost: ignored\r\n"
        + CLOSE
        + b"\r\n",
        [200],
        [(b"GET", b"/y?q")],
        lambda t, seen, raw: t.assertEqual(seen[0].header(b"Host"), [b"shop.test:81"]),
    ),
    "absolute_form_bad_authority": Case(
        b"GET http://admin.test:80:80/x HTTP/1.1\r\n" + H + b"\r\n", [400]
    ),
    "absolute_form_escaped_authority": Case(
        b"GET http://admin%2etest/x HTTP/1.1\r\n" + H + b"\r\n", [400]
    ),
    "host_escaped": Case(b"GET / HTTP/1.1\r\nHost: lb%2etest\r\n\r\n", [400]),
    # Header hygiene.
    "underscore_header_dropped": Case(
        b"GET /u HTTP/1.1\r\n"
        + H
        + CLOSE
        + b"X_Forwarded_For: 6.6.6.6\r\nX-Forwarded-For: 7.7.7.7\r\n\r\n",
        [200],
        [(b"GET", b"/u")],
        _xff_is_ours,
    ),
    "connection_cannot_drop_ours": Case(
        b"GET /c HTTP/1.1\r\n"
        + H
        + b"Connection: close, X-Forwarded-For, Forwarded, Via\r\n\r\n",
        [200],
        [(b"GET", b"/c")],
        lambda t, seen, raw: t.assertEqual(
            [
                len(seen[0].header(n))
                for n in (b"X-Forwarded-For", b"Forwarded", b"Via")
            ],
            [1, 1, 1],
        ),
    ),
    "connection_named_dropped": Case(
        b"GET /n HTTP/1.1\r\n"
        + H
        + b"Connection: close, X-Private\r\nX-Private: 1\r\n\r\n",
        [200],
        [(b"GET", b"/n")],
        _no_header(b"X-Private"),
    ),
    "te_header_dropped": Case(
        b"GET /te HTTP/1.1\r\n" + H + CLOSE + b"TE: trailers\r\n\r\n",
        [200],
        [(b"GET", b"/te")],
        _no_header(b"TE"),
    ),
    # Paths.
    "dot_dot_encoded": Case(b"GET /%2e%2e/etc HTTP/1.1\r\n" + H + b"\r\n", [400]),
    "dot_dot_slash_encoded": Case(
        b"GET /app/..%2f..%2fetc HTTP/1.1\r\n" + H + b"\r\n", [400]
    ),
    "encoded_slash": Case(b"GET /%2fadmin HTTP/1.1\r\n" + H + b"\r\n", [400]),
    "backslash": Case(b"GET /app\\..\\admin HTTP/1.1\r\n" + H + b"\r\n", [400]),
    "admin_plain": Case(b"GET /admin HTTP/1.1\r\n" + H + CLOSE + b"\r\n", [403]),
    "admin_double_slash": Case(
        b"GET //admin HTTP/1.1\r\n" + H + CLOSE + b"\r\n", [403]
    ),
    "admin_dot": Case(b"GET /./admin/x HTTP/1.1\r\n" + H + CLOSE + b"\r\n", [403]),
    "admin_via_dot_dot": Case(
        b"GET /app/../admin HTTP/1.1\r\n" + H + CLOSE + b"\r\n", [403]
    ),
    "admin_encoded_letters": Case(
        b"GET /%61dmin HTTP/1.1\r\n" + H + CLOSE + b"\r\n", [403]
    ),
    "admin_parameters": Case(
        b"GET /admin;x=1/y HTTP/1.1\r\n" + H + CLOSE + b"\r\n", [403]
    ),
    "admin_dot_dot_semicolon": Case(
        b"GET /app/..;/admin HTTP/1.1\r\n" + H + b"\r\n", [400]
    ),
    "normalised_forward": Case(
        b"GET /a//b/./c/../d?x=%2F HTTP/1.1\r\n" + H + CLOSE + b"\r\n",
        [200],
        [(b"GET", b"/a/b/d?x=%2F")],
    ),
    # Pipelining and connection handling.
    "pipelined_in_order": Case(
        b"GET /1 HTTP/1.1\r\n"
        + H
        + b"\r\nGET /2 HTTP/1.1\r\n"
        + H
        + b"\r\nGET /3 HTTP/1.1\r\n"
        + H
        + CLOSE
        + b"\r\n",
        [200, 200, 200],
        [(b"GET", b"/1"), (b"GET", b"/2"), (b"GET", b"/3")],
    ),
    "bytes_after_close_ignored": Case(
        b"GET /only HTTP/1.1\r\n"
        + H
        + CLOSE
        + b"\r\nGET /smuggled HTTP/1.1\r\n"
        + H
        + b"\r\n",
        [200],
        [(b"GET", b"/only")],
    ),
    "http10_closed_after_response": Case(
        b"GET /old HTTP/1.0\r\n" + H + b"\r\nGET /again HTTP/1.0\r\n\r\n",
        [200],
        [(b"GET", b"/old")],
    ),
    "bad_request_ends_pipeline": Case(
        b"GET /ok HTTP/1.1\r\n"
        + H
        + b"\r\nGET /../x HTTP/1.1\r\n"
        + H
        + b"\r\nGET /never HTTP/1.1\r\n"
        + H
        + b"\r\n",
        [200, 400],
        [(b"GET", b"/ok")],
    ),
    "expect_on_refused_route": Case(
        b"POST /admin HTTP/1.1\r\n"
        + H
        + b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\nhello",
        [403],
        [],
        lambda t, seen, raw: t.assertNotIn(b"100 Continue", raw),
    ),
    "expect_accepted": Case(
        b"POST /e HTTP/1.1\r\n"
        + H
        + CLOSE
        + b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\nhello",
        [100, 200],
        [(b"POST", b"/e")],
        _framed_once(5),
    ),
    # Limits.
    "uri_too_long": Case(
        b"GET /" + b"a" * 1100 + b" HTTP/1.1\r\n" + H + b"\r\n", [414]
    ),
    "header_block_too_large": Case(
        b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"v" * 3000 + b"\r\n\r\n", [431]
    ),
    "body_too_large": Case(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 20000\r\n\r\n" + b"b" * 100,
        [413],
    ),
}


class HostileRequestTests(IntegrationTest):
    """
    One test per case in L{CASES}, made below.
    """

    def run_case(self, case: Case):
        app = self.backend("app")
        service = self.balancer(
            f"""
            [lb]
            listen = tcp:0:interface=127.0.0.1
            access_log = off
            max_uri_length = 1KiB
            max_header_size = 2KiB
            max_body_size = 10KiB
            [pool:p]
            servers = {app.url}
            [route:admin]
            path_prefix = /admin
            deny = all
            [route:all]
            pool = p
            """
        )
        port = self.port_of(service)
        raw = yield exchange(port, case.data)
        self.assertEqual(statuses(raw), case.answers, raw[:300])
        seen = app.requests
        self.assertEqual([(s.method, s.uri) for s in seen], case.forwarded)
        if case.check is not None:
            case.check(self, seen, raw)
        # Nothing smuggled: the backend parsed exactly what was forwarded,
        # and a fresh request afterwards is the only new one it sees.
        upstream = b"".join(app.raw)
        self.assertNotIn(b"smuggled", upstream.lower())
        self.assertNotIn(b"SMUGGLED", upstream)
        after = yield exchange(port, b"GET /after HTTP/1.1\r\n" + H + CLOSE + b"\r\n")
        self.assertEqual(statuses(after), [200])
        self.assertEqual(
            [(s.method, s.uri) for s in app.requests][len(case.forwarded) :],
            [(b"GET", b"/after")],
        )


def _make(name: str, case: Case) -> Callable[[HostileRequestTests], object]:
    @inlineCallbacks
    def test(self: HostileRequestTests):
        yield from self.run_case(case)

    test.__name__ = f"test_{name}"
    return test


for _name, _case in CASES.items():
    setattr(HostileRequestTests, f"test_{_name}", _make(_name, _case))
