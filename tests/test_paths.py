"""
Path normalisation: one spelling per path, unsafe spellings refused.
"""

from twisted.trial.unittest import SynchronousTestCase

from l7lb.paths import BadTarget, Target, normalise_path, parse_target


class NormaliseTests(SynchronousTestCase):
    def assertNormal(self, raw: bytes, expected: bytes) -> None:
        self.assertEqual(normalise_path(raw), expected, raw)

    def test_plain_paths_unchanged(self):
        for path in (
            b"/",
            b"/apiA",
            b"/apiA/",
            b"/a/b.c/d-e_f~g",
            b"/x;y=1/z:@!$&'()*+,=",
        ):
            self.assertNormal(path, path)

    def test_unreserved_escapes_decoded(self):
        self.assertNormal(b"/%61piA", b"/apiA")
        self.assertNormal(b"/%7Euser", b"/~user")
        self.assertNormal(b"/a/%2e%2E/", b"/")  # decoded, then removed as a dot segment

    def test_other_escapes_upper_cased(self):
        self.assertNormal(b"/a%3ab", b"/a%3Ab")
        self.assertNormal(b"/a%20b", b"/a%20b")

    def test_dot_segments_removed(self):
        self.assertNormal(b"/apiB/../apiA", b"/apiA")
        self.assertNormal(b"/a/./b/../c", b"/a/c")
        self.assertNormal(b"/a/b/..", b"/a/")
        self.assertNormal(b"/a/.", b"/a/")
        self.assertNormal(b"/a/..", b"/")
        self.assertNormal(b"/.well-known/x", b"/.well-known/x")
        self.assertNormal(b"/a/..b/c", b"/a/..b/c")

    def test_repeated_slashes_merged(self):
        self.assertNormal(b"//apiA///x//", b"/apiA/x/")

    def test_raw_bytes_escaped(self):
        self.assertNormal("/caf\u00e9".encode(), b"/caf%C3%A9")
        self.assertNormal(b'/a"b<c>', b"/a%22b%3Cc%3E")

    def test_refused(self):
        for raw, why in [
            (b"/..", "climbs above /"),
            (b"/a/../../b", "climbs above /"),
            (b"/%2e%2e/x", "climbs above /"),
            (b"/a%2fb", "encoded slash"),
            (b"/a%2Fb", "encoded slash"),
            (b"/a%5cb", "encoded backslash"),
            (b"/a\\b", "backslash"),
            (b"/a%00", "NUL"),
            (b"/a%zz", "malformed percent-escape"),
            (b"/a%4", "malformed percent-escape"),
            (b"/a\x01", "control character"),
            (b"apiA", "does not start with /"),
        ]:
            with self.assertRaises(BadTarget) as caught:
                normalise_path(raw)
            self.assertIn(why, str(caught.exception), raw)


class TargetTests(SynchronousTestCase):
    def test_origin_form(self):
        self.assertEqual(
            parse_target(b"/a/../b?x=1&y=%2F"), Target(b"/b", b"x=1&y=%2F")
        )
        self.assertEqual(parse_target(b"/a?"), Target(b"/a", b""))
        self.assertEqual(parse_target(b"/a"), Target(b"/a", None))

    def test_query_bytes(self):
        self.assertEqual(parse_target(b"/?q=a|b").query, b"q=a|b")
        self.assertEqual(parse_target("/?q=\u00e9".encode()).query, b"q=%C3%A9")
        self.assertRaises(BadTarget, parse_target, b"/?q=a\x7fb")

    def test_absolute_form(self):
        self.assertEqual(
            parse_target(b"http://api.example.com:8080/x/./y?z"),
            Target(b"/x/y", b"z", b"api.example.com:8080"),
        )
        self.assertEqual(parse_target(b"HTTP://h"), Target(b"/", None, b"h"))
        self.assertEqual(parse_target(b"http://h?q"), Target(b"/", b"q", b"h"))

    def test_refused_targets(self):
        for raw in (b"*", b"ftp://h/x", b"http:///x", b"http://user@h/x", b"/a#frag"):
            self.assertRaises(BadTarget, parse_target, raw)

    def test_forwarded(self):
        target = parse_target(b"/apiA/x?q=1")
        self.assertEqual(target.forwarded(), b"/apiA/x?q=1")
        self.assertEqual(target.forwarded(b"/x"), b"/x?q=1")


class ParameterTests(SynchronousTestCase):
    def test_dot_segments_with_parameters_refused(self):
        for raw in (b"/apiB/..;/apiA", b"/a/.;x/b", b"/a/%2e%2e;/b"):
            self.assertRaises(BadTarget, parse_target, raw)

    def test_routes_see_paths_without_parameters(self):
        target = parse_target(b"/apiA;jsessionid=1/x;v=2?q")
        self.assertEqual(target.path, b"/apiA;jsessionid=1/x;v=2")
        self.assertEqual(target.route_path, b"/apiA/x")
        self.assertEqual(target.forwarded(), b"/apiA;jsessionid=1/x;v=2?q")
