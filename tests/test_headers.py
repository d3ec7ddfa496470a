"""
Header rewriting at the proxy hop.
"""

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from l7lb.fields import Fields, parse_field_lines
from l7lb.headers import (
    connection_tokens,
    downstream_response_block,
    downstream_response_fields,
    request_id,
    serialise,
    upstream_request_block,
    upstream_request_fields,
)
from l7lb.trust import TrustedProxies


def upstream(
    headers: dict, client_ip="192.0.2.7", trusted=False, proto=b"http"
) -> Fields:
    return Fields.of(
        upstream_request_fields(
            Fields.from_dict(headers),
            client_ip=client_ip,
            trusted_peer=trusted,
            proto=proto,
            via=b"1.1 l7lb",
            request_id=b"rid",
        )
    )


class RequestHeaderTests(SynchronousTestCase):
    def test_framing_never_copied(self):
        out = upstream(
            {
                b"Content-Length": [b"5", b"5"],
                b"Transfer-Encoding": [b"chunked"],
                b"Expect": [b"100-continue"],
            }
        )
        for name in (b"Content-Length", b"Transfer-Encoding", b"Expect"):
            self.assertNotIn(name, out)

    def test_untrusted_forwarding_headers_replaced(self):
        out = upstream(
            {
                b"Host": [b"Example.com:8080"],
                b"X-Forwarded-For": [b"1.2.3.4"],
                b"X-Forwarded-Host": [b"evil"],
                b"X-Forwarded-Proto": [b"https"],
                b"Forwarded": [b"for=1.2.3.4"],
                b"Via": [b"1.0 older"],
            }
        )
        self.assertEqual(out.get(b"Host"), [b"Example.com:8080"])
        self.assertEqual(out.get(b"X-Forwarded-For"), [b"192.0.2.7"])
        self.assertEqual(out.get(b"X-Forwarded-Host"), [b"Example.com:8080"])
        self.assertEqual(out.get(b"X-Forwarded-Proto"), [b"http"])
        self.assertEqual(
            out.get(b"Forwarded"),
            [b'for=192.0.2.7;host="Example.com:8080";proto=http'],
        )
        self.assertEqual(out.get(b"Via"), [b"1.0 older, 1.1 l7lb"])
        self.assertEqual(out.get(b"X-Request-Id"), [b"rid"])

    def test_trusted_forwarding_headers_extended(self):
        out = upstream(
            {
                b"X-Forwarded-For": [b"1.2.3.4, 5.6.7.8", b"9.9.9.9"],
                b"X-Forwarded-Host": [b"shop.example"],
                b"X-Forwarded-Proto": [b"https"],
                b"Forwarded": [b"for=1.2.3.4;proto=https"],
            },
            trusted=True,
        )
        self.assertEqual(
            out.get(b"X-Forwarded-For"),
            [b"1.2.3.4, 5.6.7.8, 9.9.9.9, 192.0.2.7"],
        )
        self.assertEqual(out.get(b"X-Forwarded-Host"), [b"shop.example"])
        self.assertEqual(out.get(b"X-Forwarded-Proto"), [b"https"])
        self.assertEqual(
            out.get(b"Forwarded"),
            [b"for=1.2.3.4;proto=https, for=192.0.2.7;proto=http"],
        )

    def test_ipv6_forwarded_node_quoted(self):
        out = upstream({b"Host": [b"h"]}, client_ip="2001:db8::1", proto=b"https")
        self.assertEqual(
            out.get(b"Forwarded"), [b'for="[2001:db8::1]";host=h;proto=https']
        )

    def test_connection_named_headers_dropped_but_not_host(self):
        out = upstream(
            {
                b"Connection": [b"close, X-A", b"x-b"],
                b"X-A": [b"1"],
                b"X-B": [b"2"],
                b"X-C": [b"3"],
                b"Host": [b"h"],
            }
        )
        self.assertNotIn(b"X-A", out)
        self.assertNotIn(b"X-B", out)
        self.assertNotIn(b"Connection", out)
        self.assertEqual(out.get(b"X-C"), [b"3"])
        self.assertEqual(out.get(b"Host"), [b"h"])

    def test_repeated_headers_kept_in_order(self):
        out = upstream({b"Cookie": [b"a=1", b"b=2"], b"Accept-Encoding": [b"gzip"]})
        self.assertEqual(out.get(b"Cookie"), [b"a=1", b"b=2"])
        self.assertEqual(out.get(b"Accept-Encoding"), [b"gzip"])

    def test_tokens(self):
        self.assertEqual(
            connection_tokens([b"Close, X-Foo ,, keep-alive", b"Host"]),
            {b"close", b"x-foo", b"keep-alive"},
        )
        self.assertEqual(connection_tokens(None), frozenset())


class ResponseHeaderTests(SynchronousTestCase):
    def test_hop_by_hop_and_named_dropped(self):
        out = Fields.of(
            downstream_response_fields(
                Fields.from_dict(
                    {
                        b"Connection": [b"X-Internal"],
                        b"X-Internal": [b"1"],
                        b"Proxy-Authenticate": [b"Basic"],
                        b"Trailer": [b"X"],
                        b"Set-Cookie": [b"a=1", b"b=2"],
                        b"Via": [b"1.1 backend"],
                        b"Content-Length": [b"42"],
                    }
                ),
                via=b"1.1 l7lb",
                request_id=b"rid",
            )
        )
        self.assertNotIn(b"X-Internal", out)
        self.assertNotIn(b"Proxy-Authenticate", out)
        self.assertNotIn(b"Trailer", out)
        self.assertEqual(out.get(b"Set-Cookie"), [b"a=1", b"b=2"])
        self.assertEqual(out.get(b"Via"), [b"1.1 backend, 1.1 l7lb"])
        self.assertNotIn(b"Content-Length", out)  # framing is the client side's
        self.assertNotIn(b"Connection", out)
        self.assertEqual(out.get(b"X-Request-Id"), [b"rid"])


class RequestIdTests(SynchronousTestCase):
    def test_kept_when_well_formed(self):
        self.assertEqual(request_id([b"a.B_c:9-z"]), b"a.B_c:9-z")
        self.assertEqual(request_id([b"x" * 128]), b"x" * 128)

    def test_replaced_otherwise(self):
        for values in (
            None,
            [],
            [b""],
            [b"x" * 129],
            [b"sp ace"],
            [b"a", b"b"],
            [b"\xff"],
        ):
            generated = request_id(values)
            self.assertEqual(len(generated), 32, values)
            self.assertNotEqual(generated, request_id(values))


class TrustTests(SynchronousTestCase):
    def test_membership(self):
        trusted = TrustedProxies(
            [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]
        )
        self.assertTrue(trusted.contains("10.1.2.3"))
        self.assertTrue(trusted.contains("::ffff:10.1.2.3"))
        self.assertTrue(trusted.contains("2001:db8::5"))
        self.assertFalse(trusted.contains("11.0.0.1"))
        self.assertFalse(trusted.contains("unknown"))
        self.assertFalse(TrustedProxies([]).contains("10.1.2.3"))


class ResponseBlockTests(SynchronousTestCase):
    """
    The quick way of serialising a response's fields gives the same bytes as
    the general way, or declines.
    """

    def general(self, fields: Fields) -> bytes:
        return serialise(
            downstream_response_fields(fields, via=b"1.1 l7lb", request_id=b"rid")
        )

    def quick(self, fields: Fields) -> bytes | None:
        return downstream_response_block(fields, via=b"1.1 l7lb", request_id=b"rid")

    def parsed(self, block: bytes) -> Fields:
        lines = block.split(b"\r\n")
        fields = parse_field_lines(lines)
        fields.raw = block + b"\r\n"
        return fields

    def test_same_bytes_as_the_general_way(self):
        for block in [
            b"Content-Type: text/plain\r\nContent-Length: 5",
            b"Server: nginx\r\nDate: x\r\nContent-Length: 5\r\nConnection: keep-alive",
            b"content-length: 5\r\nKeep-Alive: timeout=5\r\nConnection: Keep-Alive",
            b"Connection: close, X-Internal\r\nX-Internal: 1\r\nX-Public: 2\r\n"
            b"x-internal: 3\r\nTransfer-Encoding: chunked",
            b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nX-Request-Id: theirs",
            b"Cache-Control: no-store",
        ]:
            fields = self.parsed(block)
            self.assertEqual(self.quick(fields), self.general(fields), block)

    def test_declines_to_extend_via(self):
        fields = self.parsed(b"Via: 1.1 backend\r\nContent-Length: 5")
        self.assertIsNone(self.quick(fields))
        self.assertIn(b"Via: 1.1 backend, 1.1 l7lb\r\n", self.general(fields))

    def test_declines_changed_fields(self):
        fields = self.parsed(b"Content-Length: 5")
        fields.add(b"X-Added", b"1")
        self.assertIsNone(self.quick(fields))


class RequestBlockTests(SynchronousTestCase):
    def test_same_bytes_as_the_general_way(self):
        for block, trusted in [
            (b"Host: shop.example:8080\r\nAccept: */*", False),
            (b"Host: h\r\nUser-Agent: x", True),
            (b"Host: h\r\nConnection: keep-alive\r\nVia: 1.0 old", False),
            (b"Host: h\r\nX_Forwarded_For: 6.6.6.6", False),
            (b"Host: h\r\nX-Forwarded-For: 1.2.3.4\r\nForwarded: for=1.2.3.4", True),
        ]:
            fields = parse_field_lines(block.split(b"\r\n"))
            fields.raw = block + b"\r\n"
            options = dict(
                client_ip="192.0.2.7",
                trusted_peer=trusted,
                proto=b"https",
                via=b"1.1 l7lb",
                request_id=b"rid",
            )
            self.assertEqual(
                upstream_request_block(fields, **options),
                serialise(upstream_request_fields(fields, **options)),
                block,
            )
