"""
The configuration file: values, defaults, and every problem reported at once.
"""

from __future__ import annotations

import ipaddress
import os
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from l7lb.balancing import STRATEGIES
from l7lb.config import (
    BALANCE_STRATEGIES,
    Config,
    ConfigError,
    HealthCheckConfig,
    RateLimitConfig,
    ServerConfig,
    describe,
    load,
)
from tests.tlssupport import Certificates

MINIMAL = """
[lb]
listen = tcp:8080:interface=127.0.0.1

[pool:a]
servers = http://127.0.0.1:8081

[route:all]
pool = a
"""


class ConfigFileMixin:
    def write(self, text: str, name: str = "lb.ini") -> str:
        directory = self.mktemp()  # type: ignore[attr-defined]
        os.makedirs(directory)
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        return path

    def load_text(self, text: str) -> Config:
        return load(self.write(text))

    def problems(self, text: str) -> list[str]:
        path = self.write(text)
        try:
            load(path)
        except ConfigError as e:
            return [p.replace(path, "FILE") for p in e.problems]
        raise AssertionError("the configuration was accepted")


class LoadTests(ConfigFileMixin, SynchronousTestCase):
    def test_minimal_defaults(self):
        config = self.load_text(MINIMAL)
        self.assertEqual(config.lb.listen, ("tcp:8080:interface=127.0.0.1",))
        self.assertEqual(config.lb.access_log, "-")
        self.assertEqual(config.lb.max_header_size, 16 * 1024)
        self.assertEqual(config.lb.max_uri_length, 8 * 1024)
        self.assertEqual(config.lb.max_body_size, 100 * 1024 * 1024)
        pool = config.pool("a")
        self.assertEqual(pool.balance, "round_robin")
        self.assertEqual(
            pool.servers,
            (ServerConfig("http://127.0.0.1:8081", "http", "127.0.0.1", 8081),),
        )
        self.assertIsNone(pool.health)
        self.assertEqual((pool.connect_timeout, pool.response_timeout), (3.0, 30.0))
        self.assertEqual(
            (pool.max_fails, pool.fail_timeout, pool.fail_on_5xx, pool.retries),
            (3, 10.0, False, 1),
        )
        self.assertEqual(
            (
                pool.max_connections,
                pool.max_queue,
                pool.retry_budget,
                pool.idle_timeout,
            ),
            (0, 0, 0.2, 60.0),
        )
        lb = config.lb
        self.assertEqual(
            (lb.client_header_timeout, lb.client_body_timeout, lb.max_headers),
            (10.0, 120.0, 100),
        )
        route = config.routes[0]
        self.assertEqual(
            (route.name, route.pool, route.path_prefix), ("all", "a", None)
        )

    def test_full_schema(self):
        directory = self.mktemp()
        Certificates(os.path.join(directory, "tls")).issue("example", "example.test")
        path = os.path.join(directory, "lb.ini")
        with open(path, "w") as f:
            f.write(
                textwrap.dedent(
                    """
                    [lb]
                    listen = tcp:8080:interface=127.0.0.1 tcp:8081:interface=127.0.0.1
                    tls_listen = tcp:8443:interface=127.0.0.1
                    access_log = access.log   ; relative to this file
                    trusted_proxies = 10.0.0.0/8 192.168.1.1 # a comment
                    max_header_size = 32KiB
                    max_uri_length = 4KiB
                    max_body_size = 10MiB
                    keepalive_timeout = 2m
                    tls_handshake_timeout = 5s

                    [tls]
                    certificates = tls/example.pem
                    min_version = TLSv1.3
                    alpn = http/1.1

                    [pool:a]
                    servers =
                        http://127.0.0.1:8081
                        http://[::1]:8082 weight=3
                        http://backend.internal:80
                    balance = weighted_round_robin
                    health_path = /health
                    health_interval = 250ms
                    health_timeout = 1s
                    health_status = 200-299
                    rise = 1
                    fall = 5
                    connect_timeout = 500ms
                    response_timeout = 1m
                    keepalive_connections = 32
                    keepalive_timeout = 10s
                    tls_verify = off

                    [route:api-a]
                    path_prefix = /apiA/
                    host = *.Example.com
                    methods = get POST
                    header = X-Canary: 1
                    pool = a
                    strip_prefix = on
                    rate_limit = 6000/m
                    burst = 20
                    rate_limit_key = header:X-Api-Key
                    redirect_https = on
                    hsts = 180d preload
                    """
                )
            )
        config = load(path)
        self.assertEqual(len(config.lb.listen), 2)
        self.assertEqual(
            config.lb.access_log,
            os.path.join(os.path.abspath(directory), "access.log"),
        )
        self.assertEqual(
            config.lb.trusted_proxies,
            (
                ipaddress.ip_network("10.0.0.0/8"),
                ipaddress.ip_network("192.168.1.1/32"),
            ),
        )
        self.assertEqual(
            (
                config.lb.max_header_size,
                config.lb.max_uri_length,
                config.lb.max_body_size,
            ),
            (32768, 4096, 10 * 1024 * 1024),
        )
        self.assertEqual(config.lb.keepalive_timeout, 120.0)
        self.assertEqual(config.lb.tls_handshake_timeout, 5.0)
        assert config.tls is not None
        self.assertEqual(config.tls.min_version, "TLSv1.3")
        self.assertEqual(config.tls.alpn, ("http/1.1",))
        pool = config.pool("a")
        self.assertEqual([s.weight for s in pool.servers], [1, 3, 1])
        self.assertEqual(pool.servers[1].host, "::1")
        self.assertEqual(pool.servers[1].address, "[::1]:8082")
        self.assertEqual(
            pool.health, HealthCheckConfig("/health", 0.25, 1.0, 200, 299, 1, 5)
        )
        self.assertEqual(
            (pool.keepalive_connections, pool.keepalive_timeout), (32, 10.0)
        )
        self.assertFalse(pool.tls_verify)
        route = config.routes[0]
        self.assertEqual(route.path_prefix, b"/apiA")
        self.assertEqual(route.host, "*.example.com")
        self.assertEqual(route.methods, frozenset({b"GET", b"POST"}))
        self.assertEqual(route.header, (b"x-canary", b"1"))
        self.assertTrue(route.strip_prefix)
        self.assertTrue(route.redirect_https)
        self.assertEqual(route.hsts, b"max-age=15552000; preload")
        self.assertEqual(
            route.rate_limit,
            RateLimitConfig(100.0, 20, "header:x-api-key", "6000/m", 6000, 60),
        )
        # Parsed but not acted on yet: said, not silently ignored.
        notices = "\n".join(config.notices)
        self.assertIn(
            "[pool:a] tls_verify: has no effect without https:// servers", notices
        )

    def test_servers_on_one_line(self):
        config = self.load_text(
            MINIMAL.replace(
                "servers = http://127.0.0.1:8081",
                "servers = http://127.0.0.1:8081 weight=2 http://127.0.0.1:8082",
            )
        )
        self.assertEqual(
            [(s.port, s.weight) for s in config.pool("a").servers],
            [(8081, 2), (8082, 1)],
        )

    def test_rate_limit_default_burst_is_one_second(self):
        config = self.load_text(MINIMAL + "rate_limit = 2.5/s\n")
        limit = config.routes[0].rate_limit
        assert limit is not None
        self.assertEqual((limit.rate, limit.burst, limit.key), (2.5, 3, "client_ip"))

    def test_strategies_in_step_with_balancing(self):
        self.assertEqual(set(BALANCE_STRATEGIES), set(STRATEGIES))

    def test_notices_for_ineffective_keys(self):
        config = self.load_text(
            MINIMAL.replace("pool = a", "pool = a\nstrip_prefix = on\nburst = 5")
            + "\n[pool:unused]\nservers = http://127.0.0.1:9\nhealth_interval = 1s\n"
            + "\n[pool:weighted]\nservers = http://127.0.0.1:1 weight=2\n"
        )
        notices = "\n".join(config.notices)
        self.assertIn(
            "[route:all] strip_prefix: has no effect without path_prefix", notices
        )
        self.assertIn("[route:all] burst: has no effect without rate_limit", notices)
        self.assertIn(
            "[pool:unused] health_interval: has no effect without health_path", notices
        )
        self.assertIn("[pool:unused]: no route sends requests here", notices)
        self.assertIn("weights have no effect with balance = round_robin", notices)


class ProblemTests(ConfigFileMixin, SynchronousTestCase):
    def test_every_problem_at_once(self):
        problems = self.problems(
            """
            [lb]
            listen = nonsense:1
            max_body_size = lots
            colour = blue

            [pool:a]
            servers = http://127.0.0.1:80 ftp://x:1
            balance = random
            health_path = /h
            health_interval = 10
            rise = 0
            health_status = 500-200

            [route:r]
            pool = missing
            path_prefix = apiA
            methods = GET,POST
            header = nocolon
            host = bad_host!
            rate_limit = fast

            [route:no-pool]
            path_prefix = /x

            [frontend]
            """
        )
        expected = [
            "FILE: [lb] colour: unknown key",
            "FILE: [lb] listen: 'nonsense:1': expected a tcp, tcp6 or unix endpoint",
            "FILE: [lb] max_body_size: expected a size like 16KiB or 10MiB, got 'lots'",
            "FILE: [pool:a] servers: 'ftp://x:1' is not a server URL",
            "FILE: [pool:a] balance: expected one of round_robin, weighted_round_robin, "
            "least_connections, power_of_two, hash, got 'random'",
            "FILE: [pool:a] health_status: expected statuses within 100-599, low first",
            "FILE: [pool:a] health_interval: expected a duration like 250ms, 10s or 2m, got '10'",
            "FILE: [pool:a] rise: expected a number from 1 to 1000, got 0",
            "FILE: [route:r] path_prefix: expected a path starting with /, got 'apiA'",
            "FILE: [route:r] host: expected a host name",
            "FILE: [route:r] methods: 'GET,POST' is not an HTTP method name",
            "FILE: [route:r] header: expected 'Header-Name: value', got 'nocolon'",
            "FILE: [route:r] rate_limit: expected a rate like 100/s or 6000/m, got 'fast'",
            "FILE: [route:no-pool] pool: missing: a route must name a pool",
            "FILE: [frontend]: unknown section",
            "FILE: [route:r] pool: names pool 'missing', which has no [pool:missing] section",
        ]
        self.assertEqual(len(problems), len(expected), "\n".join(problems))
        for line, start in zip(problems, expected, strict=True):
            self.assertTrue(line.startswith(start), f"{line!r} should start {start!r}")
            self.assertNotIn("\n", line)

    def test_missing_file(self):
        try:
            load("/nonexistent/lb.ini")
        except ConfigError as e:
            self.assertEqual(
                e.problems,
                [
                    "/nonexistent/lb.ini: cannot read the file: No such file or directory"
                ],
            )
        else:
            self.fail("accepted a missing file")

    def test_syntax_error(self):
        problems = self.problems("listen = before any section\n")
        self.assertEqual(len(problems), 1)
        self.assertTrue(
            problems[0].startswith("FILE: File contains no section headers")
        )

    def test_duplicate_key(self):
        problems = self.problems(MINIMAL + "pool = b\n")
        self.assertEqual(len(problems), 1)
        self.assertIn(
            "option 'pool' in section 'route:all' already exists", problems[0]
        )

    def test_missing_lb_and_routes(self):
        problems = self.problems("[pool:a]\nservers = http://127.0.0.1:1\n")
        self.assertEqual(
            problems,
            [
                "FILE: [lb]: missing section",
                "FILE: no [route:NAME] section: every request would get 404",
            ],
        )

    def test_no_listener(self):
        problems = self.problems(
            MINIMAL.replace("listen = tcp:8080:interface=127.0.0.1", "")
        )
        self.assertEqual(
            problems, ["FILE: [lb] listen: no listen or tls_listen endpoint given"]
        )

    def test_server_mistakes(self):
        for servers, message in [
            ("weight=2", "'weight=2' comes before any server URL"),
            (
                "http://127.0.0.1:80 weight=0",
                "weight: expected a number from 1 to 1000, got 0",
            ),
            ("http://127.0.0.1:80 backup=1", "unknown server option 'backup'"),
            ("http://127.0.0.1:80 http://127.0.0.1:80", "is listed twice"),
            ("http://127.0.0.1:99999", "port 99999 is out of range"),
            ("http://127.0.0.1", "is not a server URL"),
            ("http://[fe80::1::2]:80", "is not an IPv6 address"),
        ]:
            problems = self.problems(MINIMAL.replace("http://127.0.0.1:8081", servers))
            self.assertEqual(len(problems), 1, problems)
            self.assertIn(message, problems[0])
            self.assertTrue(problems[0].startswith("FILE: [pool:a] servers: "))

    def test_unreadable_certificate(self):
        problems = self.problems(
            MINIMAL.replace("[lb]\n", "[lb]\ntls_listen = tcp:8443\n")
            + "\n[tls]\ncertificates = missing.pem\n"
        )
        self.assertEqual(len(problems), 1)
        self.assertIn("[tls] certificates: cannot read", problems[0])

    def test_tls_listen_needs_tls_section(self):
        problems = self.problems(
            MINIMAL.replace("[lb]\n", "[lb]\ntls_listen = tcp:8443\n")
        )
        self.assertEqual(
            problems, ["FILE: [lb] tls_listen: needs a [tls] section with certificates"]
        )

    def test_path_prefix_must_be_safe(self):
        problems = self.problems(MINIMAL + "path_prefix = /a/../../b\n")
        self.assertEqual(len(problems), 1)
        self.assertIn("is not a usable path: the path climbs above /", problems[0])


class DescribeTests(ConfigFileMixin, SynchronousTestCase):
    def test_summary(self):
        config = self.load_text(
            MINIMAL
            + "path_prefix = /apiA\nstrip_prefix = on\n"
            + "[pool:b]\nservers = http://127.0.0.1:1 weight=2\n"
            + "balance = weighted_round_robin\nhealth_path = /health\n"
        )
        lines = list(describe(config))
        self.assertTrue(lines[0].endswith("configuration is valid"))
        self.assertIn("listen      tcp:8080:interface=127.0.0.1 (http)", lines)
        self.assertIn("pool        a: round_robin, no active health checks", lines)
        self.assertIn(
            "pool        b: weighted_round_robin, health GET /health every 10s", lines
        )
        self.assertIn("              http://127.0.0.1:1 weight=2", lines)
        self.assertIn("route       all: path /apiA (prefix stripped) -> pool a", lines)
        self.assertIn("notice      [pool:b]: no route sends requests here", lines)
        self.assertIn("              no rate limit", lines)

    def test_effective_policies(self):
        config = self.load_text(
            MINIMAL
            + "allow = 10.0.0.0/8\n"
            + "\n[route:admin]\npath_prefix = /admin\ndeny = all\nrate_limit = off\n"
            + "\n[ratelimit]\nrate_limit = 100/s\nburst = 200\n"
        )
        lines = list(describe(config))
        self.assertIn(
            "              rate limit 100/s burst 200 by client_ip; allow 10.0.0.0/8",
            lines,
        )
        self.assertIn("route       admin: path /admin -> nowhere", lines)
        self.assertIn("              no rate limit; deny all", lines)


class StrictnessTests(ConfigFileMixin, SynchronousTestCase):
    """
    What used to pass --check and then fail at start now fails --check.
    """

    def one_problem(self, text: str) -> str:
        problems = self.problems(text)
        self.assertEqual(len(problems), 1, problems)
        return problems[0]

    def test_bad_host_names(self):
        for host, message in [
            ("a..b", "is not a valid host name"),
            ("x" * 64 + ".test", "is not a valid host name"),
            ("-a.test", "is not a valid host name"),
            ("1.2.3.999", "is not a valid IPv4 address"),
            ("[1.2.3.4]", "is not an IPv6 address"),
        ]:
            problem = self.one_problem(
                MINIMAL.replace("127.0.0.1:8081", f"{host}:8081")
            )
            self.assertIn(message, problem)

    def test_weight_twice(self):
        problem = self.one_problem(MINIMAL.replace("8081", "8081 weight=2 weight=3"))
        self.assertIn("weight is given twice", problem)

    def test_non_ascii_digits(self):
        problem = self.one_problem(
            MINIMAL.replace("[lb]\n", "[lb]\nmax_body_size = \u0661\u0662\n")
        )
        self.assertIn("[lb] max_body_size: expected a size", problem)

    def test_unwritable_access_log(self):
        problem = self.one_problem(
            MINIMAL.replace("[lb]\n", "[lb]\naccess_log = /nonexistent/dir/x.log\n")
        )
        self.assertIn("[lb] access_log: cannot write /nonexistent/dir/x.log", problem)

    def test_endpoints_checked(self):
        for listen, message in [
            (
                "ssl:8443:privateKey=/etc/passwd",
                "expected a tcp, tcp6 or unix endpoint",
            ),
            ("tcp:99999", "the port must be 0-65535"),
            ("tcp:80:interface=not-an-ip", "interface must be an IP address"),
            ("tcp:80:interface=\\:\\:1", "an IPv6 interface needs tcp6"),
            ("tcp:80:backlog=-5", "backlog must be a positive number"),
        ]:
            problem = self.one_problem(
                MINIMAL.replace("tcp:8080:interface=127.0.0.1", listen)
            )
            self.assertIn(message, problem)
        config = self.load_text(
            MINIMAL.replace(
                "tcp:8080:interface=127.0.0.1",
                "tcp6:8080:interface=\\:\\:1 unix:/tmp/l7lb.sock",
            )
        )
        self.assertEqual(len(config.lb.listen), 2)


class PolicyKeyTests(ConfigFileMixin, SynchronousTestCase):
    def test_ratelimit_section_inherited_and_switched_off(self):
        config = self.load_text(
            MINIMAL
            + "path_prefix = /a\n"
            + "\n[route:b]\npool = a\npath_prefix = /b\nrate_limit = off\n"
            + "\n[route:c]\npool = a\npath_prefix = /c\nburst = 7\n"
            + "\n[route:d]\npool = a\npath_prefix = /d\nrate_limit = 2.5/s\n"
            + "\n[ratelimit]\nrate_limit = 6000/m\nburst = 50\nrate_limit_key = header:X-Key\nmax_keys = 500\n"
        )
        limits = {r.name: r.rate_limit for r in config.routes}
        self.assertEqual(
            limits["all"],
            RateLimitConfig(100.0, 50, "header:x-key", "6000/m", 6000, 60),
        )
        self.assertIsNone(limits["b"])
        assert limits["c"] is not None and limits["d"] is not None
        self.assertEqual((limits["c"].burst, limits["c"].key), (7, "header:x-key"))
        self.assertEqual(
            (
                limits["d"].rate,
                limits["d"].burst,
                limits["d"].quota,
                limits["d"].window,
            ),
            (2.5, 3, 5, 2),
        )
        self.assertEqual(config.ratelimit_max_keys, 500)

    def test_balancing_keys(self):
        config = self.load_text(
            MINIMAL.replace(
                "servers = http://127.0.0.1:8081",
                "servers = http://127.0.0.1:8081\nbalance = hash\nhash_key = cookie:session\n"
                "sticky = cookie SRV\n",
            )
            + "\n[pool:b]\nservers = http://127.0.0.1:1\nbalance = power_of_two\nslow_start = 30s\n"
        )
        a, b = config.pool("a"), config.pool("b")
        self.assertEqual(
            (a.balance, a.hash_key, a.sticky_cookie), ("hash", "cookie:session", "SRV")
        )
        self.assertEqual((b.balance, b.slow_start), ("power_of_two", 30.0))
        self.assertIn(
            "without [lb] secret_file, sticky cookies change", "\n".join(config.notices)
        )

    def test_access_keys(self):
        config = self.load_text(
            MINIMAL
            + "allow = 10.0.0.0/8 2001:db8::/32\ndeny = 10.6.6.6\n"
            + "\n[route:admin]\npath_prefix = /admin\ndeny = all\n"
        )
        rule = config.routes[0].access
        assert rule is not None
        self.assertEqual(len(rule.allow), 2)
        self.assertEqual([str(n) for n in rule.deny], ["10.6.6.6/32"])
        admin = config.routes[1]
        self.assertIsNone(admin.pool)
        assert admin.access is not None
        self.assertTrue(admin.access.deny_all)

    def test_policy_mistakes(self):
        for extra, message in [
            ("sticky = SRV\n", "expected 'cookie NAME'"),
            ("hash_key = ip\n", "expected client_ip, header:NAME or cookie:NAME"),
            ("slow_start = 30\n", "expected a duration"),
        ]:
            problems = self.problems(
                MINIMAL.replace(
                    "servers = http://127.0.0.1:8081",
                    "servers = http://127.0.0.1:8081\n" + extra,
                )
            )
            self.assertEqual(len(problems), 1, problems)
            self.assertIn(message, problems[0])
        problems = self.problems(MINIMAL + "allow = everyone\n")
        self.assertIn("is not an IP address or CIDR block", problems[0])
        problems = self.problems(MINIMAL.replace("pool = a", "path_prefix = /x"))
        self.assertIn("missing: a route must name a pool (or deny = all)", problems[0])
        problems = self.problems(
            MINIMAL + "rate_limit = 1/s\nrate_limit_key = cookie:x\n"
        )
        self.assertIn("expected global, client_ip or header:NAME", problems[0])


class ResilienceKeyTests(ConfigFileMixin, SynchronousTestCase):
    def test_keys(self):
        config = self.load_text(
            MINIMAL.replace(
                "[lb]\n",
                "[lb]\nclient_header_timeout = 2s\nclient_body_timeout = 30s\nmax_connections = 1000\nmax_connections_per_ip = 20\nmax_headers = 50\nsend_timeout = 20s\n",
            ).replace(
                "servers = http://127.0.0.1:8081",
                "servers = http://127.0.0.1:8081\nmax_fails = 5\nfail_timeout = 30s\nfail_on_5xx = on\n"
                "max_connections = 100\npool_max_connections = 300\nmax_queue = 50\nqueue_timeout = 2s\n"
                "retries = 3\nretry_budget = 10%\nidle_timeout = 15s\n",
            )
        )
        pool, lb = config.pool("a"), config.lb
        self.assertEqual(
            (
                pool.max_fails,
                pool.fail_timeout,
                pool.fail_on_5xx,
                pool.max_connections,
                pool.pool_max_connections,
            ),
            (5, 30.0, True, 100, 300),
        )
        self.assertEqual(
            (
                pool.max_queue,
                pool.queue_timeout,
                pool.retries,
                pool.retry_budget,
                pool.idle_timeout,
            ),
            (50, 2.0, 3, 0.1, 15.0),
        )
        self.assertEqual(
            (
                lb.client_header_timeout,
                lb.client_body_timeout,
                lb.max_connections,
                lb.max_connections_per_ip,
                lb.max_headers,
                lb.send_timeout,
            ),
            (2.0, 30.0, 1000, 20, 50, 20.0),
        )

    def test_mistakes(self):
        for extra, message in [
            ("retry_budget = 20\n", "expected a percentage like 20%"),
            ("retries = 11\n", "expected a number from 0 to 10"),
            ("max_queue = -1\n", "expected a whole number"),
        ]:
            problems = self.problems(
                MINIMAL.replace(
                    "servers = http://127.0.0.1:8081",
                    "servers = http://127.0.0.1:8081\n" + extra,
                )
            )
            self.assertEqual(len(problems), 1, problems)
            self.assertIn(message, problems[0])


class WorkersKeyTests(ConfigFileMixin, SynchronousTestCase):
    def test_values(self):
        from l7lb.config import cores

        self.assertEqual(self.load_text(MINIMAL).lb.workers, 1)
        with_workers = MINIMAL.replace("[lb]", "[lb]\nworkers = {}")
        self.assertEqual(self.load_text(with_workers.format("4")).lb.workers, 4)
        self.assertEqual(
            self.load_text(with_workers.format("auto")).lb.workers, cores()
        )
        self.assertEqual(cores(), len(os.sched_getaffinity(0)))

    def test_mistakes(self):
        for value in ("0", "-1", "two", "1025", "2.5", ""):
            problems = self.problems(
                MINIMAL.replace("[lb]", f"[lb]\nworkers = {value}")
            )
            self.assertEqual(
                problems,
                [
                    f"FILE: [lb] workers: expected auto or a number from 1 to 1024, "
                    f"got {value!r}"
                ],
            )

    def test_listeners_must_be_shareable(self):
        from l7lb.config import shareable_endpoint

        for description, ok in [
            ("tcp:8080:interface=127.0.0.1", True),
            ("tcp6:8080:interface=\\:\\:1", True),
            ("unix:/run/l7lb.sock", True),
            ("ssl:443", False),
            ("systemd:domain=INET:index=0", False),
        ]:
            self.assertEqual(shareable_endpoint(description), ok, description)

    def test_described(self):
        config = self.load_text(MINIMAL.replace("[lb]", "[lb]\nworkers = 3"))
        self.assertIn("workers     3 processes sharing the listeners", describe(config))
        self.assertIn("workers     1 (one process)", describe(self.load_text(MINIMAL)))
