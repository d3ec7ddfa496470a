"""
Traffic policy over real HTTP: rate limits, access lists, sticky sessions
and hashing, and who "the client" is behind a trusted proxy.
"""

from __future__ import annotations

import ipaddress
import re

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase

from l7lb.access import AccessList
from l7lb.config import AccessRule
from l7lb.trust import TrustedProxies
from tests.support import IntegrationTest, Session, fetch


def nets(*items: str):
    return tuple(ipaddress.ip_network(i) for i in items)


class AccessListTests(SynchronousTestCase):
    def test_allow_only(self):
        access = AccessList(AccessRule(allow=nets("10.0.0.0/8", "2001:db8::/32")))
        self.assertTrue(access.admits("10.1.2.3"))
        self.assertTrue(access.admits("::ffff:10.1.2.3"))
        self.assertTrue(access.admits("2001:db8::1"))
        self.assertFalse(access.admits("192.0.2.1"))
        self.assertFalse(access.admits("unknown"))

    def test_deny_wins(self):
        access = AccessList(
            AccessRule(allow=nets("10.0.0.0/8"), deny=nets("10.6.6.0/24"))
        )
        self.assertTrue(access.admits("10.1.1.1"))
        self.assertFalse(access.admits("10.6.6.6"))
        deny_only = AccessList(AccessRule(deny=nets("192.0.2.0/24")))
        self.assertTrue(deny_only.admits("198.51.100.1"))
        self.assertFalse(deny_only.admits("192.0.2.9"))
        self.assertFalse(deny_only.admits("unknown"))  # unreadable: fail closed

    def test_deny_all(self):
        self.assertFalse(AccessList(AccessRule(deny_all=True)).admits("127.0.0.1"))


class ClientAddressTests(SynchronousTestCase):
    def test_hops_with_ports_are_addresses(self):
        trusted = TrustedProxies(nets("10.0.0.0/8"))
        self.assertEqual(
            trusted.client_address("10.0.0.1", [b"203.0.113.7:5678"]), "203.0.113.7"
        )
        self.assertEqual(
            trusted.client_address("10.0.0.1", [b"[2001:db8::7]:443"]), "2001:db8::7"
        )
        self.assertEqual(trusted.client_address("10.0.0.1", [b"nonsense"]), "nonsense")
        self.assertFalse(
            AccessList(AccessRule(deny=nets("203.0.113.0/24"))).admits("nonsense")
        )

    def test_right_most_untrusted_hop(self):
        trusted = TrustedProxies(nets("10.0.0.0/8"))
        self.assertEqual(trusted.client_address("192.0.2.1", [b"6.6.6.6"]), "192.0.2.1")
        self.assertEqual(
            trusted.client_address("10.0.0.1", [b"6.6.6.6, 203.0.113.7, 10.0.0.2"]),
            "203.0.113.7",
        )
        self.assertEqual(
            trusted.client_address("10.0.0.1", [b"10.1.1.1", b"10.2.2.2"]), "10.1.1.1"
        )
        self.assertEqual(trusted.client_address("10.0.0.1", None), "10.0.0.1")


class RateLimitTests(IntegrationTest):
    @inlineCallbacks
    def setUp(self):
        self.app = self.backend("app")
        self.service = self.balancer(
            f"""
            [lb]
            listen = tcp:0:interface=127.0.0.1
            access_log = off
            [ratelimit]
            rate_limit = 3/m
            burst = 3
            rate_limit_key = header:X-Api-Key
            [pool:p]
            servers = {self.app.url}
            [route:limited]
            path_prefix = /limited
            pool = p
            [route:global]
            path_prefix = /global
            pool = p
            rate_limit = 2/h
            burst = 2
            rate_limit_key = global
            [route:free]
            pool = p
            rate_limit = off
            """
        )
        self.port = self.port_of(self.service)
        yield None

    @inlineCallbacks
    def test_429_with_fields(self):
        for remaining in (2, 1, 0):
            reply = yield fetch(self.port, "/limited/x", headers={"X-Api-Key": "k1"})
            self.assertEqual(reply.status, 200)
            self.assertEqual(reply.header("RateLimit-Policy"), ['"limited";q=3;w=60'])
            self.assertEqual(
                reply.header("RateLimit")[0].split(";")[:2],
                ['"limited"', f"r={remaining}"],
            )
        refused = yield fetch(self.port, "/limited/x", headers={"X-Api-Key": "k1"})
        self.assertEqual(refused.status, 429)
        self.assertEqual(refused.body, b"429 Too Many Requests\n")
        retry_after = int(refused.header("Retry-After")[0])
        self.assertTrue(1 <= retry_after <= 20, retry_after)
        self.assertRegex(refused.header("RateLimit")[0], r'^"limited";r=0;t=\d+$')
        self.assertEqual(len(self.app.requests), 3)
        limiter = self.service.policies["limited"].limiter
        assert limiter is not None
        self.assertEqual((limiter.allowed, limiter.refused), (3, 1))

    @inlineCallbacks
    def test_header_keys_have_separate_buckets(self):
        for _ in range(3):
            yield fetch(self.port, "/limited", headers={"X-Api-Key": "k1"})
        other = yield fetch(self.port, "/limited", headers={"X-Api-Key": "k2"})
        self.assertEqual(other.status, 200)
        again = yield fetch(self.port, "/limited", headers={"X-Api-Key": "k1"})
        self.assertEqual(again.status, 429)
        # No key: the client's address is the key.
        for _ in range(3):
            reply = yield fetch(self.port, "/limited")
            self.assertEqual(reply.status, 200)
        reply = yield fetch(self.port, "/limited")
        self.assertEqual(reply.status, 429)

    @inlineCallbacks
    def test_repeated_key_header_refused(self):
        reply = yield fetch(self.port, "/limited", headers={"X-Api-Key": "a"})
        self.assertEqual(reply.status, 200)

        def twice():
            import http.client

            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            connection.putrequest("GET", "/limited")
            connection.putheader("X-Api-Key", "random")
            connection.putheader("X-Api-Key", "a")
            connection.endheaders()
            return connection.getresponse().status

        from twisted.internet import threads

        status = yield threads.deferToThread(twice)
        self.assertEqual(status, 400)
        self.assertEqual(len(self.app.requests), 1)

    @inlineCallbacks
    def test_global_key_and_unlimited_route(self):
        statuses = []
        for key in ("a", "b", "c"):
            reply = yield fetch(self.port, "/global", headers={"X-Api-Key": key})
            statuses.append(reply.status)
        self.assertEqual(statuses, [200, 200, 429])
        for _ in range(10):
            reply = yield fetch(self.port, "/elsewhere")
            self.assertEqual(reply.status, 200)
            self.assertEqual(reply.header("RateLimit"), [])


class AccessTests(IntegrationTest):
    @inlineCallbacks
    def test_allow_deny_and_deny_all(self):
        app = self.backend("app")
        service = self.balancer(
            f"""
            [pool:p]
            servers = {app.url}
            [route:admin]
            path_prefix = /admin
            deny = all
            [route:internal]
            path_prefix = /internal
            pool = p
            allow = 10.0.0.0/8
            [route:open]
            pool = p
            deny = 192.0.2.0/24
            """
        )
        port = self.port_of(service)
        for spelling in (
            "/admin",
            "/admin/x",
            "//admin",
            "/x/../admin",
            "/%61dmin",
            "/admin;v=1/x",
            "/ADMIN/../admin",
        ):
            reply = yield fetch(port, spelling)
            self.assertEqual(reply.status, 403, spelling)
            self.assertEqual(reply.body, b"403 Forbidden\n")
        reply = yield fetch(port, "/internal/x")
        self.assertEqual(reply.status, 403)
        reply = yield fetch(port, "/public")
        self.assertEqual(reply.status, 200)
        self.assertEqual([r.uri for r in app.requests], [b"/public"])

    @inlineCallbacks
    def test_trusted_proxy_client_judged(self):
        app = self.backend("app")
        service = self.balancer(
            f"""
            [lb]
            listen = tcp:0:interface=127.0.0.1
            access_log = off
            trusted_proxies = 127.0.0.0/8
            [pool:p]
            servers = {app.url}
            [route:internal]
            pool = p
            allow = 10.0.0.0/8
            """
        )
        port = self.port_of(service)
        inside = yield fetch(port, "/", headers={"X-Forwarded-For": "10.9.9.9"})
        outside = yield fetch(
            port, "/", headers={"X-Forwarded-For": "10.9.9.9, 192.0.2.7"}
        )
        self.assertEqual((inside.status, outside.status), (200, 403))


class StickyTests(IntegrationTest):
    @inlineCallbacks
    def test_client_stays_then_moves_when_its_backend_fails(self):
        a, b = self.backend("a"), self.backend("b")
        service = self.one_pool(
            a.url,
            b.url,
            pool_options="sticky = cookie SRV\nhealth_path = /health\nhealth_interval = 50ms\nrise = 1\nfall = 1",
        )
        port = self.port_of(service)
        first = yield fetch(port, "/")
        cookie = first.header("Set-Cookie")[0]
        self.assertRegex(cookie, r"^SRV=[0-9a-f]{32}; Path=/; HttpOnly; SameSite=Lax$")
        token = cookie.split(";")[0]
        pinned = first.json()["backend"]
        session = Session(port)
        self.addCleanup(session.close)
        for _ in range(50):
            reply = yield session.fetch("/", headers={"Cookie": f"theme=dark; {token}"})
            self.assertEqual(reply.json()["backend"], pinned)
            self.assertEqual(reply.header("Set-Cookie"), [])
        failing = a if pinned == "a" else b
        failing.health_status = 500
        pool = service.pools["p"]
        failing_backend = next(
            x for x in pool.backends if x.address.endswith(str(failing.port))
        )
        yield self.until(lambda: not failing_backend.in_rotation)
        moved = yield session.fetch("/", headers={"Cookie": token})
        self.assertNotEqual(moved.json()["backend"], pinned)
        new_token = moved.header("Set-Cookie")[0].split(";")[0]
        self.assertNotEqual(new_token, token)
        for _ in range(5):
            reply = yield session.fetch("/", headers={"Cookie": new_token})
            self.assertEqual(reply.json()["backend"], moved.json()["backend"])

    @inlineCallbacks
    def test_forged_cookie_is_replaced(self):
        a, b = self.backend("a"), self.backend("b")
        service = self.one_pool(a.url, b.url, pool_options="sticky = cookie SRV")
        port = self.port_of(service)
        names = []
        for forged in (f"127.0.0.1:{b.port}", "0" * 32, "b"):
            reply = yield fetch(port, "/", headers={"Cookie": f"SRV={forged}"})
            names.append(reply.json()["backend"])
            self.assertTrue(
                re.match(r"SRV=[0-9a-f]{32};", reply.header("Set-Cookie")[0])
            )
        # Round robin, not the backend the forged value names.
        self.assertEqual(names, ["a", "b", "a"])


class HashTests(IntegrationTest):
    @inlineCallbacks
    def test_header_key_keeps_a_client_on_one_backend(self):
        backends = [self.backend(name) for name in "abc"]
        service = self.one_pool(
            *(b.url for b in backends),
            pool_options="balance = hash\nhash_key = header:X-User",
        )
        port = self.port_of(service)
        seen = {}
        for user in ("ann", "bob", "cid", "dee", "eve", "fay"):
            names = set()
            for _ in range(4):
                reply = yield fetch(port, "/", headers={"X-User": user})
                names.add(reply.json()["backend"])
            self.assertEqual(len(names), 1, user)
            seen[user] = names.pop()
        self.assertGreater(len(set(seen.values())), 1)
