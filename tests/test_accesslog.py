"""
The access log: one line per request, however it ended.
"""

from __future__ import annotations

import io
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


class BufferingTests(SynchronousTestCase):
    def test_buffered_until_flushed_and_closed(self):
        out = io.BytesIO()
        writer = io.BufferedWriter(out, buffer_size=1 << 16)  # type: ignore[arg-type]
        writer.close = lambda: writer.flush()  # type: ignore[method-assign]
        access_log = AccessLog(writer, Clock())
        access_log.log_refusal(None, 414)
        self.assertEqual(out.getvalue(), b"")
        access_log.flush()
        self.assertEqual(
            out.getvalue(),
            b'1970-01-01T00:00:00.000Z - "- - -" 414 0 0.000 route=- backend=- id=- end="refused"\n',
        )
        access_log.log_refusal(None, 400)
        access_log.close()
        self.assertEqual(out.getvalue().count(b"\n"), 2)
        self.assertFalse(access_log.enabled)

    def test_json_lines(self):
        out = io.BytesIO()
        access_log = AccessLog(out, Clock(), json_lines=True)
        access_log.log_refusal(None, 431)
        import json

        self.assertEqual(
            json.loads(out.getvalue()),
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
