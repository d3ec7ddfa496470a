"""
TLS test support: certificates made at test time with trustme, blocking TLS
clients (the stdlib's ssl and http.client) and a small HTTP/2 client driven
by hand with the h2 library, all run in threads.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import trustme
from twisted.internet import threads
from twisted.internet.defer import Deferred

from tests.support import CLIENT_TIMEOUT, Reply


@dataclass
class Certificates:
    """
    A test CA and PEM files (chain and key together) issued by it.
    """

    directory: str
    ca: trustme.CA = field(default_factory=trustme.CA)

    def __post_init__(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        self.ca_file = os.path.join(self.directory, "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)

    def issue(self, name: str, *identities: str, **options: object) -> str:
        """
        A combined PEM file for C{identities}, written as C{name}.pem.
        """
        leaf = self.ca.issue_cert(*identities, **options)  # type: ignore[arg-type]
        path = os.path.join(self.directory, f"{name}.pem")
        leaf.private_key_and_cert_chain_pem.write_to_path(path)
        return path

    def client_context(
        self,
        alpn: list[str] | None = None,
        minimum: ssl.TLSVersion | None = None,
        maximum: ssl.TLSVersion | None = None,
        ciphers: str | None = None,
        check_hostname: bool = True,
    ) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        context.check_hostname = check_hostname
        if alpn:
            context.set_alpn_protocols(alpn)
        if minimum is not None:
            context.minimum_version = minimum
        if maximum is not None:
            context.maximum_version = maximum
        if ciphers is not None:
            context.set_ciphers(ciphers)
        return context


@dataclass
class Handshake:
    """
    What a client learnt from a TLS handshake.
    """

    names: list[str]
    version: str | None
    cipher: str | None
    alpn: str | None


def _handshake(
    port: int, context: ssl.SSLContext, server_name: str | None
) -> Handshake:
    raw = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    with raw, context.wrap_socket(raw, server_hostname=server_name) as tls:
        certificate = tls.getpeercert()
        names = [
            value
            for kind, value in certificate.get("subjectAltName", ())
            if kind == "DNS"
        ]
        cipher = tls.cipher()
        return Handshake(
            names,
            tls.version(),
            cipher[0] if cipher else None,
            tls.selected_alpn_protocol(),
        )


def handshake(
    port: int, context: ssl.SSLContext, server_name: str | None
) -> Deferred[Handshake]:
    return threads.deferToThread(_handshake, port, context, server_name)


def _https(
    port: int,
    context: ssl.SSLContext,
    server_name: str,
    path: str,
    method: str,
    headers: dict[str, str] | None,
    body: bytes | None,
) -> Reply:
    connection = http.client.HTTPSConnection(
        "127.0.0.1", port, timeout=CLIENT_TIMEOUT, context=context
    )
    # Connect to 127.0.0.1 but present and check server_name.
    connection.host = server_name
    connection._create_connection = lambda address, *args, **kwargs: (
        socket.create_connection(  # type: ignore[attr-defined]
            ("127.0.0.1", port), *args, **kwargs
        )
    )
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Reply(
            response.status, response.reason, response.getheaders(), response.read()
        )
    finally:
        connection.close()


def https(
    port: int,
    context: ssl.SSLContext,
    server_name: str,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> Deferred[Reply]:
    """
    One HTTP/1.1 request over TLS with the stdlib's http.client.
    """
    return threads.deferToThread(
        _https, port, context, server_name, path, method, headers, body
    )


def _h2_request(
    port: int,
    context: ssl.SSLContext,
    server_name: str,
    path: str,
    method: str,
    extra: list[tuple[str, str]],
    body: bytes,
) -> tuple[Reply, str | None]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    with raw, context.wrap_socket(raw, server_hostname=server_name) as tls:
        alpn = tls.selected_alpn_protocol()
        connection = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True)
        )
        connection.initiate_connection()
        stream = connection.get_next_available_stream_id()
        connection.send_headers(
            stream,
            [
                (":method", method),
                (":path", path),
                (":scheme", "https"),
                (":authority", f"{server_name}:{port}"),
                *extra,
            ],
            end_stream=not body,
        )
        if body:
            connection.send_data(stream, body, end_stream=True)
        tls.sendall(connection.data_to_send())
        status, headers, chunks, done, reason = 0, [], [], False, ""
        while not done:
            data = tls.recv(65536)
            if not data:
                break
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    for name, value in event.headers:
                        name, value = name.decode(), value.decode()
                        if name == ":status":
                            status = int(value)
                        else:
                            headers.append((name, value))
                elif isinstance(event, h2.events.DataReceived):
                    chunks.append(event.data)
                    connection.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(event, h2.events.StreamEnded):
                    done = True
                elif isinstance(event, h2.events.StreamReset):
                    done, reason = True, "reset"
            tls.sendall(connection.data_to_send())
        return Reply(status, reason, headers, b"".join(chunks)), alpn


def h2_request(
    port: int,
    context: ssl.SSLContext,
    server_name: str,
    path: str,
    method: str = "GET",
    extra: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> Deferred[tuple[Reply, str | None]]:
    """
    One HTTP/2 request; fires with the reply and the protocol ALPN chose.
    """
    return threads.deferToThread(
        _h2_request, port, context, server_name, path, method, extra or [], body
    )


@dataclass
class H2Stream:
    """
    One stream's outcome: status, headers, body, and whether it was reset.
    """

    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    reset: bool = False
    ended: bool = False


def _h2_streams(
    port: int,
    context: ssl.SSLContext,
    server_name: str,
    requests: list[tuple[list[tuple[str, str]], bytes | None]],
    deadline: float,
) -> list[H2Stream]:
    """
    Several requests as streams of one HTTP/2 connection; each request is
    its full header list (pseudo-headers included) and a body, C{None} for
    a body that never ends.
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=deadline)
    with raw, context.wrap_socket(raw, server_hostname=server_name) as tls:
        connection = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
        )
        connection.initiate_connection()
        streams: dict[int, H2Stream] = {}
        for headers, body in requests:
            stream_id = connection.get_next_available_stream_id()
            streams[stream_id] = H2Stream()
            connection.send_headers(stream_id, headers, end_stream=body == b"")
            if body:
                connection.send_data(stream_id, body, end_stream=True)
            elif body is None:
                connection.send_data(stream_id, b"x")
        tls.sendall(connection.data_to_send())
        while not all(s.ended or s.reset for s in streams.values()):
            try:
                data = tls.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            for event in connection.receive_data(data):
                stream = streams.get(getattr(event, "stream_id", 0))
                if stream is None:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
                    for name, value in event.headers:
                        if name == b":status":
                            stream.status = int(value)
                        else:
                            stream.headers.append((name.decode(), value.decode()))
                elif isinstance(event, h2.events.DataReceived):
                    stream.body += event.data
                    connection.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(event, h2.events.StreamEnded):
                    stream.ended = True
                elif isinstance(event, h2.events.StreamReset):
                    stream.reset = True
            tls.sendall(connection.data_to_send())
        return list(streams.values())


def h2_streams(
    port: int,
    context: ssl.SSLContext,
    server_name: str,
    requests: list[tuple[list[tuple[str, str]], bytes | None]],
    deadline: float = CLIENT_TIMEOUT,
) -> Deferred[list[H2Stream]]:
    return threads.deferToThread(
        _h2_streams, port, context, server_name, requests, deadline
    )
