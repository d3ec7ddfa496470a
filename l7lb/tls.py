# -*- test-case-name: tests.test_tls -*-
"""
TLS at both ends of the proxy.

Towards clients: certificates chosen by SNI from a prepared map of the names
in their subjectAltNames, TLS 1.2 and 1.3 only, Mozilla's "intermediate"
TLS 1.2 ciphers (ECDHE with AES-GCM or ChaCha20), no compression, no
renegotiation, session resumption, ALPN (h2 and http/1.1). The connection
itself (L{l7lb.site.NegotiatingConnection}) gives the handshake a deadline,
so a stalled or garbled one costs a connection and a log line.

Towards backends: C{https://} servers verified against the system's trust
store, or a CA file, with service-identity checking the name (or not at all
when a pool says C{tls_verify = off}).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from OpenSSL.crypto import X509, PKey
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IAddress,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
)
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from l7lb.certificates import CertificateFile, load_ca_certificates
from l7lb.config import PoolConfig, ServerConfig, TLSConfig
from l7lb.wire import write_now

# Mozilla's "intermediate" configuration for TLS 1.2, without the DHE suites:
# forward secrecy from ECDHE, authenticated encryption only. TLS 1.3 suites
# are OpenSSL's defaults, all of which are sound.
TLS12_CIPHERS = b":".join(
    [
        b"ECDHE-ECDSA-AES128-GCM-SHA256",
        b"ECDHE-RSA-AES128-GCM-SHA256",
        b"ECDHE-ECDSA-AES256-GCM-SHA384",
        b"ECDHE-RSA-AES256-GCM-SHA384",
        b"ECDHE-ECDSA-CHACHA20-POLY1305",
        b"ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
_VERSIONS = {"TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": SSL.TLS1_3_VERSION}


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    Makes the OpenSSL connection for each accepted TLS connection: the first
    certificate's context, switched by SNI to the one that serves the name.
    """

    def __init__(self, config: TLSConfig, files: Sequence[CertificateFile]) -> None:
        self.update(config, files)

    def update(self, config: TLSConfig, files: Sequence[CertificateFile]) -> None:
        """
        Take new certificates and settings: new handshakes use them, the
        connections already open are not disturbed.
        """
        self._protocols = [p.encode("ascii") for p in config.alpn]
        self._minimum = _VERSIONS[config.min_version]
        self._exact: dict[bytes, SSL.Context] = {}
        self._wildcard: dict[bytes, SSL.Context] = {}
        contexts = [
            self._context(certificate, index) for index, certificate in enumerate(files)
        ]
        # Earlier files win a name that several serve.
        for certificate, context in reversed(list(zip(files, contexts, strict=True))):
            for name in certificate.names:
                encoded = name.encode("idna")
                if encoded.startswith(b"*."):
                    self._wildcard[encoded[2:]] = context
                else:
                    self._exact[encoded] = context
        self.default = contexts[0]

    def _context(self, certificate: CertificateFile, index: int) -> SSL.Context:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(self._minimum)
        context.set_options(
            SSL.OP_NO_COMPRESSION
            | SSL.OP_NO_RENEGOTIATION
            | SSL.OP_CIPHER_SERVER_PREFERENCE
        )
        context.set_cipher_list(TLS12_CIPHERS)
        # An idle connection gives its record buffers back (about 34 KiB
        # each), as NGINX has OpenSSL do: thousands of idle keep-alive TLS
        # clients would otherwise hold them all.
        context.set_mode(SSL.MODE_RELEASE_BUFFERS)
        context.use_certificate(X509.from_cryptography(certificate.chain[0]))
        for intermediate in certificate.chain[1:]:
            context.add_extra_chain_cert(X509.from_cryptography(intermediate))
        context.use_privatekey(PKey.from_cryptography_key(certificate.key))  # type: ignore[arg-type]
        context.check_privatekey()
        # Resumption: a server-side session cache and TLS 1.3 tickets (the
        # default); an id context per certificate, so a session made under
        # one name cannot be resumed under another.
        context.set_session_id(b"l7lb-%d" % index)
        context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        context.set_tlsext_servername_callback(self._choose_certificate)
        context.set_alpn_select_callback(self._choose_protocol)
        return context

    def context_for(self, name: bytes | None) -> SSL.Context:
        """
        The context serving C{name}: exact match, then wildcard, then the
        first certificate.
        """
        if name:
            name = name.lower().rstrip(b".")
            context = self._exact.get(name)
            if context is not None:
                return context
            parent = name.partition(b".")[2]
            context = self._wildcard.get(parent)
            if context is not None:
                return context
        return self.default

    def _choose_certificate(self, connection: SSL.Connection) -> None:
        context = self.context_for(connection.get_servername())
        if context is not self.default:
            connection.set_context(context)

    def _choose_protocol(
        self, connection: SSL.Connection, offered: list[bytes]
    ) -> bytes:
        for protocol in self._protocols:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.default, None)


class _ServerTLSProtocol(TLSMemoryBIOProtocol):
    """
    Twisted's TLS protocol, sending its records at once when the socket
    takes them (see L{l7lb.wire}) rather than on the next turn of the loop;
    the HTTP side already writes each response in one piece, so Twisted's
    aggregation of small writes would only add a timer per response.
    """

    def _flushSendBIO(self) -> None:
        try:
            data = self._tlsConnection.bio_read(2**15)
        except SSL.WantReadError:
            return  # nothing to send
        write_now(self.transport, data)


class _TLSListenerFactory(TLSMemoryBIOFactory):
    """
    TLS in front of the site; a connection past the site's connection caps
    is closed before any TLS work is spent on it.
    """

    protocol = _ServerTLSProtocol
    noisy = False

    def __init__(self, creator: ServerTLS, site: Any) -> None:
        super().__init__(creator, False, site)
        self.site = site

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if not self.site.connections.admits(addr, self.site.limits):
            return None
        return super().buildProtocol(addr)


def tls_server_factory(site: Any, creator: ServerTLS) -> IProtocolFactory:
    """
    The factory for a C{tls_listen} endpoint: TLS, then the site (whose
    connections give the handshake its deadline, C{[lb]
    tls_handshake_timeout}, and speak HTTP/2 when ALPN chose it).
    """
    return _TLSListenerFactory(creator, site)


def backend_tls(
    server: ServerConfig, pool: PoolConfig
) -> IOpenSSLClientConnectionCreator:
    """
    How l7lb connects to an C{https://} backend: verified against the system
    trust store or the pool's C{tls_ca}, unless C{tls_verify = off}.
    """
    if not pool.tls_verify:
        options: IOpenSSLClientConnectionCreator = ssl.CertificateOptions(
            verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2
        )
        return options
    trust = ssl.platformTrust() if pool.tls_ca is None else ca_trust(pool.tls_ca)
    return ssl.optionsForClientTLS(
        server.host, trustRoot=trust, acceptableProtocols=[b"http/1.1"]
    )


def ca_trust(path: str) -> Any:
    """
    A trust root from a PEM file of one or more CA certificates.
    """
    return ssl.trustRootFromCertificates(
        [
            ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
            for c in load_ca_certificates(path)
        ]
    )
