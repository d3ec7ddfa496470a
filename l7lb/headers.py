# -*- test-case-name: tests.test_headers -*-
"""
Header rewriting at the proxy hop, both ways (SPEC section 3).

Hop-by-hop headers, and every header the sender named in C{Connection},
stay on their own hop. Framing (Content-Length, Transfer-Encoding) is
always l7lb's own. Towards the backend l7lb adds what it knows about the
client: X-Forwarded-For/-Proto/-Host, Forwarded (RFC 7239), Via and
X-Request-Id. A peer in C{trusted_proxies} may have sent these already; its
values are kept and extended. From anyone else they are replaced.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

from twisted.internet.interfaces import IReactorTime
from twisted.web.http import datetimeToString
from twisted.web.http_headers import Headers

# Twisted's Headers store names in this canonical capitalisation.
HOP_BY_HOP = frozenset(
    {
        b"Connection",
        b"Keep-Alive",
        b"Proxy-Connection",
        b"TE",
        b"Trailer",
        b"Transfer-Encoding",
        b"Upgrade",
        b"Proxy-Authorization",
        b"Proxy-Authenticate",
    }
)
# Never forwarded from the client as sent: l7lb frames the body itself, has
# already answered any Expect, and writes these forwarding headers itself.
_REQUEST_DROPPED = HOP_BY_HOP | {
    b"Content-Length",
    b"Expect",
    b"X-Forwarded-For",
    b"X-Forwarded-Proto",
    b"X-Forwarded-Host",
    b"Forwarded",
    b"Via",
    b"X-Request-Id",
}
_RESPONSE_DROPPED = HOP_BY_HOP | {b"Content-Length", b"Via", b"X-Request-Id"}
# The Connection header may not remove what the message cannot do without.
_PROTECTED = frozenset({b"host", b"content-length"})

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def connection_tokens(values: Sequence[bytes] | None) -> frozenset[bytes]:
    """
    The lower-cased header names listed in C{Connection} values.
    """
    if not values:
        return frozenset()
    tokens = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token and token not in _PROTECTED:
                tokens.add(token)
    return frozenset(tokens)


def request_id(values: Sequence[bytes] | None) -> bytes:
    """
    The client's X-Request-Id if it is one well-formed value, else a new one.
    """
    if values and len(values) == 1 and _REQUEST_ID.fullmatch(values[0]):
        return values[0]
    return os.urandom(16).hex().encode("ascii")


def _forwarded_node(ip: str) -> bytes:
    """
    An address as RFC 7239 writes it: IPv6 bracketed and quoted.
    """
    return b'"[%s]"' % ip.encode() if ":" in ip else ip.encode()


def _forwarded_value(value: bytes) -> bytes:
    """
    A token stays bare; anything else becomes a quoted-string.
    """
    if TOKEN.fullmatch(value):
        return value
    return b'"%s"' % value.replace(b"\\", b"\\\\").replace(b'"', b'\\"')


def upstream_request_headers(
    incoming: Headers,
    *,
    client_ip: str,
    trusted_peer: bool,
    proto: bytes,
    via: bytes,
    request_id: bytes,
) -> Headers:
    """
    The headers to send the backend for a client request.
    """
    raw = incoming._rawHeaders
    dropped = connection_tokens(raw.get(b"Connection"))
    out: dict[bytes, list[bytes]] = {}
    for name, values in raw.items():
        if name in _REQUEST_DROPPED or (dropped and name.lower() in dropped):
            continue
        if b"_" in name:
            # X_Forwarded_For must not pass for X-Forwarded-For with backends
            # that map both to the same variable (CGI, WSGI, PHP).
            continue
        out[name] = list(values)

    client = client_ip.encode()
    host_values = raw.get(b"Host")
    host = host_values[0] if host_values else None
    prior = raw if trusted_peer else {}

    forwarded_for = prior.get(b"X-Forwarded-For")
    out[b"X-Forwarded-For"] = [
        b", ".join([*forwarded_for, client]) if forwarded_for else client
    ]
    out[b"X-Forwarded-Proto"] = list(prior.get(b"X-Forwarded-Proto") or [proto])
    forwarded_host = prior.get(b"X-Forwarded-Host") or ([host] if host else None)
    if forwarded_host:
        out[b"X-Forwarded-Host"] = list(forwarded_host)

    element = b"for=" + _forwarded_node(client_ip)
    if host:
        element += b";host=" + _forwarded_value(host)
    element += b";proto=" + proto
    earlier = prior.get(b"Forwarded")
    out[b"Forwarded"] = [b", ".join([*earlier, element]) if earlier else element]

    out[b"Via"] = [_append(raw.get(b"Via"), via)]
    out[b"X-Request-Id"] = [request_id]
    headers = Headers()
    headers._rawHeaders = out
    return headers


def downstream_response_headers(
    incoming: Headers,
    connection: Sequence[bytes] | None,
    *,
    via: bytes,
    request_id: bytes,
    content_length: bytes | None,
    additions: Sequence[tuple[bytes, bytes]] = (),
) -> Headers:
    """
    The headers to send the client for a backend response. C{connection} is
    the backend's Connection header, C{content_length} its Content-Length
    when the body is length-delimited; C{additions} are l7lb's own headers
    for this response (Strict-Transport-Security, RateLimit, Set-Cookie...).
    """
    raw = incoming._rawHeaders
    dropped = connection_tokens(connection)
    out: dict[bytes, list[bytes]] = {}
    for name, values in raw.items():
        if name in _RESPONSE_DROPPED or (dropped and name.lower() in dropped):
            continue
        out[name] = list(values)
    if content_length is not None:
        out[b"Content-Length"] = [content_length]
    out[b"Via"] = [_append(raw.get(b"Via"), via)]
    out[b"X-Request-Id"] = [request_id]
    for name, value in additions:
        out.setdefault(name, []).append(value)
    headers = Headers()
    headers._rawHeaders = out
    return headers


def _append(values: Iterable[bytes] | None, item: bytes) -> bytes:
    return b", ".join([*values, item]) if values else item


class HTTPDate:
    """
    The value of a Date header for now, formatted once a second.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        second = int(self._clock.seconds())
        if second != self._second:
            self._second = second
            self._value = datetimeToString(second)
        return self._value
