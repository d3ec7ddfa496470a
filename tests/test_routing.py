"""
Route choice: every named condition must hold; the most specific route wins.
"""

from twisted.trial.unittest import SynchronousTestCase

from l7lb.config import RouteConfig
from l7lb.fields import Fields
from l7lb.routing import RouteMap, host_name, strip_prefix


def route(name: str, **conditions) -> RouteConfig:
    return RouteConfig(name=name, pool="p", **conditions)


class MatchTests(SynchronousTestCase):
    def choose(self, routes, path=b"/", host=None, method=b"GET", headers=None):
        matched = RouteMap(routes).match(
            method, host, path, Fields.from_dict(headers or {})
        )
        return matched.name if matched else None

    def test_prefix_matches_at_segment_boundaries(self):
        routes = [route("a", path_prefix=b"/apiA")]
        self.assertEqual(self.choose(routes, b"/apiA"), "a")
        self.assertEqual(self.choose(routes, b"/apiA/"), "a")
        self.assertEqual(self.choose(routes, b"/apiA/x/y"), "a")
        self.assertIsNone(self.choose(routes, b"/apiAB"))
        self.assertIsNone(self.choose(routes, b"/api"))

    def test_longest_prefix_wins_whatever_the_order(self):
        routes = [
            route("root", path_prefix=b"/"),
            route("api", path_prefix=b"/api"),
            route("api-v2", path_prefix=b"/api/v2"),
        ]
        self.assertEqual(self.choose(routes, b"/api/v2/x"), "api-v2")
        self.assertEqual(self.choose(routes, b"/api/v1"), "api")
        self.assertEqual(self.choose(routes, b"/other"), "root")

    def test_host_precedence(self):
        routes = [
            route("none", path_prefix=b"/deep/path"),
            route("wild", host="*.example.com"),
            route("wilder", host="*.api.example.com"),
            route("exact", host="api.example.com"),
        ]
        self.assertEqual(
            self.choose(routes, b"/deep/path", b"api.example.com"), "exact"
        )
        self.assertEqual(self.choose(routes, b"/deep/path", b"www.example.com"), "wild")
        self.assertEqual(self.choose(routes, b"/", b"v1.api.example.com"), "wilder")
        self.assertEqual(self.choose(routes, b"/deep/path", b"example.com"), "none")
        self.assertIsNone(self.choose(routes, b"/", b"example.com"))
        self.assertEqual(self.choose(routes, b"/deep/path", None), "none")

    def test_file_order_breaks_ties(self):
        routes = [route("first", path_prefix=b"/x"), route("second", path_prefix=b"/x")]
        self.assertEqual(self.choose(routes, b"/x"), "first")

    def test_methods_and_header(self):
        routes = [
            route("canary", header=(b"x-canary", b"1"), methods=frozenset({b"GET"})),
            route("writes", methods=frozenset({b"POST", b"PUT"})),
            route("rest"),
        ]
        self.assertEqual(self.choose(routes, headers={b"X-Canary": [b"1"]}), "canary")
        self.assertEqual(
            self.choose(routes, headers={b"X-Canary": [b"0", b"1"]}), "canary"
        )
        self.assertEqual(self.choose(routes, headers={b"X-Canary": [b"11"]}), "rest")
        self.assertEqual(
            self.choose(routes, method=b"POST", headers={b"X-Canary": [b"1"]}), "writes"
        )
        self.assertEqual(self.choose(routes, method=b"DELETE"), "rest")

    def test_no_conditions_matches_everything(self):
        self.assertEqual(
            self.choose([route("all")], b"/any/thing", b"h", b"PATCH"), "all"
        )
        self.assertIsNone(self.choose([]))

    def test_order_of_precedence_is_visible(self):
        routes = [
            route("b", path_prefix=b"/b"),
            route("h", host="x.test"),
            route("bb", path_prefix=b"/b/b"),
        ]
        self.assertEqual([r.name for r in RouteMap(routes).routes], ["h", "bb", "b"])


class HelperTests(SynchronousTestCase):
    def test_host_name(self):
        self.assertEqual(host_name(b"API.Example.COM:8080"), b"api.example.com")
        self.assertEqual(host_name(b"example.com."), b"example.com")
        self.assertEqual(host_name(b"[::1]:80"), b"[::1]")
        self.assertEqual(host_name(b"[::1]"), b"[::1]")
        self.assertEqual(host_name(b"h:"), b"h")

    def test_strip_prefix(self):
        self.assertEqual(strip_prefix(b"/apiA/x", b"/apiA"), b"/x")
        self.assertEqual(strip_prefix(b"/apiA", b"/apiA"), b"/")
        self.assertEqual(strip_prefix(b"/apiA/", b"/apiA"), b"/")
        self.assertEqual(strip_prefix(b"/x", b"/"), b"/x")


class HostValueTests(SynchronousTestCase):
    def test_valid_and_invalid(self):
        from l7lb.routing import valid_host

        for good in (
            b"example.com",
            b"example.com:8080",
            b"[::1]:80",
            b"127.0.0.1",
            b"",
            b"h:",
        ):
            self.assertTrue(valid_host(good), good)
        for bad in (b"evil:.example.com", b"x X-Fold: y", b"a/b", b"[::1", b"a@b"):
            self.assertFalse(valid_host(bad), bad)


class StripWithParametersTests(SynchronousTestCase):
    def test_prefix_segments_go_whole(self):
        self.assertEqual(strip_prefix(b"/apiA;x=1/secret", b"/apiA"), b"/secret")
        self.assertEqual(strip_prefix(b"/a/b;v=2/c;k/d", b"/a/b"), b"/c;k/d")
        self.assertEqual(strip_prefix(b"/a;x", b"/a"), b"/")
