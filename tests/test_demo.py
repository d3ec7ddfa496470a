"""
The shipped configurations and the demo's pieces.
"""

from __future__ import annotations

import os
import shutil

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from l7lb.certificates import load_certificate_file
from l7lb.config import load
from l7lb.demo import DemoBackend, make_certificate

HERE = os.path.dirname(os.path.abspath(__file__))
CONF = os.path.join(os.path.dirname(HERE), "conf")


class ShippedConfigTests(SynchronousTestCase):
    def test_example_is_valid(self):
        config = load(os.path.join(CONF, "lb.ini"))
        self.assertEqual([p.name for p in config.pools], ["a", "b", "default"])
        self.assertEqual(
            [(r.name, r.path_prefix, r.pool) for r in config.routes],
            [
                ("api-a", b"/apiA", "a"),
                ("api-b", b"/apiB", "b"),
                ("default", None, "default"),
            ],
        )
        self.assertEqual(config.notices, ())

    def test_demo_with_its_certificate_is_valid(self):
        root = self.mktemp()
        os.makedirs(os.path.join(root, "conf"))
        shutil.copy(os.path.join(CONF, "demo.ini"), os.path.join(root, "conf"))
        make_certificate(os.path.join(root, "demo", "localhost.pem"))
        config = load(os.path.join(root, "conf", "demo.ini"))
        self.assertEqual(config.lb.tls_listen, ("tcp:8443:interface=127.0.0.1",))
        self.assertEqual(config.notices, ())


class DemoPieceTests(SynchronousTestCase):
    def test_certificate_made_once(self):
        path = os.path.join(self.mktemp(), "localhost.pem")
        make_certificate(path)
        first = load_certificate_file(path)
        self.assertEqual(first.names, ("localhost",))
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        make_certificate(path)
        self.assertEqual(load_certificate_file(path).chain, first.chain)

    def test_backend_names_itself_and_echoes(self):
        request = DummyRequest([b"apiA", b"x"])
        request.uri = b"/apiA/x"
        request.path = b"/apiA/x"
        request.requestHeaders.addRawHeader(b"X-Forwarded-For", b"192.0.2.1")
        body = DemoBackend("127.0.0.1:8081").render(request)
        self.assertEqual(
            body.decode().splitlines()[:3],
            ["backend 127.0.0.1:8081", "GET /apiA/x", "X-Forwarded-For: 192.0.2.1"],
        )
        health = DummyRequest([b"health"])
        health.path = b"/health"
        self.assertEqual(DemoBackend("x").render(health), b"ok\n")
