"""
The header field list: arrival order and the sender's spelling kept, lookups
by any spelling.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from l7lb.fields import TOKEN_BYTES, VALUE_BYTES, Fields


class FieldsTests(SynchronousTestCase):
    def test_order_and_spelling_kept(self):
        fields = Fields()
        fields.add(b"X-B", b"1")
        fields.add(b"host", b"h")
        fields.add(b"x-b", b"2")
        fields.add(b"CONTENT-type", b"text/plain")
        self.assertEqual(
            list(fields),
            [
                (b"X-B", b"1"),
                (b"host", b"h"),
                (b"x-b", b"2"),
                (b"CONTENT-type", b"text/plain"),
            ],
        )
        self.assertEqual(len(fields), 4)

    def test_get_is_case_insensitive_and_ordered(self):
        fields = Fields.of([(b"Cookie", b"a=1"), (b"Via", b"x"), (b"COOKIE", b"b=2")])
        for spelling in (b"cookie", b"Cookie", b"COOKIE", b"cOoKiE"):
            self.assertEqual(fields.get(spelling), [b"a=1", b"b=2"])
        self.assertIsNone(fields.get(b"set-cookie"))

    def test_first(self):
        fields = Fields.of([(b"X-Id", b"one"), (b"x-id", b"two")])
        self.assertEqual(fields.first(b"X-ID"), b"one")
        self.assertIsNone(fields.first(b"x-other"))

    def test_first_of_an_empty_value(self):
        fields = Fields.of([(b"X-Empty", b"")])
        self.assertEqual(fields.first(b"x-empty"), b"")

    def test_contains(self):
        fields = Fields.of([(b"Host", b"h")])
        self.assertIn(b"host", fields)
        self.assertIn(b"HOST", fields)
        self.assertNotIn(b"hostname", fields)
        self.assertNotIn(b"hos", fields)

    def test_replace_keeps_position_and_drops_the_other_values(self):
        fields = Fields.of(
            [
                (b"A", b"1"),
                (b"Host", b"old"),
                (b"B", b"2"),
                (b"HOST", b"older"),
                (b"C", b"3"),
            ]
        )
        fields.replace(b"host", b"new")
        self.assertEqual(
            list(fields),
            [(b"A", b"1"), (b"Host", b"new"), (b"B", b"2"), (b"C", b"3")],
        )
        self.assertEqual(fields.get(b"Host"), [b"new"])
        self.assertEqual(len(fields), 4)

    def test_replace_absent_field_appends(self):
        fields = Fields.of([(b"A", b"1")])
        fields.replace(b"X-New", b"v")
        self.assertEqual(list(fields), [(b"A", b"1"), (b"X-New", b"v")])
        self.assertEqual(fields.get(b"x-new"), [b"v"])

    def test_add_after_replace(self):
        fields = Fields.of([(b"V", b"1"), (b"v", b"2")])
        fields.replace(b"V", b"3")
        fields.add(b"v", b"4")
        self.assertEqual(fields.get(b"v"), [b"3", b"4"])
        self.assertEqual(list(fields), [(b"V", b"3"), (b"v", b"4")])

    def test_of_keeps_duplicates(self):
        pairs = [(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"a=1")]
        fields = Fields.of(iter(pairs))
        self.assertEqual(list(fields), pairs)
        self.assertEqual(fields.get(b"set-cookie"), [b"a=1", b"a=1"])

    def test_from_dict(self):
        fields = Fields.from_dict(
            {b"Accept": [b"a", b"b"], b"Host": [b"h"], b"X-None": []}
        )
        self.assertEqual(
            list(fields), [(b"Accept", b"a"), (b"Accept", b"b"), (b"Host", b"h")]
        )
        self.assertNotIn(b"x-none", fields)
        self.assertEqual(fields.get(b"accept"), [b"a", b"b"])

    def test_instances_do_not_share_state(self):
        one, two = Fields(), Fields()
        one.add(b"A", b"1")
        self.assertEqual(len(two), 0)
        self.assertNotIn(b"a", two)

    def test_repr_shows_items(self):
        self.assertEqual(repr(Fields.of([(b"A", b"1")])), "Fields([(b'A', b'1')])")


class CharacterSetTests(SynchronousTestCase):
    def test_token_excludes_separators_and_controls(self):
        for byte in b' "(),/:;<=>?@[\\]{}\t\r\n\x00\x7f\x80':
            self.assertNotIn(byte, TOKEN_BYTES, bytes([byte]))
        for byte in b"!#$%&'*+-.^_`|~09azAZ":
            self.assertIn(byte, TOKEN_BYTES, bytes([byte]))

    def test_value_excludes_controls_but_not_tab_or_obs_text(self):
        for byte in (0, 0x0A, 0x0D, 0x1F, 0x7F):
            self.assertNotIn(byte, VALUE_BYTES, hex(byte))
        for byte in (0x09, 0x20, 0x7E, 0x80, 0xFF):
            self.assertIn(byte, VALUE_BYTES, hex(byte))
