"""
The admin API over real HTTP: authentication, reading, changing the running
balancer (and what survives a restart), and Prometheus metrics.
"""

from __future__ import annotations

import hmac
import json
import os
import urllib.parse
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase

from l7lb.config import ConfigError, load
from l7lb.service import build, read_runtime_state
from tests.support import IntegrationTest, fetch
from tests.test_config import MINIMAL

TOKEN = "s3cret-token-for-tests-0123456789"


def _call(
    port: int, method: str, path: str, body: Any = None, token: str | None = TOKEN
):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method
    )
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            status = response.status
            kind = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        raw, status, kind = e.read(), e.code, e.headers.get("Content-Type", "")
    if "json" in kind:
        return status, json.loads(raw)
    return status, raw.decode()


class AdminTestCase(IntegrationTest):
    def start(
        self,
        extra: str = "",
        pool_extra: str = "",
        state_file: str | None = None,
        token: bool = True,
    ):
        self.a = self.backend("a")
        self.b = self.backend("b")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        token_line = ""
        if token:
            token_path = os.path.join(directory, "token")
            with open(token_path, "w") as f:
                f.write(TOKEN + "\n")
            token_line = f"token_file = {token_path}"
        self.state_path = state_file or os.path.join(directory, "state.json")
        self.ini = f"""
            [lb]
            listen = tcp:0:interface=127.0.0.1
            access_log = off
            [admin]
            listen = tcp:0:interface=127.0.0.1
            {token_line}
            state_file = {self.state_path}
            [pool:p]
            servers = {self.a.url}
            health_path = /health
            health_interval = 50ms
            {pool_extra}
            [route:all]
            pool = p
            {extra}
            """
        self.service = self.balancer(self.ini)
        self.port = self.port_of(self.service)
        listener = self.service.admin_listener
        assert listener is not None and listener.port is not None
        self.admin = listener.port.getHost().port

    def call(
        self, method: str, path: str, body: Any = None, token: str | None = TOKEN
    ) -> Deferred:
        return threads.deferToThread(_call, self.admin, method, path, body, token)


class AuthTests(AdminTestCase):
    @inlineCallbacks
    def test_token_required(self):
        self.start()
        for token in (None, "wrong", TOKEN + "x", ""):
            status, body = yield self.call("GET", "/pools", token=token)
            self.assertEqual(status, 401, token)
            self.assertEqual(body, {"error": "a valid bearer token is needed"})
        status, _ = yield self.call("GET", "/pools")
        self.assertEqual(status, 200)

    @inlineCallbacks
    def test_compared_in_constant_time(self):
        self.start()
        compared = []
        original = hmac.compare_digest

        def spy(a, b):
            compared.append((a, b))
            return original(a, b)

        self.patch(hmac, "compare_digest", spy)
        yield self.call("GET", "/stats", token="guess")
        self.assertEqual(compared, [(b"guess", TOKEN.encode())])


class AdminConfigTests(SynchronousTestCase):
    def test_no_token_means_loopback_only(self):
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "lb.ini")
        for listen, ok in [
            ("tcp:9901:interface=127.0.0.1", True),
            ("tcp6:9901:interface=\\:\\:1", True),
            ("unix:/tmp/l7lb-admin.sock", True),
            ("tcp:9901", False),
            ("tcp:9901:interface=0.0.0.0", False),
        ]:
            with open(path, "w") as f:
                f.write(MINIMAL + f"\n[admin]\nlisten = {listen}\n")
            if ok:
                self.assertIsNotNone(load(path).admin)
            else:
                with self.assertRaises(ConfigError) as caught:
                    load(path)
                self.assertIn(
                    "without token_file the admin API may only listen on loopback",
                    caught.exception.problems[0],
                )


class ReadTests(AdminTestCase):
    @inlineCallbacks
    def test_pools_routes_stats_config(self):
        self.start()
        yield fetch(self.port, "/x")
        yield self.until(
            lambda: (
                self.service.runtime.checkers[self.service.pools["p"].backends[0]].last
                is not None
            )
        )
        status, pools = yield self.call("GET", "/pools")
        self.assertEqual(status, 200)
        self.assertEqual(pools["pools"][0]["name"], "p")
        self.assertEqual(pools["pools"][0]["in_rotation"], 1)
        status, pool = yield self.call("GET", "/pools/p")
        backend = pool["backends"][0]
        self.assertEqual(backend["id"], f"127.0.0.1:{self.a.port}")
        self.assertEqual(
            (backend["state"], backend["weight"], backend["in_flight"]),
            ("in rotation", 1, 0),
        )
        self.assertEqual(backend["answered"], {"2xx": 1})
        self.assertEqual(backend["last_check"], "status 200")
        self.assertIsInstance(backend["last_latency_seconds"], float)
        status, missing = yield self.call("GET", "/pools/nope")
        self.assertEqual((status, missing), (404, {"error": "no pool named 'nope'"}))
        status, routes = yield self.call("GET", "/routes")
        self.assertEqual(
            routes["routes"],
            [
                {
                    "name": "all",
                    "matches": "every request",
                    "pool": "p",
                    "policy": "no rate limit",
                }
            ],
        )
        status, stats = yield self.call("GET", "/stats")
        self.assertEqual(stats["requests"], {"2xx": 1})
        status, config = yield self.call("GET", "/config")
        self.assertEqual(config["pool:p"]["servers"], self.a.url)
        self.assertNotIn(TOKEN, json.dumps(config))
        status, _ = yield self.call("GET", "/nothing")
        self.assertEqual(status, 404)


class ChangeTests(AdminTestCase):
    @inlineCallbacks
    def test_register_a_backend_and_a_route_that_take_traffic(self):
        self.start()
        status, body = yield self.call(
            "POST", "/pools/p/backends", {"url": self.b.url, "weight": 2}
        )
        self.assertEqual(status, 201)
        self.assertEqual(body["id"], f"127.0.0.1:{self.b.port}")
        names = set()
        for _ in range(4):
            reply = yield fetch(self.port, "/")
            names.add(reply.json()["backend"])
        self.assertEqual(names, {"a", "b"})
        # Registering again updates instead of duplicating.
        status, _ = yield self.call(
            "POST", "/pools/p/backends", {"url": self.b.url, "weight": 3}
        )
        self.assertEqual(status, 200)
        self.assertEqual(len(self.service.pools["p"].backends), 2)
        status, _ = yield self.call(
            "POST", "/pools", {"name": "only-b", "servers": [self.b.url]}
        )
        self.assertEqual(status, 201)
        status, _ = yield self.call(
            "POST", "/routes", {"name": "b", "path_prefix": "/b", "pool": "only-b"}
        )
        self.assertEqual(status, 201)
        for _ in range(3):
            reply = yield fetch(self.port, "/b/x")
            self.assertEqual(reply.json()["backend"], "b")
        status, _ = yield self.call("DELETE", "/routes/b")
        self.assertEqual(status, 200)
        reply = yield fetch(self.port, "/b/x")
        self.assertIn(
            reply.json()["backend"], ("a", "b")
        )  # back to the catch-all route

    @inlineCallbacks
    def test_bad_input_gets_the_check_messages_and_changes_nothing(self):
        self.start()
        before = (dict(self.service.pools), self.service.config)
        cases = [
            (
                "POST",
                "/pools/p/backends",
                {"url": "ftp://nope:1"},
                "is not a server URL",
            ),
            (
                "POST",
                "/pools/p/backends",
                {"url": self.b.url, "weight": 0},
                "weight: expected a number from 1 to 1000",
            ),
            (
                "POST",
                "/routes",
                {"name": "r", "pool": "missing"},
                "names pool 'missing'",
            ),
            (
                "POST",
                "/routes",
                {"name": "r", "pool": "p", "methods": "G(T"},
                "'G(T' is not an HTTP method name",
            ),
            (
                "POST",
                "/pools",
                {"name": "q"},
                "missing: a pool needs at least one server",
            ),
            (
                "PUT",
                f"/pools/p/backends/127.0.0.1:{self.a.port}/weight",
                {"weight": "heavy"},
                "expected a whole number",
            ),
        ]
        for method, path, body, message in cases:
            status, answer = yield self.call(method, path, body)
            self.assertEqual(status, 400, (path, answer))
            self.assertTrue(any(message in e for e in answer["errors"]), answer)
        status, answer = yield self.call(
            "POST", "/pools", {"name": "p", "servers": [self.b.url]}
        )
        self.assertEqual(status, 409)
        status, answer = yield self.call(
            "DELETE", f"/pools/p/backends/127.0.0.1:{self.a.port}"
        )
        self.assertEqual(status, 400)  # the last one
        self.assertEqual((dict(self.service.pools), self.service.config), before)
        self.assertFalse(os.path.exists(self.state_path))

    @inlineCallbacks
    def test_weight_and_removal(self):
        self.start(pool_extra="balance = weighted_round_robin")
        yield self.call("POST", "/pools/p/backends", {"url": self.b.url})
        status, body = yield self.call(
            "PUT", f"/pools/p/backends/127.0.0.1:{self.b.port}/weight", {"weight": 3}
        )
        self.assertEqual((status, body["weight"]), (200, 3))
        names = []
        for _ in range(8):
            reply = yield fetch(self.port, "/")
            names.append(reply.json()["backend"])
        self.assertEqual(names.count("b"), 6)
        encoded = urllib.parse.quote(self.b.url, safe="")
        status, _ = yield self.call("DELETE", f"/pools/p/backends/{encoded}")
        self.assertEqual(status, 200)
        for _ in range(3):
            reply = yield fetch(self.port, "/")
            self.assertEqual(reply.json()["backend"], "a")

    @inlineCallbacks
    def test_drain_lets_in_flight_finish_and_sends_new_elsewhere(self):
        self.start()
        yield self.call("POST", "/pools/p/backends", {"url": self.b.url})
        pool = self.service.pools["p"]
        slow = threads.deferToThread(_slow_get, self.port, "/hang")
        yield self.until(lambda: len(self.a.hanging) + len(self.b.hanging) == 1)
        busy = self.a if self.a.hanging else self.b
        other = self.b if busy is self.a else self.a
        status, body = yield self.call(
            "POST", f"/pools/p/backends/127.0.0.1:{busy.port}/drain"
        )
        self.assertEqual((status, body["draining"], body["in_flight"]), (200, True, 1))
        for _ in range(4):
            reply = yield fetch(self.port, "/")
            self.assertEqual(reply.json()["backend"], other.name)
        busy.hanging[0].write(b"finished")
        busy.hanging[0].finish()
        status, body = yield slow
        self.assertEqual((status, body), (200, b"finished"))
        drained = next(b for b in pool.backends if b.address.endswith(str(busy.port)))
        self.assertEqual(drained.inflight, 0)
        status, _ = yield self.call(
            "DELETE", f"/pools/p/backends/127.0.0.1:{busy.port}"
        )
        self.assertEqual(status, 200)

    @inlineCallbacks
    def test_changes_survive_a_restart(self):
        self.start()
        yield self.call("POST", "/pools/p/backends", {"url": self.b.url, "weight": 2})
        yield self.call(
            "POST", "/routes", {"name": "extra", "path_prefix": "/extra", "pool": "p"}
        )
        with open(self.state_path) as f:
            saved = json.load(f)
        self.assertIn("route:extra", saved["sections"])
        config = self.service.config
        state = read_runtime_state(config)
        restarted = build(state.config(config.source), reactor, state=state)
        self.assertEqual(
            [b.address for b in restarted.pools["p"].backends],
            [f"127.0.0.1:{self.a.port}", f"127.0.0.1:{self.b.port}"],
        )
        self.assertEqual([r.name for r in restarted.config.routes], ["all", "extra"])


def _slow_get(port: int, path: str):
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, response.read()


class MetricsTests(AdminTestCase):
    @inlineCallbacks
    def test_scraped_and_parsed(self):
        self.start("rate_limit = 1/h\nburst = 2")
        for _ in range(3):
            yield fetch(self.port, "/")
        status, text = yield self.call("GET", "/metrics")
        self.assertEqual(status, 200)
        families = {f.name: f for f in text_string_to_metric_families(text)}

        def value(name, **labels):
            for sample in families[name].samples:
                if (
                    sample.name.endswith(("_total", ""))
                    and all(sample.labels.get(k) == v for k, v in labels.items())
                    and sample.name in (name, name + "_total")
                ):
                    return sample.value
            return None

        backend = f"127.0.0.1:{self.a.port}"
        self.assertEqual(
            value("l7lb_requests", route="all", pool="p", backend=backend, code="2xx"),
            2,
        )
        self.assertEqual(
            value("l7lb_requests", route="all", pool="-", backend="-", code="4xx"), 1
        )
        self.assertEqual(value("l7lb_ratelimit_refused", route="all"), 1)
        self.assertEqual(value("l7lb_backend_up", pool="p", backend=backend), 1)
        self.assertEqual(value("l7lb_client_connections"), 0)
        self.assertGreater(
            value("l7lb_health_checks", pool="p", backend=backend, result="pass") or 0,
            0,
        )
        histogram = families["l7lb_request_duration_seconds"]
        counts = [s.value for s in histogram.samples if s.name.endswith("_count")]
        self.assertEqual(counts, [3])
        yield fetch(self.port, "/")
        status, text = yield self.call("GET", "/metrics")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        self.assertEqual(
            value("l7lb_requests", route="all", pool="-", backend="-", code="4xx"), 2
        )


class PrivateAPITests(AdminTestCase):
    """
    A worker's private API (see l7lb.supervisor) takes the whole runtime
    state with PUT /state; the public one does not.
    """

    @inlineCallbacks
    def test_state_only_on_the_private_api(self):
        from l7lb.admin import admin_site

        self.start()
        state = {"sections": {"pool:extra": {"servers": self.b.url}}, "removed": []}
        status, _ = yield self.call("PUT", "/state", state)
        self.assertEqual(status, 404)
        private = reactor.listenTCP(  # type: ignore[attr-defined]
            0, admin_site(self.service, private=True), interface="127.0.0.1"
        )
        self.addCleanup(private.stopListening)
        port = private.getHost().port
        status, body = yield threads.deferToThread(
            _call, port, "PUT", "/state", state, None
        )
        self.assertEqual((status, body), (200, {"applied": True}))
        self.assertIn("extra", self.service.pools)
        status, body = yield threads.deferToThread(
            _call,
            port,
            "PUT",
            "/state",
            {"sections": {"route:x": {"pool": "nowhere"}}},
            None,
        )
        self.assertEqual(status, 400)
        self.assertIn("names pool 'nowhere'", body["errors"][0])
