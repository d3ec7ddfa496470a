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

import functools
import itertools
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
    if len(values) == 1:
        return _tokens(values[0])
    return frozenset().union(*map(_tokens, values))


@functools.lru_cache(maxsize=1024)
def _tokens(value: bytes) -> frozenset[bytes]:
    """
    The tokens of one C{Connection} value (the same few values come again
    and again: C{keep-alive}, C{close}).
    """
    tokens = set()
    for token in value.split(b","):
        token = token.strip().lower()
        if token and token not in _PROTECTED:
            tokens.add(token)
    return frozenset(tokens)


# New request ids: 32 hex digits, a random prefix for this process and a
# counter, unique without a system call per request.
_ID_PREFIX = os.urandom(8).hex().encode("ascii")
_id_counter = itertools.count(int.from_bytes(os.urandom(4), "big"))


def request_id(values: Sequence[bytes] | None) -> bytes:
    """
    The client's X-Request-Id if it is one well-formed value, else a new one.
    """
    if values and len(values) == 1 and _REQUEST_ID.fullmatch(values[0]):
        return values[0]
    return b"%s%016x" % (_ID_PREFIX, next(_id_counter))


@functools.lru_cache(maxsize=4096)
def _forwarded_node(ip: str) -> bytes:
    """
    An address as RFC 7239 writes it: IPv6 bracketed and quoted.
    """
    return b'"[%s]"' % ip.encode() if ":" in ip else ip.encode()


@functools.lru_cache(maxsize=4096)
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
    out = _kept(incoming)
    host_values = index.get(b"host")
    out += _forwarding_fields(
        client_ip,
        host_values[0] if host_values else None,
        proto,
        _append(index.get(b"via"), via),
        index if trusted_peer else {},
    )
    out.append((b"X-Request-Id", request_id))
    return out


def upstream_request_block(
    incoming: Fields,
    *,
    client_ip: str,
    trusted_peer: bool,
    proto: bytes,
    via: bytes,
    request_id: bytes,
) -> bytes:
    """
    L{upstream_request_fields} serialised, each line ending in CRLF. In the
    common case (an untrusted client that sent nothing to drop) this is the
    client's field lines as received, then a forwarding block made once per
    client address and host.
    """
    raw = incoming.raw
    if raw is not None and not trusted_peer and not _must_drop(incoming.index):
        hosts = incoming.index.get(b"host")
        forwarding = _forwarding_block(
            client_ip, hosts[0] if hosts else None, proto, via
        )
        return b"%s%sX-Request-Id: %s\r\n" % (raw, forwarding, request_id)
    fields = upstream_request_fields(
        incoming,
        client_ip=client_ip,
        trusted_peer=trusted_peer,
        proto=proto,
        via=via,
        request_id=request_id,
    )
    return serialise(fields)


def serialise(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    """
    Field lines as they go on the wire, each ending in CRLF.
    """
    return b"".join([b"%s: %s\r\n" % field for field in fields])


def _must_drop(index: dict[bytes, list[bytes]]) -> bool:
    """
    Whether a request has fields that are not forwarded as sent.
    """
    return not _REQUEST_DROPPED.isdisjoint(index) or b"_" in b"".join(index)


def _kept(incoming: Fields) -> list[tuple[bytes, bytes]]:
    """
    The client's fields that go to the backend as they are.
    """
    index = incoming.index
    drop = index.keys() & _REQUEST_DROPPED
    connection = index.get(b"connection")
    if connection:
        drop.update(connection_tokens(connection))
    if b"_" in b"".join(index):
        # X_Forwarded_For must not pass for X-Forwarded-For with backends
        # that map both to the same variable (CGI, WSGI, PHP).
        drop.update(name for name in index if b"_" in name)
    if drop:
        return [item for item in incoming.items if item[0].lower() not in drop]
    return incoming.items.copy()


@functools.lru_cache(maxsize=4096)
def _forwarding_block(
    client_ip: str, host: bytes | None, proto: bytes, via: bytes
) -> bytes:
    """
    The forwarding fields for a client that is not a trusted proxy, as
    sent: the same for every request of a client to a host.
    """
    return serialise(_forwarding_fields(client_ip, host, proto, via, {}))


def _forwarding_fields(
    client_ip: str,
    host: bytes | None,
    proto: bytes,
    via: bytes,
    prior: dict[bytes, list[bytes]],
) -> list[tuple[bytes, bytes]]:
    """
    X-Forwarded-For/-Proto/-Host, Forwarded and Via for a request from
    C{client_ip} to C{host}; C{prior} holds what a trusted proxy in front
    sent already (extended, or kept), and is empty for anyone else.
    """
    client = client_ip.encode()
    out = []
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
    out.append((b"Via", via))
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
    drop = index.keys() & _RESPONSE_DROPPED
    connection = index.get(b"connection")
    if connection:
        drop.update(connection_tokens(connection))
    if drop:
        out = [item for item in incoming.items if item[0].lower() not in drop]
    else:
        out = incoming.items.copy()
    out.append((b"Via", _append(index.get(b"via"), via)))
    out.append((b"X-Request-Id", request_id))
    out.extend(additions)
    return out


def downstream_response_block(
    incoming: Fields,
    *,
    via: bytes,
    request_id: bytes,
    additions: Sequence[tuple[bytes, bytes]] = (),
) -> bytes | None:
    """
    L{downstream_response_fields} serialised, when the response allows the
    quick way: its field lines as received, without its one Content-Length
    line (the client side frames the body), then l7lb's fields. L{None}
    when it has other fields to drop or to extend (the caller then takes
    the general way).
    """
    raw = incoming.raw
    if raw is None:
        return None
    index = incoming.index
    if not _RESPONSE_DROPPED.isdisjoint(index):
        drop = index.keys() & _RESPONSE_DROPPED
        connection = index.get(b"connection")
        if connection:
            drop.update(connection_tokens(connection) & index.keys())
        if b"via" in drop:
            return None  # the backend's Via is extended: the general way
        raw = _cut_lines(raw, drop, index)
    tail = b"Via: %s\r\nX-Request-Id: %s\r\n" % (via, request_id)
    if additions:
        tail += serialise(additions)
    return raw + tail


def _cut_lines(
    raw: bytes, names: Iterable[bytes], index: dict[bytes, list[bytes]]
) -> bytes:
    """
    The field lines of C{raw} without those of the (lower-cased) C{names}.
    """
    for name in names:
        needle = b"\r\n" + name + b":"
        for _ in index[name]:
            # In "CRLF + raw", a line of raw that starts at i is found at i.
            start = (b"\r\n" + raw.lower()).find(needle)
            end = raw.find(b"\r\n", start) + 2
            raw = raw[:start] + raw[end:]
    return raw


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
