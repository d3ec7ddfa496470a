# -*- test-case-name: tests.test_paths -*-
"""
Request targets in the one spelling that routing judges and backends receive.

A route must not be reachable, or avoidable, by spelling a path differently:
C{/apiB/../apiA}, C{/%61piA} and C{//apiA} all mean C{/apiA}. So the path is
normalised once, before routing, and the normalised form is what is forwarded
(RFC 3986 section 6.2.2): percent-encoded unreserved characters decoded, other
escapes in upper case, dot segments removed (section 5.2.4), repeated slashes
merged. Spellings with no safe meaning are refused: a path that climbs above
C{/}, or that carries an encoded slash, a backslash or a NUL.
"""

from __future__ import annotations

from typing import NamedTuple

_UNRESERVED = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)
# What may stand in a path unescaped (RFC 3986 pchar plus "/"), as a
# deletion table: translating a path with it leaves only the other bytes.
_PATH_BYTES = bytes(_UNRESERVED) + b"!$&'()*+,;=:@/"
# The query also allows "?" and, in practice, a few bytes that clients send
# raw and servers accept ("|", "^", "[", "]", "{", "}", "`", '"', "<", ">").
_QUERY_BYTES = _PATH_BYTES + b'?%|^[]{}`"<>'
_HEX = b"0123456789ABCDEFabcdef"
_REFUSED_ESCAPES = {b"2F": "an encoded slash", b"5C": "an encoded backslash"}


class BadTarget(ValueError):
    """
    The request target cannot be turned into a safe path; the client gets 400.
    """


class Target(NamedTuple):
    """
    A request target split and normalised: the path routes, all of it is
    forwarded. C{authority} is set only for an absolute-form target.
    """

    path: bytes
    query: bytes | None
    authority: bytes | None = None

    @property
    def route_path(self) -> bytes:
        """
        The path routes are matched against: without C{;parameters}, which
        some backends (Java servlet containers) drop before they route, so
        that C{/admin;x=1} cannot dodge a rule written for C{/admin}.
        """
        if b";" not in self.path:
            return self.path
        return b"/".join(
            segment.partition(b";")[0] for segment in self.path.split(b"/")
        )

    def forwarded(self, path: bytes | None = None) -> bytes:
        """
        The origin-form target to send upstream, optionally with a new path.
        """
        path = self.path if path is None else path
        return path if self.query is None else path + b"?" + self.query


def parse_target(raw: bytes) -> Target:
    """
    Split and normalise a request target in origin form (C{/p?q}) or absolute
    form (C{http://host/p?q}).
    """
    authority = None
    if raw[:1] != b"/":
        raw, authority = _split_absolute(raw)
    if b"#" in raw:
        raise BadTarget("a fragment in the request target")
    path, sep, query = raw.partition(b"?")
    return Target(normalise_path(path), _clean_query(query) if sep else None, authority)


def normalise_path(path: bytes) -> bytes:
    """
    The normal form of an absolute path, or L{BadTarget}.
    """
    if path[:1] != b"/":
        raise BadTarget("the path does not start with /")
    if (
        not path.translate(None, _PATH_BYTES)
        and b"//" not in path
        and b"/." not in path
    ):
        return path
    return _rebuild(path)


def _rebuild(path: bytes) -> bytes:
    segments: list[bytes] = []
    parts = _decode(path).split(b"/")
    # parts[0] is the empty text before the leading slash.
    for part in parts[1:]:
        if part[:2] == b".;" or part[:3] == b"..;":
            raise BadTarget("a dot segment with parameters in the path")
        if part == b"..":
            if not segments:
                raise BadTarget("the path climbs above /")
            segments.pop()
        elif part not in (b".", b""):
            segments.append(part)
    trailing = parts[-1] in (b"", b".", b"..") and bool(segments)
    return b"/" + b"/".join(segments) + (b"/" if trailing else b"")


def _decode(path: bytes) -> bytes:
    """
    Decode escapes of unreserved bytes, upper-case the others, escape bytes
    that may not stand raw; refuse what has no safe meaning.
    """
    out = bytearray()
    i, n = 0, len(path)
    while i < n:
        byte = path[i]
        if byte == 0x25:  # "%"
            pair = path[i + 1 : i + 3]
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                raise BadTarget("a malformed percent-escape in the path")
            pair = pair.upper()
            value = int(pair, 16)
            if pair in _REFUSED_ESCAPES:
                raise BadTarget(f"{_REFUSED_ESCAPES[pair]} in the path")
            if value == 0:
                raise BadTarget("a NUL in the path")
            if value in _UNRESERVED:
                out.append(value)
            else:
                out += b"%" + pair
            i += 3
            continue
        if byte == 0x5C:
            raise BadTarget("a backslash in the path")
        if byte <= 0x20 or byte == 0x7F:
            raise BadTarget("a control character or space in the path")
        if byte >= 0x80 or bytes((byte,)).translate(None, _PATH_BYTES):
            out += b"%%%02X" % byte
        else:
            out.append(byte)
        i += 1
    return bytes(out)


def _clean_query(query: bytes) -> bytes:
    """
    The query is forwarded as sent, except that bytes no URI may hold raw are
    escaped and control characters refused.
    """
    if not query.translate(None, _QUERY_BYTES):
        return query
    out = bytearray()
    for byte in query:
        if byte <= 0x20 or byte == 0x7F:
            raise BadTarget("a control character or space in the query")
        if byte >= 0x80 or bytes((byte,)).translate(None, _QUERY_BYTES):
            out += b"%%%02X" % byte
        else:
            out.append(byte)
    return bytes(out)


def _split_absolute(raw: bytes) -> tuple[bytes, bytes]:
    """
    C{http://host:port/p?q} -> (C{/p?q}, C{host:port}).
    """
    scheme, sep, rest = raw.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise BadTarget("the request target is neither a path nor an http URL")
    end = len(rest)
    for delimiter in b"/?#":
        position = rest.find(bytes((delimiter,)))
        if position != -1:
            end = min(end, position)
    authority, remainder = rest[:end], rest[end:]
    if not authority or b"@" in authority:
        raise BadTarget("the URL has no host, or carries credentials")
    if remainder[:1] != b"/":
        remainder = b"/" + remainder
    return remainder, authority
