# -*- test-case-name: tests.test_demo -*-
"""
Small backends for trying l7lb out: C{python -m l7lb.demo PORT...} serves
one tiny HTTP service per port on 127.0.0.1. Each answers every path with
a short text naming itself and echoing what it received, and C{/health}
with 200, so a newcomer can watch routing, balancing and health checks.
C{python -m l7lb.demo --make-certificate PATH} writes a self-signed
certificate for the demo's TLS listener, if there is none yet.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import sys
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.python import log
from twisted.web.resource import Resource
from twisted.web.server import Request, Site


class DemoBackend(Resource):
    """
    Names itself and echoes the request line and forwarding headers.
    """

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def render(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        if request.path == b"/health":
            return b"ok\n"
        lines = [
            f"backend {self.name}",
            f"{request.method.decode()} {request.uri.decode('latin-1')}",
        ]
        for name in (
            b"Host",
            b"X-Forwarded-For",
            b"X-Forwarded-Proto",
            b"X-Forwarded-Host",
            b"Forwarded",
            b"Via",
            b"X-Request-Id",
        ):
            for value in request.requestHeaders.getRawHeaders(name, []):
                lines.append(f"{name.decode()}: {value.decode('latin-1')}")
        return ("\n".join(lines) + "\n").encode()


def serve(reactor: Any, ports: list[int]) -> None:
    for port in ports:
        site = Site(DemoBackend(f"127.0.0.1:{port}"))
        reactor.listenTCP(port, site, interface="127.0.0.1")


def make_certificate(path: str) -> None:
    """
    A self-signed certificate and key for C{localhost} in one PEM file, made
    once, so the demo can show TLS without shipping a key.
    """
    if os.path.exists(path):
        return
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        os.chmod(path, 0o600)
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    print(f"made a self-signed certificate for localhost: {path}")


def main(argv: list[str]) -> None:
    from twisted.internet import reactor

    if argv[:1] == ["--make-certificate"] and len(argv) == 2:
        make_certificate(argv[1])
        return
    ports = [int(arg) for arg in argv]
    if not ports:
        raise SystemExit(
            "usage: python -m l7lb.demo PORT [PORT...]\n"
            "       python -m l7lb.demo --make-certificate PATH"
        )
    log.startLogging(sys.stdout)
    serve(reactor, ports)
    print(f"demo backends on 127.0.0.1 ports {', '.join(map(str, ports))}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
