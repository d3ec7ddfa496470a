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

from l7lb.fields import Fields

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
# Never forwarded from the client as sent: l7lb frames the body itself, has
# already answered any Expect, and writes these forwarding headers itself.
_REQUEST_DROPPED = HOP_BY_HOP | {
    b"content-length",
    b"expect",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"forwarded",
    b"via",
    b"x-request-id",
}
_RESPONSE_DROPPED = HOP_BY_HOP | {b"content-length", b"via", b"x-request-id"}
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


def upstream_request_fields(
    incoming: Fields,
    *,
    client_ip: str,
    trusted_peer: bool,
    proto: bytes,
    via: bytes,
    request_id: bytes,
) -> list[tuple[bytes, bytes]]:
    """
    The header fields to send the backend for a client request, in order:
    the client's own (as spelled) and then l7lb's forwarding headers.
    """
    index = incoming.index
    dropped = connection_tokens(index.get(b"connection"))
    out = []
    for item in incoming.items:
        name = item[0]
        lowered = name.lower()
        if lowered in _REQUEST_DROPPED or (dropped and lowered in dropped):
            continue
        if b"_" in name:
            # X_Forwarded_For must not pass for X-Forwarded-For with backends
            # that map both to the same variable (CGI, WSGI, PHP).
            continue
        out.append(item)

    client = client_ip.encode()
    host_values = index.get(b"host")
    host = host_values[0] if host_values else None
    prior: dict[bytes, list[bytes]] = index if trusted_peer else {}

    forwarded_for = prior.get(b"x-forwarded-for")
    out.append(
        (
            b"X-Forwarded-For",
            b", ".join([*forwarded_for, client]) if forwarded_for else client,
        )
    )
    for value in prior.get(b"x-forwarded-proto") or (proto,):
        out.append((b"X-Forwarded-Proto", value))
    for value in prior.get(b"x-forwarded-host") or ((host,) if host else ()):
        out.append((b"X-Forwarded-Host", value))

    element = b"for=" + _forwarded_node(client_ip)
    if host:
        element += b";host=" + _forwarded_value(host)
    element += b";proto=" + proto
    earlier = prior.get(b"forwarded")
    out.append((b"Forwarded", b", ".join([*earlier, element]) if earlier else element))
    out.append((b"Via", _append(index.get(b"via"), via)))
    out.append((b"X-Request-Id", request_id))
    return out


def downstream_response_fields(
    incoming: Fields,
    *,
    via: bytes,
    request_id: bytes,
    additions: Sequence[tuple[bytes, bytes]] = (),
) -> list[tuple[bytes, bytes]]:
    """
    The header fields to send the client for a backend response, framing
    aside (the client side frames the body itself). C{additions} are l7lb's
    own headers for this response (Strict-Transport-Security, RateLimit,
    Set-Cookie...).
    """
    index = incoming.index
    dropped = connection_tokens(index.get(b"connection"))
    out = []
    for item in incoming.items:
        lowered = item[0].lower()
        if lowered in _RESPONSE_DROPPED or (dropped and lowered in dropped):
            continue
        out.append(item)
    out.append((b"Via", _append(index.get(b"via"), via)))
    out.append((b"X-Request-Id", request_id))
    out.extend(additions)
    return out


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
