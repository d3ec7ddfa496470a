"""
TLS termination over real TLS sockets: certificates by SNI, protocol and
cipher policy, HTTP/2 by ALPN, forwarded proto, redirects and HSTS, https
backends, and handshakes that fail without disturbing anyone else.
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl

import trustme
from twisted.internet import threads
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from l7lb.certificates import expiry_warnings, load_certificate_file
from l7lb.config import ConfigError, TLSConfig, load
from l7lb.tls import ServerTLS
from tests.support import CLIENT_TIMEOUT, IntegrationTest, fetch
from tests.test_config import MINIMAL
from tests.tlssupport import Certificates, h2_request, h2_streams, handshake, https


class TLSTestCase(IntegrationTest):
    def setUp(self):
        self.certs = Certificates(os.path.abspath(self.mktemp()))
        self.a_pem = self.certs.issue("a", "a.example.test", "localhost")
        self.b_pem = self.certs.issue("b", "*.b.example.test")
        self.app = self.backend("app")

    def tls_balancer(
        self, route_options: str = "", lb_options: str = "", tls_options: str = ""
    ):
        service = self.balancer(
            "\n".join(
                [
                    "[lb]",
                    "listen = tcp:0:interface=127.0.0.1",
                    "tls_listen = tcp:0:interface=127.0.0.1",
                    "access_log = off",
                    lb_options,
                    "[tls]",
                    f"certificates = {self.a_pem} {self.b_pem}",
                    tls_options,
                    "[pool:p]",
                    f"servers = {self.app.url}",
                    "[route:all]",
                    "pool = p",
                    route_options,
                ]
            )
        )
        port = service.tls_listeners[0].port
        assert port is not None
        return service, port.getHost().port


class CertificateChoiceTests(TLSTestCase):
    @inlineCallbacks
    def test_sni_picks_certificate_and_unknown_gets_first(self):
        _, port = self.tls_balancer()
        strict = self.certs.client_context()
        loose = self.certs.client_context(check_hostname=False)
        a = yield handshake(port, strict, "a.example.test")
        self.assertEqual(a.names, ["a.example.test", "localhost"])
        b = yield handshake(port, strict, "x.B.example.test")
        self.assertEqual(b.names, ["*.b.example.test"])
        unknown = yield handshake(port, loose, "nobody.test")
        self.assertEqual(unknown.names, ["a.example.test", "localhost"])
        none = yield handshake(port, loose, None)
        self.assertEqual(none.names, ["a.example.test", "localhost"])

    def test_prepared_map(self):
        tls = ServerTLS(
            TLSConfig((self.a_pem, self.b_pem)),
            [load_certificate_file(self.a_pem), load_certificate_file(self.b_pem)],
        )
        self.assertIs(tls.context_for(b"a.example.test"), tls.default)
        b = tls.context_for(b"deep.b.example.test")
        self.assertIsNot(b, tls.default)
        self.assertIs(
            tls.context_for(b"b.example.test"), tls.default
        )  # wildcard needs a label
        self.assertIs(
            tls.context_for(b"x.y.b.example.test"), tls.default
        )  # one label only
        self.assertIs(tls.context_for(b"LOCALHOST."), tls.default)


class ProtocolPolicyTests(TLSTestCase):
    @inlineCallbacks
    def test_tls12_and_tls13_accepted(self):
        _, port = self.tls_balancer()
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            context = self.certs.client_context(minimum=version, maximum=version)
            result = yield handshake(port, context, "a.example.test")
            self.assertEqual(result.version, version.name.replace("_", "."))

    @inlineCallbacks
    def test_min_version_tls13(self):
        _, port = self.tls_balancer(tls_options="min_version = TLSv1.3")
        context = self.certs.client_context(maximum=ssl.TLSVersion.TLSv1_2)
        error = yield self.assertFailure(
            handshake(port, context, "a.example.test"), ssl.SSLError
        )
        self.assertIn("PROTOCOL_VERSION", str(error).upper())

    @inlineCallbacks
    def test_tls11_refused_by_the_server(self):
        _, port = self.tls_balancer()
        context = self.certs.client_context(
            minimum=ssl.TLSVersion.TLSv1_1,
            maximum=ssl.TLSVersion.TLSv1_1,
            ciphers="DEFAULT:@SECLEVEL=0",
        )
        error = yield self.assertFailure(
            handshake(port, context, "a.example.test"), ssl.SSLError
        )
        # The server's protocol_version alert, not a client that could not offer 1.1.
        self.assertIn("ALERT_PROTOCOL_VERSION", str(error).upper())

    @inlineCallbacks
    def test_weak_tls12_cipher_refused(self):
        rsa_pem = self.certs.issue(
            "rsa", "rsa.example.test", key_type=trustme.KeyType.RSA
        )
        self.a_pem = rsa_pem
        _, port = self.tls_balancer()
        for weak in ("AES128-SHA", "ECDHE-RSA-AES128-SHA", "AES128-GCM-SHA256"):
            context = self.certs.client_context(
                maximum=ssl.TLSVersion.TLSv1_2, ciphers=weak + ":@SECLEVEL=0"
            )
            error = yield self.assertFailure(
                handshake(port, context, "rsa.example.test"), ssl.SSLError
            )
            self.assertIn("ALERT_HANDSHAKE_FAILURE", str(error).upper(), weak)
        strong = self.certs.client_context(
            maximum=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-RSA-AES128-GCM-SHA256"
        )
        result = yield handshake(port, strong, "rsa.example.test")
        self.assertEqual(result.cipher, "ECDHE-RSA-AES128-GCM-SHA256")


class HTTPOverTLSTests(TLSTestCase):
    @inlineCallbacks
    def test_forwarded_proto_https(self):
        _, port = self.tls_balancer()
        reply = yield https(port, self.certs.client_context(), "a.example.test", "/x")
        self.assertEqual(reply.status, 200)
        seen = self.app.requests[-1]
        self.assertEqual(seen.header(b"X-Forwarded-Proto"), [b"https"])
        self.assertEqual(
            seen.header(b"Forwarded"),
            [b'for=127.0.0.1;host="a.example.test:%d";proto=https' % port],
        )

    @inlineCallbacks
    def test_http2_by_alpn(self):
        _, port = self.tls_balancer(route_options="hsts = 1y includeSubDomains")
        context = self.certs.client_context(alpn=["h2", "http/1.1"])
        (reply, alpn) = yield h2_request(
            port, context, "a.example.test", "/v1/items?x=1"
        )
        self.assertEqual(alpn, "h2")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json()["uri"], "/v1/items?x=1")
        self.assertEqual(reply.header("via"), ["1.1 l7lb"])
        self.assertEqual(
            reply.header("strict-transport-security"),
            ["max-age=31536000; includeSubDomains"],
        )
        seen = self.app.requests[-1]
        self.assertEqual(seen.header(b"Via"), [b"2 l7lb"])
        self.assertEqual(seen.header(b"Host"), [b"a.example.test:%d" % port])
        self.assertEqual(seen.header(b"X-Forwarded-Proto"), [b"https"])

    @inlineCallbacks
    def test_http2_cookies_joined_for_the_backend(self):
        # RFC 9113 section 8.2.3: HTTP/2 may split Cookie in several fields;
        # an HTTP/1.1 backend must get one.
        _, port = self.tls_balancer()
        context = self.certs.client_context(alpn=["h2"])
        (reply, _) = yield h2_request(
            port,
            context,
            "a.example.test",
            "/c",
            extra=[("cookie", "a=1"), ("cookie", "b=2")],
        )
        self.assertEqual(reply.status, 200)
        seen = self.app.requests[-1]
        self.assertEqual(seen.header(b"Cookie"), [b"a=1; b=2"])

    @inlineCallbacks
    def test_http2_upload_and_errors(self):
        _, port = self.tls_balancer(lb_options="max_body_size = 1KiB")
        context = self.certs.client_context(alpn=["h2"])
        body = b"z" * 1000
        (reply, _) = yield h2_request(
            port, context, "a.example.test", "/up", method="POST", body=body
        )
        self.assertEqual(reply.json()["body_length"], 1000)
        head = self.app.raw[-1].split(b"\r\n\r\n", 1)[0].lower()
        self.assertIn(b"content-length: 1000", head)
        (too_big, _) = yield h2_request(
            port, context, "a.example.test", "/up", method="POST", body=b"z" * 2000
        )
        self.assertEqual(too_big.status, 413)
        (missing, _) = yield h2_request(port, context, "a.example.test", "/../x")
        self.assertEqual(missing.status, 400)

    @inlineCallbacks
    def test_http2_backend_failure_mid_body_resets_the_stream(self):
        _, port = self.tls_balancer()
        context = self.certs.client_context(alpn=["h2"])
        (reply, _) = yield h2_request(port, context, "a.example.test", "/cut/100000")
        self.assertEqual((reply.status, reply.reason), (200, "reset"))
        self.assertLess(len(reply.body), 100000)

    @inlineCallbacks
    def test_http2_offer_declined_when_not_configured(self):
        _, port = self.tls_balancer(tls_options="alpn = http/1.1")
        result = yield handshake(
            port, self.certs.client_context(alpn=["h2", "http/1.1"]), "a.example.test"
        )
        self.assertEqual(result.alpn, "http/1.1")

    @inlineCallbacks
    def test_redirect_https_and_hsts(self):
        service, tls_port = self.tls_balancer(
            route_options="redirect_https = on\nhsts = 1y"
        )
        plain_port = self.port_of(service)
        reply = yield fetch(
            plain_port,
            "/a/../shop?q=1",
            method="POST",
            headers={"Host": "Shop.example.test:8080"},
        )
        self.assertEqual(reply.status, 308)
        self.assertEqual(
            reply.header("Location"), [f"https://shop.example.test:{tls_port}/shop?q=1"]
        )
        self.assertEqual(reply.header("Strict-Transport-Security"), [])
        self.assertEqual(self.app.requests, [])
        secure = yield https(
            tls_port, self.certs.client_context(), "a.example.test", "/shop"
        )
        self.assertEqual(secure.status, 200)
        self.assertEqual(
            secure.header("Strict-Transport-Security"), ["max-age=31536000"]
        )


class HandshakeFailureTests(TLSTestCase):
    @inlineCallbacks
    def test_garbage_does_not_disturb_good_client(self):
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        _, port = self.tls_balancer()
        garbage = socket.create_connection(("127.0.0.1", port))
        self.addCleanup(garbage.close)
        garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = yield https(port, self.certs.client_context(), "a.example.test", "/ok")
        self.assertEqual(reply.status, 200)
        answer = yield threads.deferToThread(garbage.recv, 1024)
        self.assertFalse(answer.startswith(b"HTTP/"))
        yield self.until(
            lambda: any("TLS handshake" in e.get("log_format", "") for e in events)
        )

    @inlineCallbacks
    def test_stalled_handshake_times_out(self):
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        _, port = self.tls_balancer(lb_options="tls_handshake_timeout = 200ms")
        stalled = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
        self.addCleanup(stalled.close)

        def read_until_closed() -> bytes:
            try:
                return stalled.recv(1024)
            except ConnectionResetError:
                return b""

        closed = yield threads.deferToThread(read_until_closed)
        self.assertEqual(closed, b"")
        timed_out = [e for e in events if "timed out" in e.get("log_format", "")]
        self.assertEqual(len(timed_out), 1)
        self.assertEqual(timed_out[0]["timeout"], "200ms")


class BackendTLSTests(TLSTestCase):
    @inlineCallbacks
    def test_https_backend_verified_with_pool_ca(self):
        secure = self.backend("secure", self.certs.issue("backend", "127.0.0.1"))
        ca = self.certs.ca_file
        service = self.one_pool(
            secure.url,
            pool_options=f"tls_ca = {ca}\nhealth_path = /health\nhealth_interval = 50ms",
        )
        reply = yield fetch(self.port_of(service), "/over-tls")
        self.assertEqual((reply.status, reply.json()["backend"]), (200, "secure"))
        yield self.until(lambda: any(r.uri == b"/health" for r in secure.requests))
        self.assertTrue(service.pools["p"].backends[0].in_rotation)

    @inlineCallbacks
    def test_backend_with_wrong_name_refused(self):
        impostor = self.backend(
            "impostor", self.certs.issue("impostor", "other.example.test")
        )
        service = self.one_pool(
            impostor.url, pool_options=f"tls_ca = {self.certs.ca_file}"
        )
        reply = yield fetch(self.port_of(service), "/")
        self.assertEqual(reply.status, 502)
        self.assertEqual(impostor.requests, [])

    @inlineCallbacks
    def test_backend_with_unknown_ca_refused_unless_verify_off(self):
        stranger_ca = Certificates(os.path.abspath(self.mktemp()))
        stranger = self.backend("stranger", stranger_ca.issue("s", "127.0.0.1"))
        refused = self.one_pool(
            stranger.url, pool_options=f"tls_ca = {self.certs.ca_file}"
        )
        reply = yield fetch(self.port_of(refused), "/")
        self.assertEqual(reply.status, 502)
        trusting = self.one_pool(stranger.url, pool_options="tls_verify = off")
        reply = yield fetch(self.port_of(trusting), "/")
        self.assertEqual((reply.status, reply.json()["backend"]), (200, "stranger"))


class CertificateFileTests(SynchronousTestCase):
    def setUp(self):
        self.certs = Certificates(os.path.abspath(self.mktemp()))

    def problems(self, certificates: str) -> list[str]:
        path = os.path.join(self.certs.directory, "lb.ini")
        with open(path, "w") as f:
            f.write(
                MINIMAL.replace("[lb]\n", "[lb]\ntls_listen = tcp:0\n")
                + f"\n[tls]\ncertificates = {certificates}\n"
            )
        try:
            load(path)
        except ConfigError as e:
            return e.problems
        return []

    def test_good_file(self):
        self.assertEqual(self.problems(self.certs.issue("good", "good.test")), [])

    def test_key_not_matching(self):
        one = self.certs.issue("one", "one.test")
        two = self.certs.issue("two", "two.test")
        with open(one) as f:
            key = f.read().split("-----END")[0]
        with open(two) as f:
            chain = f.read().split("PRIVATE KEY-----\n", 2)[-1]
        mixed = os.path.join(self.certs.directory, "mixed.pem")
        with open(mixed, "w") as f:
            f.write(key + "-----END EC PRIVATE KEY-----\n" + chain)
        problems = self.problems(mixed)
        self.assertEqual(len(problems), 1)
        self.assertIn("[tls] certificates: the private key in", problems[0])
        self.assertIn("does not match its first certificate", problems[0])

    def test_no_key(self):
        only_cert = os.path.join(self.certs.directory, "cert.pem")
        self.certs.ca.issue_cert("x.test").cert_chain_pems[0].write_to_path(only_cert)
        problems = self.problems(only_cert)
        self.assertIn("holds no private key", problems[0])

    def test_unreadable_and_empty(self):
        self.assertIn("cannot read", self.problems("missing.pem")[0])
        empty = os.path.join(self.certs.directory, "empty.pem")
        open(empty, "w").close()
        self.assertIn("holds no PEM certificate", self.problems(empty)[0])

    def test_names_from_cn_without_san(self):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, "Legacy.Example.test")]
        )
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256())
        )
        path = os.path.join(self.certs.directory, "legacy.pem")
        with open(path, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                + cert.public_bytes(serialization.Encoding.PEM)
            )
        self.assertEqual(load_certificate_file(path).names, ("legacy.example.test",))

    def test_expiry_warnings(self):
        now = datetime.datetime.now(datetime.UTC)
        soon = load_certificate_file(
            self.certs.issue(
                "soon", "soon.test", not_after=now + datetime.timedelta(days=5)
            )
        )
        later = load_certificate_file(
            self.certs.issue(
                "later", "later.test", not_after=now + datetime.timedelta(days=60)
            )
        )
        gone = load_certificate_file(
            self.certs.issue(
                "gone",
                "gone.test",
                not_before=now - datetime.timedelta(days=10),
                not_after=now - datetime.timedelta(days=1),
            )
        )
        warnings = expiry_warnings([soon, later, gone], now)
        self.assertEqual(len(warnings), 2)
        self.assertIn("soon.pem expires on", warnings[0])
        self.assertIn("in 4 days", warnings[0])
        self.assertIn("gone.pem expired on", warnings[1])


class HTTP2StrictnessTests(TLSTestCase):
    """
    HTTP/2 requests meet the rules HTTP/1.1 requests meet, and a refused
    stream does not take its connection's other streams down.
    """

    def head(self, port, path="/ok", method="GET", extra=()):
        return [
            (":method", method),
            (":path", path),
            (":scheme", "https"),
            (":authority", f"a.example.test:{port}"),
            *extra,
        ]

    @inlineCallbacks
    def test_refusals_per_stream(self):
        _, port = self.tls_balancer(
            lb_options="max_uri_length = 1KiB\nmax_header_size = 2KiB\nmax_headers = 10\nmax_body_size = 1KiB"
        )
        context = self.certs.client_context(alpn=["h2"])
        streams = yield h2_streams(
            port,
            context,
            "a.example.test",
            [
                (self.head(port, "/first"), b""),
                (self.head(port, method="G(T"), b""),
                (self.head(port, "/" + "a" * 2000), b""),
                (self.head(port, extra=[(f"x-{n}", "v") for n in range(12)]), b""),
                (self.head(port, extra=[("x-big", "v" * 3000)]), b""),
                (self.head(port, extra=[("x-ctl", "a\x01b")]), b""),
                (
                    self.head(port, "/up", "POST", extra=[("content-length", "2000")]),
                    b"z" * 2000,
                ),
                (self.head(port, "/last"), b""),
            ],
        )
        self.assertEqual(
            [s.status for s in streams], [200, 400, 414, 431, 431, 400, 413, 200]
        )
        self.assertEqual([r.uri for r in self.app.requests], [b"/first", b"/last"])
        self.assertTrue(self.app_backend_in_rotation())

    def app_backend_in_rotation(self):
        service = self.services[-1]
        return all(b.in_rotation for b in service.pools["p"].backends)

    def tls_balancer(self, *args, **kwargs):
        service, port = super().tls_balancer(*args, **kwargs)
        self.services = [*getattr(self, "services", []), service]
        return service, port

    @inlineCallbacks
    def test_invalid_methods_never_eject_a_backend(self):
        _, port = self.tls_balancer()
        context = self.certs.client_context(alpn=["h2"])
        streams = yield h2_streams(
            port, context, "a.example.test", [(self.head(port, method="G(T"), b"")] * 5
        )
        self.assertEqual({s.status for s in streams}, {400})
        self.assertTrue(self.app_backend_in_rotation())
        self.assertEqual(self.app.requests, [])

    @inlineCallbacks
    def test_slow_body_stream_reset_by_deadline(self):
        _, port = self.tls_balancer(lb_options="client_body_timeout = 300ms")
        context = self.certs.client_context(alpn=["h2"])
        streams = yield h2_streams(
            port,
            context,
            "a.example.test",
            [(self.head(port, "/up", "POST"), None), (self.head(port, "/fine"), b"")],
            deadline=5,
        )
        self.assertTrue(streams[0].reset)
        self.assertEqual(streams[1].status, 200)
        self.assertEqual([r.uri for r in self.app.requests], [b"/fine"])
