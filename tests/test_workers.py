"""
C{[lb] workers = N}: a real C{twistd -n l7lb} supervising worker processes
(requests served by every worker, a killed worker replaced, SIGHUP passed
on, a new generation for new listeners, SIGTERM draining, metrics merged,
admin changes reaching every worker, rate limits divided), and unit tests
of the pieces: the restart delay, the merges of the admin API, the
adopted-socket seam of the balancer service.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from l7lb.config import load
from l7lb.fleetadmin import agree, merge_metrics, merge_pool, merge_pools, merge_stats
from l7lb.service import AdoptedEndpoint, BalancerService
from l7lb.supervisor import START_ATTEMPTS, Supervisor, restart_delay
from l7lb.worker import WorkerOptions
from tests.support import IntegrationTest, fetch

TOKEN = "workers-test-token-0123456789abcdef"


def poll(predicate: Callable[[], Any], seconds: float = 15.0) -> Any:
    """
    Ask until C{predicate} gives something true, or fail after C{seconds}.
    """
    deadline = time.monotonic() + seconds
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {seconds}s: {predicate}")
        time.sleep(0.02)


class Backend:
    """
    A backend in a thread: answers JSON naming itself; C{/slow} waits until
    C{release} is set.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.release = threading.Event()
        self.slow_started = threading.Event()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path.endswith("/slow"):
                    backend.slow_started.set()
                    backend.release.wait(20)
                body = json.dumps({"backend": backend.name}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, args=(0.05,), daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class Balancer:
    """
    C{twistd -n l7lb} in a subprocess; its output collected as it comes.
    """

    def __init__(self, test: SynchronousTestCase, ini: str) -> None:
        twistd = shutil.which("twistd", path=os.path.dirname(sys.executable))
        if twistd is None:
            test.skipTest("twistd is not installed next to this Python")
        directory = os.path.abspath(test.mktemp())
        os.makedirs(directory)
        self.directory = directory
        with open(os.path.join(directory, "token"), "w") as f:
            f.write(TOKEN + "\n")
        self.path = os.path.join(directory, "lb.ini")
        self.write(ini)
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [twistd, "--nodaemon", "--pidfile=", "l7lb", "--config", self.path],
            cwd=directory,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        test.addCleanup(self.kill)
        self.port = self.listener_port("tcp:0:interface=127.0.0.1")
        self.admin = int(
            self.poll(
                lambda: self.find(
                    r"ListenerService#info\] listening on \S+ \(.*port=(\d+)\)"
                )
            )
        )
        self.poll(lambda: len(self.stats().get("per_worker", {})) == 2)

    def poll(self, predicate: Callable[[], Any], seconds: float = 15.0) -> Any:
        """
        L{poll}, with the balancer's last output in the failure.
        """
        try:
            return poll(predicate, seconds)
        except AssertionError as e:
            output = "".join(self.lines[-40:])
            raise AssertionError(f"{e}\n--- balancer output:\n{output}") from None

    def write(self, ini: str) -> None:
        with open(self.path, "w") as f:
            f.write(textwrap.dedent(ini))

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.decode("utf-8", "replace"))

    def find(self, pattern: str) -> str | None:
        for line in list(self.lines):
            match = re.search(pattern, line)
            if match:
                return match.group(1)
        return None

    def count(self, pattern: str) -> int:
        return sum(1 for line in list(self.lines) if re.search(pattern, line))

    def listener_port(self, description: str) -> int:
        pattern = rf"listening on {re.escape(description)} \(.*port=(\d+)\)\) for the"
        return int(self.poll(lambda: self.find(pattern)))

    def admin_call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.admin}{path}", data=data, method=method
        )
        request.add_header("Authorization", f"Bearer {TOKEN}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                raw, status = response.read(), response.status
                kind = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            raw, status, kind = e.read(), e.code, e.headers.get("Content-Type", "")
        except OSError:
            return 0, None
        return status, json.loads(raw) if "json" in kind else raw.decode()

    def stats(self) -> dict[str, Any]:
        status, body = self.admin_call("GET", "/stats")
        return body if status == 200 else {}

    def metrics(self, name: str, **labels: str) -> dict[str, float]:
        """
        The samples of C{name} matching C{labels}, added up per worker.
        """
        status, text = self.admin_call("GET", "/metrics")
        assert status == 200, (status, text)
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    worker = sample.labels.get("worker", "")
                    values[worker] = values.get(worker, 0) + sample.value
        return values

    def get(self, path: str, port: int | None = None) -> tuple[int, dict[str, Any]]:
        connection = http.client.HTTPConnection(
            "127.0.0.1", port or self.port, timeout=20
        )
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            return response.status, json.loads(body) if response.status == 200 else {}
        finally:
            connection.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by a dead parent's reaper) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class WorkersTests(SynchronousTestCase):
    """
    One supervisor with two workers, taken through its life (one run, since
    starting the processes is most of the cost).
    """

    def test_workers(self):
        self.a, self.b, self.c = Backend("a"), Backend("b"), Backend("c")
        for backend in (self.a, self.b, self.c):
            self.addCleanup(backend.stop)
        self.base = f"""
            [lb]
            listen = tcp:0:interface=127.0.0.1
            access_log = off
            workers = 2
            drain_timeout = 20s
            [admin]
            listen = tcp:0:interface=127.0.0.1
            token_file = token
            state_file = state.json
            [pool:p]
            servers = {self.a.url}
            [pool:q]
            servers = {self.b.url}
            [route:all]
            pool = p
            [route:limited]
            path_prefix = /limited
            pool = p
            rate_limit = 1/h
            burst = 4
            rate_limit_key = global
            """
        self.balancer = Balancer(self, self.base)
        self.both_workers_serve()
        self.metrics_merged()
        self.rate_limits_divided()
        self.changes_reach_every_worker()
        self.killed_worker_replaced()
        self.hangup_passed_on()
        self.new_listener_new_generation()
        self.terminate_drains()

    def both_workers_serve(self):
        balancer = self.balancer

        def both_serve() -> bool:
            for _ in range(4):
                self.assertEqual(balancer.get("/x"), (200, {"backend": "a"}))
            served = balancer.metrics("l7lb_requests_total", route="all")
            return set(served) == {"1", "2"}

        balancer.poll(both_serve)

    def metrics_merged(self):
        status, text = self.balancer.admin_call("GET", "/metrics")
        self.assertEqual(status, 200)
        helps = re.findall(r"^# HELP (\S+)", text, re.M)
        self.assertEqual(len(helps), len(set(helps)))
        self.assertEqual(helps, re.findall(r"^# TYPE (\S+)", text, re.M))
        families = {f.name: f for f in text_string_to_metric_families(text)}
        self.assertEqual(families["l7lb_workers"].samples[0].value, 2)
        self.assertEqual(families["l7lb_worker_restarts"].samples[0].value, 0)
        self.assertEqual(
            {s.labels["worker"] for s in families["l7lb_client_connections"].samples},
            {"1", "2"},
        )

    def rate_limits_divided(self):
        """
        A burst of 4 is 2 per worker: each worker allows 2, then refuses.
        """
        balancer = self.balancer
        answers: list[int] = []

        def both_refused() -> bool:
            for _ in range(6):
                answers.append(balancer.get("/limited")[0])
            refused = balancer.metrics("l7lb_ratelimit_refused_total")
            return len([w for w, n in refused.items() if n > 0]) == 2

        balancer.poll(both_refused)
        self.assertEqual(answers.count(200), 4)
        self.assertEqual(
            balancer.metrics("l7lb_ratelimit_allowed_total"), {"1": 2.0, "2": 2.0}
        )

    def changes_reach_every_worker(self):
        """
        A backend registered through the supervisor reaches every worker;
        the state file is written once, by the supervisor.
        """
        balancer, b, c = self.balancer, self.b, self.c
        status, body = balancer.admin_call("POST", "/pools/q/backends", {"url": c.url})
        self.assertEqual(status, 201, body)
        self.assertEqual(body["workers"], {"1": "applied", "2": "applied"})
        self.assertEqual(
            balancer.metrics("l7lb_backend_up", backend=f"127.0.0.1:{c.port}"),
            {"1": 1.0, "2": 1.0},
        )
        with open(os.path.join(balancer.directory, "state.json")) as f:
            self.assertIn(c.url, f.read())
        status, pool = balancer.admin_call("GET", "/pools/q")
        self.assertEqual(status, 200)
        self.assertEqual(pool["workers"], 2)
        self.assertEqual(
            [backend["id"] for backend in pool["backends"]],
            [f"127.0.0.1:{b.port}", f"127.0.0.1:{c.port}"],
        )
        status, body = balancer.admin_call(
            "POST", "/pools/q/backends", {"url": "ftp://x:1"}
        )
        self.assertEqual(status, 400)
        self.assertIn("is not a server URL", body["errors"][0])
        status, routes = balancer.admin_call("GET", "/routes")
        self.assertEqual([r["name"] for r in routes["routes"]], ["limited", "all"])

    def killed_worker_replaced(self):
        """
        A worker killed outright is replaced; the other serves meanwhile.
        """
        balancer = self.balancer
        pids = {w: s["pid"] for w, s in balancer.stats()["per_worker"].items()}
        os.kill(pids["1"], signal.SIGKILL)
        for _ in range(10):
            self.assertEqual(balancer.get("/x")[0], 200)

        def replaced() -> bool:
            now = balancer.stats().get("per_worker", {})
            new = now.get("1", {}).get("pid") not in (None, pids["1"])
            return new and len(now) == 2

        balancer.poll(replaced)
        self.assertEqual(balancer.metrics("l7lb_worker_restarts_total"), {"": 1.0})
        self.assertEqual(
            balancer.count(r"worker 1 \(pid \d+\) was killed by SIGKILL"), 1
        )
        # The new worker runs with the runtime changes made before it.
        self.assertEqual(
            balancer.metrics("l7lb_backend_up", backend=f"127.0.0.1:{self.c.port}"),
            {"1": 1.0, "2": 1.0},
        )

    def hangup_passed_on(self):
        """
        SIGHUP: the supervisor checks the file and passes it on to each
        worker; a file with problems stops at the supervisor.
        """
        balancer, base = self.balancer, self.base
        reloaded = balancer.count(r"worker \d\] configuration reloaded")
        balancer.write(base + "[route:b]\npath_prefix = /b\npool = q\n")
        balancer.process.send_signal(signal.SIGHUP)
        balancer.poll(
            lambda: (
                balancer.count(r"worker \d\] configuration reloaded") == reloaded + 2
            )
        )
        for _ in range(6):
            status, body = balancer.get("/b/x")
            self.assertEqual(status, 200)
            self.assertIn(body["backend"], ("b", "c"))
        balancer.write(base + "[route:b]\npool = nowhere\n")
        balancer.process.send_signal(signal.SIGHUP)
        balancer.poll(lambda: balancer.find(r"(reload refused: .*'nowhere')"))
        self.assertEqual(balancer.get("/b/x")[0], 200)
        self.assertEqual(
            balancer.count(r"worker \d\] configuration reloaded"), reloaded + 2
        )

    def new_listener_new_generation(self):
        """
        A new listener: a new generation of workers serving both sockets;
        the old generation drains away.
        """
        balancer = self.balancer
        old = {w["pid"] for w in balancer.stats()["per_worker"].values()}
        balancer.write(
            re.sub(
                r"(\[lb\]\s+listen = \S+)",
                r"\1 tcp:0:interface=127.0.0.1:backlog=99",
                self.base,
                count=1,
            )
        )
        balancer.process.send_signal(signal.SIGHUP)
        second = balancer.listener_port("tcp:0:interface=127.0.0.1:backlog=99")
        balancer.poll(lambda: balancer.find(r"(the workers of generation 2 serve)"))
        balancer.poll(lambda: not any(_alive(pid) for pid in old))
        self.assertEqual(balancer.get("/x", second), (200, {"backend": "a"}))
        self.assertEqual(balancer.get("/x"), (200, {"backend": "a"}))
        workers = balancer.stats()["per_worker"]
        self.assertEqual(len(workers), 2)
        self.assertFalse({w["pid"] for w in workers.values()} & old)

    def terminate_drains(self):
        """
        SIGTERM: no new connections, the request under way finishes, the
        workers exit, and so does twistd, with 0.
        """
        balancer, a = self.balancer, self.a
        pids = {w["pid"] for w in balancer.stats()["per_worker"].values()}
        slow: list[Any] = []
        thread = threading.Thread(target=lambda: slow.append(balancer.get("/slow")))
        thread.start()
        self.assertTrue(a.slow_started.wait(20))
        balancer.process.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", balancer.port), 1).close()
            except OSError:
                return True
            return False

        balancer.poll(refused)
        self.assertIsNone(balancer.process.poll())  # draining
        a.release.set()
        thread.join(20)
        self.assertEqual(slow, [(200, {"backend": "a"})])
        self.assertEqual(balancer.process.wait(timeout=20), 0)
        self.assertFalse(any(_alive(pid) for pid in pids))


class RestartDelayTests(SynchronousTestCase):
    def test_backoff(self):
        self.assertEqual(
            [restart_delay(n) for n in range(1, 10)],
            [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0],
        )

    def test_a_crash_loop_is_slowed(self):
        clock = Clock()
        supervisor = Supervisor(clock, _config(self))
        supervisor.generation = 1
        supervisor.served = True  # a fleet that ran: one place crash-loops
        spawned: list[str] = []
        supervisor._spawn = spawned.append  # type: ignore[method-assign]

        class Dead:
            worker, pid, generation, retiring = "1", 99, 1, False
            started = 0.0
            admin_path = os.path.join(self.mktemp(), "worker-1.sock")

        killed = Failure(ProcessTerminated(signal=9))
        for _ in range(3):
            Dead.started = clock.seconds()
            clock.advance(1)  # died young
            supervisor.worker_exited(Dead(), killed)  # type: ignore[arg-type]
            clock.advance(0.49)
        # Once at once, then after 0.5 s, then after 1 s.
        self.assertEqual(spawned, ["1", "1"])
        clock.advance(0.51)
        self.assertEqual(spawned, ["1", "1", "1"])
        self.assertEqual(supervisor.restarts, 3)
        # One that lived long is replaced at once again.
        Dead.started = clock.seconds()
        clock.advance(60)
        supervisor.worker_exited(Dead(), killed)  # type: ignore[arg-type]
        self.assertEqual(len(spawned), 4)
        # Nor is one that was told to stop.
        Dead.retiring = True
        supervisor.worker_exited(Dead(), killed)  # type: ignore[arg-type]
        self.assertEqual(len(spawned), 4)


def _config(test: SynchronousTestCase, lb: str = "listen = tcp:0") -> Any:
    directory = test.mktemp()
    os.makedirs(directory)
    path = os.path.join(directory, "lb.ini")
    _config_file(path, lb)
    return load(path)


def _config_file(path: str, lb: str) -> None:
    with open(path, "w") as f:
        f.write(
            f"[lb]\n{lb}\nworkers = 2\ndrain_timeout = 1s\n"
            "[pool:p]\nservers = http://127.0.0.1:1\n[route:r]\npool = p\n"
        )


class StopTests(SynchronousTestCase):
    def test_workers_that_do_not_stop_are_killed(self):
        from twisted.internet.defer import Deferred

        clock = Clock()
        supervisor = Supervisor(clock, _config(self))

        class Stubborn:
            retiring, ended = False, False

            def __init__(self) -> None:
                self.signals: list[str] = []
                self.ended_d: Deferred[None] = Deferred()

            def signal(self, name: str) -> None:
                self.signals.append(name)

            def when_ended(self) -> Deferred[None]:
                d: Deferred[None] = Deferred()
                self.ended_d.addCallback(lambda _: d.callback(None))
                return d

            def end(self) -> None:
                self.ended = True
                self.ended_d.callback(None)

        quick, slow = Stubborn(), Stubborn()
        supervisor.processes = [quick, slow]  # type: ignore[list-item]
        stopped = supervisor.stopService()
        self.assertEqual((quick.signals, slow.signals), (["TERM"], ["TERM"]))
        quick.end()
        clock.advance(1 + 4.9)  # drain_timeout and most of the margin
        self.assertEqual(slow.signals, ["TERM"])
        self.assertNoResult(stopped)
        clock.advance(0.1)
        self.assertEqual(slow.signals, ["TERM", "KILL"])
        slow.end()
        self.successResultOf(stopped)
        self.assertEqual(quick.signals, ["TERM"])


class StartTests(SynchronousTestCase):
    def test_port_in_use(self):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            port = busy.getsockname()[1]
            config = _config(
                self,
                f"listen = tcp:0:interface=127.0.0.1 tcp:{port}:interface=127.0.0.1",
            )
            supervisor = Supervisor(reactor, config)
            supervisor.exit_on_listen_failure = True
            with self.assertRaises(SystemExit) as caught:
                supervisor.startService()
        self.assertTrue(
            str(caught.exception.code).startswith(f"l7lb: cannot listen on tcp:{port}"),
            caught.exception.code,
        )
        # Nothing is left open or behind.
        self.assertEqual((supervisor.sockets, supervisor.directory), ({}, None))
        self.assertEqual(supervisor.processes, [])


class EnvironmentTests(SynchronousTestCase):
    """
    Workers run the supervisor's l7lb, not one in their working directory.
    """

    def test_installed(self):
        import l7lb
        from l7lb.supervisor import _worker_environment

        root = os.path.dirname(os.path.dirname(os.path.abspath(l7lb.__file__)))
        self.patch(sys, "path", ["/venv/bin", "/usr/lib/python3", root])
        self.assertEqual(
            _worker_environment().get("PYTHONPATH"), os.environ.get("PYTHONPATH")
        )

    def test_checkout_found_through_the_working_directory(self):
        import l7lb
        from l7lb.supervisor import _worker_environment

        root = os.path.dirname(os.path.dirname(os.path.abspath(l7lb.__file__)))
        self.patch(sys, "path", [root, "/usr/lib/python3"])
        path = _worker_environment()["PYTHONPATH"].split(os.pathsep)
        self.assertEqual(path[0], root)


class WorkerOptionsTests(SynchronousTestCase):
    def test_listeners(self):
        options = WorkerOptions()
        options.parseOptions(
            [
                "--config=lb.ini",
                "--config-text=/run/l7lb/config.ini",
                "--admin=unix:/tmp/w.sock",
                "--worker=2",
                "--workers=3",
                "--listener=4:tcp:8080:interface=127.0.0.1",
                "--listener=5:unix:/run/l7lb.sock",
            ]
        )
        self.assertEqual(
            options.listeners,
            {"tcp:8080:interface=127.0.0.1": 4, "unix:/run/l7lb.sock": 5},
        )
        self.assertEqual((options["worker"], options["workers"]), (2, 3))

    def test_bad(self):
        from twisted.python import usage

        for argv in (
            ["--admin=unix:/x"],
            ["--config=x", "--admin=unix:/x", "--workers=0"],
            ["--config=x", "--admin=unix:/x", "--listener=tcp:80"],
        ):
            self.assertRaises(usage.UsageError, WorkerOptions().parseOptions, argv)


WORKER_ONE = """\
# HELP l7lb_requests_total Requests answered.
# TYPE l7lb_requests_total counter
l7lb_requests_total{route="all",code="2xx"} 3.0
# HELP l7lb_request_duration_seconds Time.
# TYPE l7lb_request_duration_seconds histogram
l7lb_request_duration_seconds_bucket{route="all",le="0.1"} 3.0
l7lb_request_duration_seconds_bucket{route="all",le="+Inf"} 3.0
l7lb_request_duration_seconds_count{route="all"} 3.0
l7lb_request_duration_seconds_sum{route="all"} 0.03
# HELP l7lb_client_connections Open.
# TYPE l7lb_client_connections gauge
l7lb_client_connections 1.0
"""


class MergeTests(SynchronousTestCase):
    def test_metrics(self):
        from prometheus_client.core import GaugeMetricFamily

        own = GaugeMetricFamily("l7lb_workers", "Workers.", value=2)
        text = merge_metrics(
            {"1": WORKER_ONE, "2": WORKER_ONE.replace("3.0", "5.0")}, [own]
        ).decode()
        helps = re.findall(r"^# HELP (\S+)", text, re.M)
        types = re.findall(r"^# TYPE (\S+)", text, re.M)
        self.assertEqual(
            helps,
            [
                "l7lb_workers",
                "l7lb_requests_total",
                "l7lb_request_duration_seconds",
                "l7lb_client_connections",
            ],
        )
        self.assertEqual(helps, types)
        families = {f.name: f for f in text_string_to_metric_families(text)}
        requests = {
            s.labels["worker"]: s.value for s in families["l7lb_requests"].samples
        }
        self.assertEqual(requests, {"1": 3.0, "2": 5.0})
        self.assertEqual(
            families["l7lb_requests"].samples[0].labels,
            {"worker": "1", "route": "all", "code": "2xx"},
        )
        counts = [
            (s.labels["worker"], s.value)
            for s in families["l7lb_request_duration_seconds"].samples
            if s.name.endswith("_count")
        ]
        self.assertEqual(counts, [("1", 3.0), ("2", 5.0)])
        self.assertEqual(families["l7lb_workers"].samples[0].labels, {})

    def test_agree(self):
        self.assertEqual(agree({"1": "up", "2": "up"}), "up")
        self.assertEqual(
            agree({"1": "up", "2": "down"}), {"per_worker": {"1": "up", "2": "down"}}
        )

    def test_pools(self):
        def pool(name: str, in_rotation: int, in_flight: int) -> dict[str, Any]:
            return {
                "name": name,
                "balance": "round_robin",
                "backends": 2,
                "in_rotation": in_rotation,
                "in_flight": in_flight,
                "queued_now": 1,
                "retries": 2,
            }

        merged = merge_pools(
            {"1": [pool("a", 2, 1), pool("b", 1, 0)], "2": [pool("a", 1, 3)]}
        )
        self.assertEqual(
            merged,
            [
                {
                    "name": "a",
                    "balance": "round_robin",
                    "backends": 2,
                    "in_rotation": {"per_worker": {"1": 2, "2": 1}},
                    "in_flight": 4,
                    "queued_now": 2,
                    "retries": 4,
                },
                {**pool("b", 1, 0)},
            ],
        )

    def test_pool_details(self):
        def backend(state: str, answered: dict[str, int]) -> dict[str, Any]:
            return {
                "id": "127.0.0.1:1",
                "state": state,
                "in_flight": 1,
                "answered": answered,
                "ejections": 1,
                "last_latency_seconds": None,
            }

        merged = merge_pool(
            {
                "1": {"name": "a", "backends": [backend("in rotation", {"2xx": 3})]},
                "2": {
                    "name": "a",
                    "backends": [backend("out of rotation", {"2xx": 1, "5xx": 2})],
                },
            }
        )
        self.assertEqual(
            merged["backends"],
            [
                {
                    "id": "127.0.0.1:1",
                    "state": {
                        "per_worker": {"1": "in rotation", "2": "out of rotation"}
                    },
                    "in_flight": 2,
                    "answered": {"2xx": 4, "5xx": 2},
                    "ejections": 2,
                    "last_latency_seconds": None,
                }
            ],
        )

    def test_stats(self):
        def stats(pid: int, requests: dict[str, int]) -> dict[str, Any]:
            return {
                "uptime_seconds": 1.0,
                "requests": requests,
                "requests_in_flight": 1,
                "client_connections": 2,
                "bytes_sent": 10,
                "bytes_received": 5,
                "retries": 0,
                "shed": 0,
                "rate_limited": 1,
                "pid": pid,
            }

        merged = merge_stats({"1": stats(10, {"2xx": 1}), "2": stats(11, {"4xx": 2})})
        self.assertEqual(merged["requests"], {"2xx": 1, "4xx": 2})
        self.assertEqual(
            (
                merged["client_connections"],
                merged["bytes_sent"],
                merged["rate_limited"],
            ),
            (4, 20, 2),
        )
        self.assertEqual(merged["per_worker"]["2"]["pid"], 11)
        self.assertNotIn("pid", merged)


class AdoptedSocketTests(IntegrationTest):
    """
    The seam a worker uses: a listen string served from a socket another
    process opened, instead of the endpoint the string names.
    """

    def adopting(self, ini_listen: str, sock: socket.socket) -> Any:
        backend = self.backend("a")
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "lb.ini")
        with open(path, "w") as f:
            f.write(
                f"[lb]\nlisten = {ini_listen}\naccess_log = off\n"
                f"[pool:p]\nservers = {backend.url}\n[route:r]\npool = p\n"
            )
        service = BalancerService(reactor, path)
        # The endpoint owns the descriptor it is given (a worker's inherited
        # one): it gets a copy of the test's.
        service.endpoint_for = lambda description: AdoptedEndpoint(
            reactor, os.dup(sock.fileno()), description
        )
        service.apply(load(path))
        service.startService()
        self.addCleanup(service.stopService)
        return service

    @inlineCallbacks
    def test_tcp(self):
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.setblocking(False)
        port = sock.getsockname()[1]
        # The file names port 1; the adopted socket is what is served.
        service = self.adopting("tcp:1:interface=127.0.0.1", sock)
        self.assertEqual(service.listeners[0].port.getHost().port, port)
        reply = yield fetch(port, "/x")
        self.assertEqual((reply.status, reply.json()["backend"]), (200, "a"))

    @inlineCallbacks
    def test_unix_path_stays(self):
        path = os.path.abspath(self.mktemp())
        sock = socket.socket(socket.AF_UNIX)
        self.addCleanup(sock.close)
        sock.bind(path)
        sock.listen(16)
        sock.setblocking(False)
        service = self.adopting(f"unix:{path}:mode=600", sock)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)

        def over_unix() -> bytes:
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(path)
                client.sendall(
                    b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                return b"".join(iter(lambda: client.recv(65536), b""))

        from twisted.internet import threads

        raw = yield threads.deferToThread(over_unix)
        self.assertTrue(raw.startswith(b"HTTP/1.1 200"), raw)
        yield service.listeners[0].stopService()
        # The supervisor owns the path: other workers still serve it.
        self.assertTrue(os.path.exists(path))


class SingleProcessTests(IntegrationTest):
    def test_workers_change_takes_a_restart(self):
        """
        A reload cannot turn one process into several: it says so, and the
        process keeps enforcing whole rate limits.
        """
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service = self.one_pool(
            "http://127.0.0.1:1", lb_options="[route:r]\npool = p\nrate_limit = 10/s\n"
        )
        with open(service.config_path) as f:
            text = f.read()
        with open(service.config_path, "w") as f:
            f.write(text.replace("access_log = off", "access_log = off\nworkers = 2"))
        self.assertEqual(service.reload(), [])
        self.assertEqual(service.runtime.share, 1)
        limiter = service.policies["r"].limiter
        assert limiter is not None
        self.assertEqual((limiter.share, limiter.rate), (1, 10.0))
        self.assertTrue(
            any(
                "takes effect at the next start" in str(e.get("log_format"))
                for e in events
            )
        )


class _StoppableClock(Clock):
    """
    A Clock that notes what a supervisor asks of a reactor when it gives up.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stopped = False
        self.triggers: list[tuple[str, str, Any]] = []

    def stop(self) -> None:
        self.stopped = True

    def addSystemEventTrigger(self, phase: str, event: str, call: Any) -> None:
        self.triggers.append((phase, event, call))


class StartFailureTests(SynchronousTestCase):
    def dead(self, worker: str, clock: Clock) -> Any:
        class Dead:
            pid, generation, retiring = 99, 1, False
            started = clock.seconds()
            admin_path = os.path.join(self.mktemp(), "worker.sock")

        Dead.worker = worker  # type: ignore[attr-defined]
        return Dead()

    def test_gives_up_when_no_worker_ever_serves(self):
        clock = _StoppableClock()
        supervisor = Supervisor(clock, _config(self))  # two workers
        supervisor.generation = 1
        supervisor._spawn = lambda worker: None  # type: ignore[method-assign]
        failed = Failure(ProcessTerminated(exitCode=1))
        for attempt in range(START_ATTEMPTS):
            for worker in ("1", "2"):
                dead = self.dead(worker, clock)
                clock.advance(0.5)
                supervisor.worker_exited(dead, failed)
            if attempt < START_ATTEMPTS - 1:
                self.assertFalse(clock.stopped)
        self.assertTrue(clock.stopped)
        self.assertEqual([t[:2] for t in clock.triggers], [("after", "shutdown")])

    def test_keeps_trying_once_a_worker_has_served(self):
        clock = _StoppableClock()
        supervisor = Supervisor(clock, _config(self))
        supervisor.generation = 1
        supervisor.served = True
        supervisor._spawn = lambda worker: None  # type: ignore[method-assign]
        failed = Failure(ProcessTerminated(exitCode=1))
        for _ in range(START_ATTEMPTS + 2):
            for worker in ("1", "2"):
                clock.advance(0.5)
                supervisor.worker_exited(self.dead(worker, clock), failed)
        self.assertFalse(clock.stopped)


class ReloadRefusalTests(SynchronousTestCase):
    def test_a_listener_that_cannot_open_refuses_the_reload(self):
        config = _config(self, "listen = tcp:1:interface=127.0.0.1")
        supervisor = Supervisor(Clock(), config)
        first = ("http", "tcp:1:interface=127.0.0.1")
        supervisor._wanted = (first,)
        supervisor.sockets[first] = object()  # type: ignore[assignment]
        old = supervisor.config
        opened: list[Any] = []

        def fake_open(key):
            if key[1].startswith("tcp:2"):
                return f"cannot listen on {key[1]}: Address already in use"
            opened.append(key)
            supervisor.sockets[key] = object()
            return None

        closed: list[set] = []
        supervisor._open = fake_open  # type: ignore[method-assign]
        supervisor._close_sockets = closed.append  # type: ignore[method-assign]
        supervisor._new_generation = lambda *a: self.fail("a new generation")  # type: ignore[method-assign]
        _config_file(
            config.source,
            "listen = tcp:1:interface=127.0.0.1 tcp:2:interface=127.0.0.1 "
            "tcp:3:interface=127.0.0.1",
        )
        problems = supervisor.reload()
        self.assertEqual(
            problems,
            ["cannot listen on tcp:2:interface=127.0.0.1: Address already in use"],
        )
        self.assertIs(supervisor.config, old)  # nothing else changed
        # The socket opened for this reload is closed again.
        self.assertEqual(opened, [("http", "tcp:3:interface=127.0.0.1")])
        self.assertEqual(closed, [{("http", "tcp:3:interface=127.0.0.1")}])
        self.flushLoggedErrors()


class PrivateStateTests(SynchronousTestCase):
    def test_an_older_state_arriving_late_is_not_applied(self):
        from io import BytesIO
        from types import SimpleNamespace

        from l7lb.admin import AdminResource

        applied: list[Any] = []
        service = SimpleNamespace(
            runtime=SimpleNamespace(metrics=None, pools={}, policies={}),
            change=lambda state: applied.append(state.sections) or [],
        )
        resource = AdminResource(service, private=True)  # type: ignore[arg-type]

        def put(version: int, sections: dict) -> Any:
            body = json.dumps({"version": version, "sections": sections})
            request = SimpleNamespace(content=BytesIO(body.encode()))
            return resource.other(b"PUT", ["state"], request)  # type: ignore[arg-type]

        newer = {"pool:p": {"servers": "http://127.0.0.1:2"}}
        older = {"pool:p": {"servers": "http://127.0.0.1:1"}}
        self.assertEqual(put(6, newer), (200, {"applied": True}))
        self.assertEqual(put(5, older), (200, {"applied": False, "stale": True}))
        self.assertEqual(applied, [newer])


class ConfigSnapshotTests(SynchronousTestCase):
    def test_a_worker_runs_the_text_the_supervisor_accepted(self):
        from l7lb.state import RuntimeState
        from l7lb.worker import WorkerService

        config = _config(self)
        accepted = os.path.join(os.path.dirname(config.source), "accepted.ini")
        with open(config.source) as f, open(accepted, "w") as out:
            out.write(f.read())
        # The file changes afterwards, with a mistake nobody validated.
        with open(config.source, "a") as f:
            f.write("[lb-typo]\n")
        service = WorkerService(
            Clock(),
            config.source,
            RuntimeState(),
            {},
            "unix:/nonexistent/w.sock",
            2,
            config_text=accepted,
        )
        loaded = service.load(RuntimeState())
        self.assertEqual(loaded.source, config.source)  # named as the file
        self.assertEqual([p.name for p in loaded.pools], ["p"])
