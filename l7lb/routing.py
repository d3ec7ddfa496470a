# -*- test-case-name: tests.test_routing -*-
"""
The route map: which route, if any, a request belongs to.

A route matches when every condition it names holds. Among matches an exact
host beats a wildcard host (the longer wildcard first) beats no host; then the
longest path prefix wins; then the route written first.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from l7lb.config import RouteConfig
from l7lb.fields import Fields


@dataclass(frozen=True, slots=True)
class _Rule:
    """
    A route's conditions prepared for matching bytes from the wire.
    """

    route: RouteConfig
    exact_host: bytes | None
    host_suffix: bytes | None
    prefix: bytes | None
    prefix_slash: bytes | None
    methods: frozenset[bytes] | None
    header: tuple[bytes, bytes] | None

    def matches(
        self, method: bytes, host: bytes | None, path: bytes, headers: Fields
    ) -> bool:
        if self.exact_host is not None and host != self.exact_host:
            return False
        if self.host_suffix is not None and (
            host is None or not host.endswith(self.host_suffix)
        ):
            return False
        if self.prefix_slash is not None and not (
            path == self.prefix or path.startswith(self.prefix_slash)
        ):
            return False
        if self.methods is not None and method not in self.methods:
            return False
        if self.header is not None:
            values = headers.get(self.header[0])
            if not values or self.header[1] not in values:
                return False
        return True


def _rule(route: RouteConfig) -> _Rule:
    exact = suffix = None
    if route.host is not None:
        host = route.host.encode("ascii")
        if host.startswith(b"*."):
            suffix = host[1:]
        else:
            exact = host
    prefix = route.path_prefix
    if prefix == b"/":
        prefix = None
    return _Rule(
        route=route,
        exact_host=exact,
        host_suffix=suffix,
        prefix=prefix,
        prefix_slash=prefix + b"/" if prefix is not None else None,
        methods=route.methods,
        header=route.header,
    )


def _precedence(item: tuple[int, _Rule]) -> tuple[int, int, int, int]:
    index, rule = item
    if rule.exact_host is not None:
        host_rank, host_length = 0, 0
    elif rule.host_suffix is not None:
        host_rank, host_length = 1, -len(rule.host_suffix)
    else:
        host_rank, host_length = 2, 0
    prefix_length = len(rule.prefix) if rule.prefix is not None else 0
    return host_rank, host_length, -prefix_length, index


class RouteMap:
    """
    Routes in order of precedence, ready to be matched.
    """

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        ordered = sorted(enumerate(_rule(route) for route in routes), key=_precedence)
        self._rules = tuple(rule for _, rule in ordered)

    @property
    def routes(self) -> tuple[RouteConfig, ...]:
        """
        The routes, most specific first: the order in which they are tried.
        """
        return tuple(rule.route for rule in self._rules)

    def match(
        self, method: bytes, host: bytes | None, path: bytes, headers: Fields
    ) -> RouteConfig | None:
        """
        The route for a request, or C{None}. C{host} is as L{host_name} gives
        it; C{path} is already normalised.
        """
        for rule in self._rules:
            if rule.matches(method, host, path, headers):
                return rule.route
        return None


# RFC 9110 section 7.2, without percent-encoding: an escaped name would
# match no host condition and so could dodge one.
_HOST_VALUE = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=-]*)(:[0-9]*)?")


def valid_host(value: bytes) -> bool:
    """
    Whether a Host value is C{host[:port]} as RFC 9110 section 7.2 has it.
    """
    return _HOST_VALUE.fullmatch(value) is not None


@functools.lru_cache(maxsize=4096)
def checked_host_name(value: bytes) -> bytes | None:
    """
    L{host_name} of a valid Host value, L{None} for an invalid one; a
    client sends the same Host again and again, so the answer is kept.
    """
    return host_name(value) if valid_host(value) else None


def host_name(value: bytes) -> bytes:
    """
    The name part of a Host value, lower-cased, without port or final dot:
    C{API.Example.com.:8080} -> C{api.example.com}.
    """
    if value.startswith(b"["):
        end = value.find(b"]")
        name = value[: end + 1] if end != -1 else value
    else:
        name, sep, port = value.rpartition(b":")
        if not sep or (port and not port.isdigit()):
            name = value
    return name.rstrip(b".").lower()


def strip_prefix(path: bytes, prefix: bytes) -> bytes:
    """
    C{/apiA/x} without the prefix C{/apiA} is C{/x}; C{/apiA} itself is C{/}.
    The prefix's segments go whole, parameters and all (C{/apiA;v=1/x} is
    C{/x}), since routes match paths without their parameters.
    """
    if prefix == b"/":
        return path
    depth = prefix.count(b"/")
    rest = path.split(b"/", depth + 1)
    return b"/" + rest[depth + 1] if len(rest) > depth + 1 else b"/"
