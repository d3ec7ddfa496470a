"""
The twistd plugin: options, --check, clean errors, and discovery by twistd
from a real install.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from l7lb import tap
from l7lb.service import BalancerService, ListenFailed
from tests.test_config import MINIMAL


def write(test: SynchronousTestCase, text: str) -> str:
    directory = test.mktemp()
    os.makedirs(directory)
    path = os.path.join(directory, "lb.ini")
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    return path


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> tuple[int | None, str, str]:
        out, err = io.StringIO(), io.StringIO()
        options = tap.Options()
        code = None
        with redirect_stdout(out), redirect_stderr(err):
            try:
                options.parseOptions(list(argv))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        return code, out.getvalue(), err.getvalue()

    def test_config_required(self):
        self.assertRaises(usage.UsageError, tap.Options().parseOptions, [])

    def test_check_valid(self):
        path = write(self, MINIMAL)
        code, out, err = self.parse("--config", path, "--check")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("configuration is valid", out)
        self.assertIn("route       all: every request -> pool a", out)

    def test_invalid_exits_1_with_every_problem(self):
        path = write(self, MINIMAL.replace("pool = a", "pool = b\nbogus = 1"))
        for argv in (["--config", path, "--check"], ["--config", path]):
            code, out, err = self.parse(*argv)
            self.assertEqual(code, 1)
            self.assertEqual(out, "")
            lines = err.splitlines()
            self.assertEqual(len(lines), 2, lines)
            self.assertNotIn("Traceback", err)
            self.assertTrue(
                all(line.startswith(path + ": [route:all] ") for line in lines)
            )

    def test_make_service(self):
        path = write(self, MINIMAL.replace("tcp:8080", "tcp:0"))
        options = tap.Options()
        options.parseOptions(["--config", path])
        service = tap.makeService(options)
        self.assertIsInstance(service, BalancerService)
        self.assertTrue(service.exit_on_listen_failure)

    def test_make_service_with_workers(self):
        from l7lb.supervisor import Supervisor

        path = write(self, MINIMAL.replace("[lb]", "[lb]\nworkers = 2"))
        options = tap.Options()
        options.parseOptions(["--config", path])
        service = tap.makeService(options)
        self.assertIsInstance(service, Supervisor)
        self.assertTrue(service.exit_on_listen_failure)
        self.assertFalse(service.running)


class ListenFailureTests(SynchronousTestCase):
    def test_port_in_use(self):
        import socket

        from twisted.internet import reactor

        from l7lb.config import load
        from l7lb.service import build

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            port = s.getsockname()[1]
            path = write(
                self,
                MINIMAL.replace("tcp:8080", f"tcp:{port}").replace(
                    "[lb]", "[lb]\naccess_log = off"
                ),
            )
            service = build(load(path), reactor)
            self.assertRaises(ListenFailed, service.startService)
            service.exit_on_listen_failure = True
            service.running = False
            with self.assertRaises(SystemExit) as caught:
                service.startService()
            self.assertIn(
                f"l7lb: cannot listen on tcp:{port}", str(caught.exception.code)
            )
            for child in service:
                if child.running:
                    child.stopService()


class PluginTests(SynchronousTestCase):
    """
    twistd finds the plugin in an installed l7lb, from any directory.
    """

    def twistd(self, *args: str) -> subprocess.CompletedProcess[str]:
        twistd = shutil.which("twistd", path=os.path.dirname(sys.executable))
        if twistd is None:
            self.skipTest("twistd is not installed next to this Python")
        elsewhere = self.mktemp()
        os.makedirs(elsewhere)
        return subprocess.run(
            [twistd, *args],
            cwd=elsewhere,
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )

    def test_listed_by_twistd(self):
        result = self.twistd("--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"\n\s+l7lb\s+A Layer 7")

    def test_check_via_twistd(self):
        path = os.path.abspath(write(self, MINIMAL))
        result = self.twistd(
            "--nodaemon", "--pidfile=", "l7lb", "--config", path, "--check"
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("configuration is valid", result.stdout)
        broken = os.path.abspath(write(self, MINIMAL + "nonsense = 1\n"))
        result = self.twistd("--nodaemon", "--pidfile=", "l7lb", "--config", broken)
        self.assertEqual(result.returncode, 1)
        self.assertTrue(
            result.stderr.startswith(f"{broken}: [route:all] nonsense: unknown key"),
            result.stderr,
        )
        self.assertEqual(len(result.stderr.splitlines()), 1)


class SignalTests(SynchronousTestCase):
    """
    The installed twistd plugin, as systemd runs it: SIGHUP reloads,
    SIGTERM stops cleanly (exit 0).
    """

    def test_hup_reloads_and_term_stops(self):
        import http.client
        import signal
        import socket
        import time

        twistd = shutil.which("twistd", path=os.path.dirname(sys.executable))
        if twistd is None:
            self.skipTest("twistd is not installed next to this Python")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        base = textwrap.dedent(
            f"""
            [lb]
            listen = tcp:{port}:interface=127.0.0.1
            access_log = off
            [pool:p]
            servers = http://127.0.0.1:{dead}
            retries = 0
            [route:a]
            path_prefix = /a
            pool = p
            """
        )
        path = os.path.abspath(write(self, base))
        process = subprocess.Popen(
            [twistd, "--nodaemon", "--pidfile=", "l7lb", "--config", path],
            cwd=os.path.dirname(path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.addCleanup(lambda: process.poll() is None and process.kill())

        def status(target: str) -> int | None:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", target)
                return connection.getresponse().status
            except OSError:
                return None

        def poll(predicate, seconds=20.0):
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if predicate():
                    return True
                time.sleep(0.05)
            return False

        self.assertTrue(poll(lambda: status("/b") == 404))
        self.assertEqual(status("/a"), 502)
        with open(path, "a") as f:
            f.write("[route:b]\npath_prefix = /b\npool = p\n")
        process.send_signal(signal.SIGHUP)
        self.assertTrue(poll(lambda: status("/b") == 502))
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(timeout=20), 0)
        output = process.stdout.read().decode() if process.stdout else ""
        self.assertIn("configuration reloaded", output)
