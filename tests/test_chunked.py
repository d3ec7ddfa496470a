"""
The strict chunked decoder: the same body whichever way the bytes are split,
extensions and trailers checked and dropped, what follows the body handed
back, and every malformed framing refused.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from l7lb.chunked import MAX_CHUNK_LINE, ChunkedDecoder, FramingError

# Two chunks (one with an extension), a trailer, and the next request.
MESSAGE = b"5;name=value\r\nhello\r\nB\r\n, chunked!!\r\n0\r\nX-Trailer: t\r\n\r\n"
BODY = b"hello, chunked!!"
NEXT = b"GET /next HTTP/1.1\r\n"


def decode(*pieces: bytes) -> tuple[bytes, bytes, ChunkedDecoder, list[bytes]]:
    """
    Feed C{pieces} in turn: the body, what the feeds returned, the decoder,
    and each delivery.
    """
    decoder = ChunkedDecoder()
    delivered: list[bytes] = []
    rest = b""
    for piece in pieces:
        rest += decoder.feed(piece, delivered.append)
    return b"".join(delivered), rest, decoder, delivered


class DecodingTests(SynchronousTestCase):
    def test_whole(self):
        body, rest, decoder, _ = decode(MESSAGE)
        self.assertEqual(body, BODY)
        self.assertEqual(rest, b"")
        self.assertTrue(decoder.done)

    def test_split_at_every_byte(self):
        data = MESSAGE + NEXT
        for cut in range(len(data) + 1):
            body, rest, decoder, delivered = decode(data[:cut], data[cut:])
            self.assertEqual((body, rest), (BODY, NEXT), cut)
            self.assertTrue(decoder.done, cut)
            self.assertNotIn(b"", delivered, cut)

    def test_split_at_every_pair_of_bytes(self):
        data = MESSAGE + NEXT
        for first in range(len(data) + 1):
            for second in range(first, len(data) + 1):
                body, rest, _, _ = decode(
                    data[:first], data[first:second], data[second:]
                )
                self.assertEqual((body, rest), (BODY, NEXT), (first, second))

    def test_byte_by_byte(self):
        data = MESSAGE + NEXT
        body, rest, decoder, _ = decode(*(data[i : i + 1] for i in range(len(data))))
        self.assertEqual((body, rest), (BODY, NEXT))
        self.assertTrue(decoder.done)

    def test_not_done_until_the_last_crlf(self):
        decoder = ChunkedDecoder()
        delivered: list[bytes] = []
        self.assertEqual(decoder.feed(MESSAGE[:-2], delivered.append), b"")
        self.assertFalse(decoder.done)
        self.assertEqual(decoder.feed(b"\r\n" + NEXT, delivered.append), NEXT)
        self.assertTrue(decoder.done)

    def test_data_delivered_as_it_arrives(self):
        decoder = ChunkedDecoder()
        delivered: list[bytes] = []
        decoder.feed(b"a\r\n0123", delivered.append)
        self.assertEqual(delivered, [b"0123"])
        decoder.feed(b"456", delivered.append)
        self.assertEqual(delivered, [b"0123", b"456"])
        self.assertFalse(decoder.done)

    def test_bytes_fed_after_the_end_are_returned(self):
        _, _, decoder, delivered = decode(b"0\r\n\r\n")
        self.assertTrue(decoder.done)
        self.assertEqual(decoder.feed(b"more", delivered.append), b"more")
        self.assertEqual(delivered, [])

    def test_empty_body(self):
        body, rest, decoder, delivered = decode(b"0\r\n\r\n" + NEXT)
        self.assertEqual((body, rest, delivered), (b"", NEXT, []))
        self.assertTrue(decoder.done)

    def test_hex_sizes(self):
        body, _, decoder, _ = decode(
            b"0A\r\n0123456789\r\n1f\r\n" + b"x" * 31 + b"\r\n"
        )
        self.assertEqual(body, b"0123456789" + b"x" * 31)
        self.assertFalse(decoder.done)
        body, _, _, _ = decode(b"000001\r\nz\r\n0\r\n\r\n")
        self.assertEqual(body, b"z")

    def test_extensions_dropped(self):
        body, rest, decoder, _ = decode(
            b'3;a=1;b;c="quoted ; value"\r\nabc\r\n'
            b"2 ;ws=before\r\nde\r\n"
            b"0;last=yes\r\n\r\n"
        )
        self.assertEqual((body, rest), (b"abcde", b""))
        self.assertTrue(decoder.done)

    def test_trailers_dropped(self):
        body, rest, decoder, _ = decode(
            b"1\r\nx\r\n0\r\nExpires: never\r\nX-Sum:  abc \r\nx-empty:\r\n\r\n" + NEXT
        )
        self.assertEqual((body, rest), (b"x", NEXT))
        self.assertTrue(decoder.done)

    def test_largest_size_accepted(self):
        decoder = ChunkedDecoder()
        delivered: list[bytes] = []
        decoder.feed(b"fffffffffffffff\r\nabc", delivered.append)
        self.assertEqual(delivered, [b"abc"])
        self.assertFalse(decoder.done)

    def test_line_at_the_limit_accepted_however_split(self):
        """
        A chunk line of exactly C{MAX_CHUNK_LINE} bytes is accepted wherever
        the feeds split it.
        """
        line = b"1;x=" + b"v" * (MAX_CHUNK_LINE - 4)
        self.assertEqual(len(line), MAX_CHUNK_LINE)
        data = line + b"\r\nz\r\n0\r\n\r\n"
        for cut in range(MAX_CHUNK_LINE - 2, MAX_CHUNK_LINE + 3):
            body, _, decoder, _ = decode(data[:cut], data[cut:])
            self.assertEqual(body, b"z", cut)
            self.assertTrue(decoder.done, cut)


class MalformedTests(SynchronousTestCase):
    def assertRefused(self, data: bytes) -> None:
        with self.assertRaises(FramingError, msg=repr(data)):
            decode(data)
        # The same bytes arriving one at a time are refused too.
        with self.assertRaises(FramingError, msg=repr(data)):
            decode(*(data[i : i + 1] for i in range(len(data))))

    def test_framing_error_is_a_value_error(self):
        self.assertTrue(issubclass(FramingError, ValueError))

    def test_malformed_sizes(self):
        for size in (
            b"",
            b"g",
            b"-1",
            b"+1",
            b"0x1",
            b" 1",
            b"1 1",
            b"1_0",
            b"\xff",
            b"1" * 16,
        ):
            self.assertRefused(size + b"\r\n" + b"x" * 20 + b"\r\n0\r\n\r\n")

    def test_control_character_in_an_extension(self):
        self.assertRefused(b"1;a=\x00\r\nx\r\n0\r\n\r\n")
        self.assertRefused(b"1;a=\x7f\r\nx\r\n0\r\n\r\n")

    def test_data_longer_than_its_size(self):
        self.assertRefused(b"3\r\nabcd\r\n0\r\n\r\n")

    def test_data_not_followed_by_crlf(self):
        self.assertRefused(b"3\r\nabc0\r\n\r\n")

    def test_bare_lf_ends_a_size_line(self):
        self.assertRefused(b"3\nabc\r\n0\r\n\r\n")

    def test_bare_cr_ends_a_size_line(self):
        self.assertRefused(b"3\rabc\r\n0\r\n\r\n")

    def test_bare_lf_after_data(self):
        self.assertRefused(b"3\r\nabc\n0\r\n\r\n")

    def test_bare_lf_in_the_trailers(self):
        self.assertRefused(b"0\r\nX: 1\nY: 2\r\n\r\n")

    def test_malformed_trailers(self):
        for line in (
            b"No-Colon",
            b": empty-name",
            b"Space Name: v",
            b"Space-Before-Colon : v",
            b" folded",
            b"X-Ctl: a\x00b",
            b"X-Ctl: a\x1bb",
        ):
            self.assertRefused(b"0\r\n" + line + b"\r\n\r\n")

    def test_oversized_line_split_across_feeds(self):
        decoder = ChunkedDecoder()
        decoder.feed(b"1;x=" + b"v" * (MAX_CHUNK_LINE - 4), lambda _: None)
        with self.assertRaises(FramingError):
            decoder.feed(b"vv", lambda _: None)

    def test_oversized_line_in_one_feed(self):
        """
        The limit holds however the bytes arrived: a huge extension whose
        CRLF came in the same read is refused too.
        """
        with self.assertRaises(FramingError):
            decode(b"1;x=" + b"v" * (4 * MAX_CHUNK_LINE) + b"\r\nz\r\n0\r\n\r\n")

    def test_oversized_trailer_section(self):
        trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 100) for i in range(50))
        self.assertGreater(len(trailers), MAX_CHUNK_LINE)
        self.assertRefused(b"0\r\n" + trailers + b"\r\n")

    def test_trailer_section_within_the_limit(self):
        trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 100) for i in range(30))
        self.assertLess(len(trailers), MAX_CHUNK_LINE)
        _, rest, decoder, _ = decode(b"0\r\n" + trailers + b"\r\n")
        self.assertTrue(decoder.done)
        self.assertEqual(rest, b"")
