"""
The access log: one line per request, however it ended.
"""

from __future__ import annotations

import os
import re

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from l7lb.accesslog import AccessLog
from tests.support import IntegrationTest, exchange, fetch

LINE = re.compile(
    r"(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<client>\S+) "
    r'"(?P<request>[^"]*)" (?P<status>\d{3}) (?P<bytes>\d+) (?P<duration>\d+\.\d{3}) '
    r"route=(?P<route>\S+) backend=(?P<backend>\S+) id=(?P<id>\S+)"
    r'(?: end="(?P<end>[^"]*)")?$'
)


class AccessLogLineTests(IntegrationTest):
    @inlineCallbacks
    def test_lines_for_each_outcome(self):
        a = self.backend("a")
        log_path = os.path.abspath(self.mktemp())
        service = self.balancer(
            f"""
            [lb]
            listen = tcp:0:interface=127.0.0.1
            access_log = {log_path}
            max_uri_length = 1KiB
            [pool:a]
            servers = {a.url}
            [route:api]
            path_prefix = /api
            pool = a
            """
        )
        port = self.port_of(service)
        ok = yield fetch(port, "/api/x?y=1", headers={"X-Request-Id": "req-1"})
        yield fetch(port, "/nowhere")
        yield exchange(port, b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n\r\n")
        yield exchange(
            port,
            b'GET /api/"quoted"\x7f HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n',
        )
        service.runtime.access_log.flush()
        with open(log_path) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 4, lines)
        first = LINE.match(lines[0])
        assert first is not None, lines[0]
        self.assertEqual(first["client"], "127.0.0.1")
        self.assertEqual(first["request"], "GET /api/x?y=1 HTTP/1.1")
        self.assertEqual(first["status"], "200")
        self.assertEqual(int(first["bytes"]), len(ok.body))
        self.assertEqual(first["route"], "api")
        self.assertEqual(first["backend"], f"127.0.0.1:{a.port}")
        self.assertEqual(first["id"], "req-1")
        self.assertIsNone(first["end"])
        second = LINE.match(lines[1])
        assert second is not None
        self.assertEqual(
            (second["status"], second["route"], second["backend"]), ("404", "-", "-")
        )
        third = LINE.match(lines[2])
        assert third is not None
        self.assertEqual((third["status"], third["end"]), ("414", "refused"))
        fourth = LINE.match(lines[3])
        assert fourth is not None, lines[3]
        self.assertEqual(fourth["request"], "GET /api/\\x22quoted\\x22\\x7f HTTP/1.1")


class Recording:
    """
    An output that keeps each write apart.
    """

    def __init__(self, chunk_size: int = 65536) -> None:
        self.chunk_size = chunk_size
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True


class BufferingTests(SynchronousTestCase):
    def test_buffered_until_flushed_and_closed(self):
        out = Recording()
        access_log = AccessLog(out, Clock())
        access_log.log_refusal(None, 414)
        self.assertEqual(out.writes, [])
        access_log.flush()
        self.assertEqual(
            out.writes,
            [
                b'1970-01-01T00:00:00.000Z - "- - -" 414 0 0.000 route=- backend=- id=- end="refused"\n'
            ],
        )
        access_log.log_refusal(None, 400)
        access_log.close()
        self.assertEqual(b"".join(out.writes).count(b"\n"), 2)
        self.assertTrue(out.closed)
        self.assertFalse(access_log.enabled)

    def test_flushed_when_the_buffer_fills(self):
        out = Recording()
        access_log = AccessLog(out, Clock())
        while not out.writes:
            access_log.log_refusal("127.0.0.1", 400)
        self.assertGreaterEqual(sum(map(len, out.writes)), 64 * 1024)

    def test_json_lines(self):
        out = Recording()
        access_log = AccessLog(out, Clock(), json_lines=True)
        access_log.log_refusal(None, 431)
        access_log.flush()
        import json

        self.assertEqual(
            json.loads(b"".join(out.writes)),
            {
                "time": "1970-01-01T00:00:00.000Z",
                "client": "-",
                "status": 431,
                "end": "refused",
            },
        )

    def test_off(self):
        access_log = AccessLog.open(None, Clock())
        self.assertFalse(access_log.enabled)
        access_log.log_refusal(None, 400)
        access_log.close()


class WholeLinesTests(SynchronousTestCase):
    """
    Several worker processes append to one log: no write may end inside a
    line, or two processes' lines could be spliced together.
    """

    def test_each_write_carries_whole_lines(self):
        out = Recording(chunk_size=200)
        access_log = AccessLog(out, Clock())
        lines = []
        for n in range(50):
            host = f"10.0.0.{n}" + ("x" * (n * 7 if n % 10 == 0 else 0))
            access_log.log_refusal(host, 400)
            lines.append(host)
        access_log.flush()
        self.assertGreater(len(out.writes), 10)
        for data in out.writes:
            self.assertTrue(data.endswith(b"\n"), data)
            # A chunk holds as many lines as fit; a longer line goes alone.
            self.assertTrue(len(data) <= 200 or data.count(b"\n") == 1, data)
        written = b"".join(out.writes).decode().splitlines()
        self.assertEqual([line.split()[1] for line in written], lines)

    def test_file_is_appended_to(self):
        import fcntl

        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(b"earlier line\n")
        access_log = AccessLog.open(path, Clock())
        out = access_log._out
        assert out is not None
        flags = fcntl.fcntl(out.fd, fcntl.F_GETFL)  # type: ignore[attr-defined]
        self.assertTrue(flags & os.O_APPEND)
        self.assertEqual(out.chunk_size, 64 * 1024)  # type: ignore[attr-defined]
        access_log.log_refusal("127.0.0.1", 400)
        access_log.close()
        with open(path, "rb") as f:
            self.assertEqual(f.read().splitlines()[0], b"earlier line")

    def test_stdout_is_descriptor_one(self):
        """
        twistd replaces sys.stdout with a logging file that has no buffer;
        reopening the log (at a reload) must not depend on it.
        """
        import sys

        self.patch(sys, "stdout", object())
        access_log = AccessLog.open("-", Clock())
        access_log.reopen("-")
        out = access_log._out
        self.assertEqual(getattr(out, "fd", None), 1)
        access_log.close()

    def test_processes_share_a_file(self):
        import subprocess
        import sys

        path = os.path.abspath(self.mktemp())
        script = (
            "import sys\n"
            "from twisted.internet.task import Clock\n"
            "from l7lb.accesslog import AccessLog\n"
            "log = AccessLog.open(sys.argv[1], Clock())\n"
            "for n in range(3000):\n"
            "    log.log_refusal(sys.argv[2] + '-' * (n % 300) + str(n), 400)\n"
            "    if n % 500 == 0:\n"
            "        log.flush()\n"
            "log.close()\n"
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=root)
        writers = [
            subprocess.Popen([sys.executable, "-c", script, path, name], env=env)
            for name in ("a", "b")
        ]
        for writer in writers:
            self.assertEqual(writer.wait(timeout=60), 0)
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 6000)
        for line in lines:
            self.assertIsNotNone(LINE.match(line), line)


class _Broken:
    """
    An output that fails every write, as a full disk does.
    """

    chunk_size = 4096

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        pass


class FailingOutputTests(SynchronousTestCase):
    def test_a_failed_write_loses_lines_not_the_flushing(self):
        out = _Broken()
        log = AccessLog(out, Clock())  # type: ignore[arg-type]
        log._lines.append(b"one line\n")
        log.flush()  # does not raise
        log._lines.append(b"another\n")
        log.flush()
        self.assertEqual(out.writes, 2)
        self.assertEqual(log._lines, [])
        self.assertEqual(len(self.flushLoggedErrors()), 0)
