# -*- test-case-name: tests.test_resource -*-
"""
The twisted.web resource every request reaches: it normalises the target,
consults the route map and hands the request to the forwarder.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from l7lb.access import AccessList
from l7lb.headers import request_id
from l7lb.paths import BadTarget, parse_target
from l7lb.pool import Pool
from l7lb.proxy import Forwarder
from l7lb.ratelimit import RateLimiter
from l7lb.request import ClientRequest
from l7lb.routing import RouteMap, checked_host_name, strip_prefix


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """
    What a route asks of a request before it is forwarded: an allowed
    client address, and a token from its rate limit.
    """

    access: AccessList | None = None
    limiter: RateLimiter | None = None


_NO_POLICY = RoutePolicy()


class Admission(NamedTuple):
    """
    A request the balancer takes: the pool and the origin-form target.
    """

    pool: Pool
    target: bytes


@dataclass(frozen=True, slots=True)
class Refusal:
    """
    A request the balancer answers itself, with extra headers.
    """

    status: int
    headers: dict[bytes, bytes] = field(default_factory=dict)


class BalancerResource(Resource):
    """
    Routes each request to its pool after the route's access list and rate
    limit admit it; answers 400, 403, 404, 429 and HTTPS redirects itself.
    C{https_port} tells where the TLS listener is, for redirects.
    """

    isLeaf = True

    def __init__(
        self,
        routes: RouteMap,
        pools: Mapping[str, Pool],
        forwarder: Forwarder,
        https_port: Callable[[], int | None] = lambda: None,
        policies: Mapping[str, RoutePolicy] | None = None,
    ) -> None:
        super().__init__()
        self.routes = routes
        self.pools = pools
        self.forwarder = forwarder
        self.https_port = https_port
        self.policies = policies or {}

    def render(self, request: ClientRequest) -> int:
        verdict = request.admission or self.admit(request, request.method, request.uri)
        if isinstance(verdict, Refusal):
            request.respond_error(verdict.status, verdict.headers)
        else:
            self.forwarder.forward(request, verdict.pool, verdict.target)
        return NOT_DONE_YET

    def admit(
        self, request: ClientRequest, method: bytes, uri: bytes
    ) -> Admission | Refusal:
        """
        Decide what becomes of a request from its head alone: which pool and
        target, or which refusal (400, 403, 404, 429, a 308 to https). It is
        decided once, and may be decided before the body is read (to answer
        C{Expect: 100-continue} only when the request will be taken); the
        verdict is kept on the request.
        """
        verdict = self._decide(request, method, uri)
        request.admission = verdict
        return verdict

    def _decide(
        self, request: ClientRequest, method: bytes, uri: bytes
    ) -> Admission | Refusal:
        headers = request.headers
        request.request_id = request_id(headers.index.get(b"x-request-id"))
        try:
            target = parse_target(uri)
            name = self._host(request, target.authority)
        except BadTarget:
            return Refusal(400)
        route = self.routes.match(method, name, target.route_path, headers)
        if route is None:
            return Refusal(404)
        request.route_name = route.name
        if request.scheme == b"https":
            if route.hsts is not None:
                request.additions.append((b"Strict-Transport-Security", route.hsts))
        elif route.redirect_https:
            return self._redirect(request, name, target.forwarded())
        policy = self.policies.get(route.name, _NO_POLICY)
        if policy.access is not None and not policy.access.admits(
            request.client_address
        ):
            return Refusal(403)
        if policy.limiter is not None:
            try:
                refusal = self._spend_token(request, policy.limiter)
            except BadTarget:
                return Refusal(400)
            if refusal is not None:
                return refusal
        assert route.pool is not None  # only a deny-all route has none
        path = target.path
        if route.strip_prefix and route.path_prefix is not None:
            path = strip_prefix(path, route.path_prefix)
        return Admission(self.pools[route.pool], target.forwarded(path))

    @staticmethod
    def _spend_token(request: ClientRequest, limiter: RateLimiter) -> Refusal | None:
        """
        Spend a token of the request's bucket; a 429 when there is none.
        Either way the response says how much is left.
        """
        decision = limiter.check(limit_key(limiter.config.key, request))
        fields = limiter.headers(decision)
        request.additions.extend(fields[:2])
        if decision.allowed:
            return None
        return Refusal(429, dict(fields[2:]))

    def _redirect(
        self, request: ClientRequest, name: bytes | None, target: bytes
    ) -> Refusal:
        """
        308 to the same target on the TLS listener: the method and body are
        kept by the client, unlike with 301.
        """
        name = name or request.local_address().host.encode()
        port = self.https_port()
        authority = name if port in (None, 443) else b"%s:%d" % (name, port)
        return Refusal(308, {b"Location": b"https://" + authority + target})

    @staticmethod
    def _host(request: ClientRequest, authority: bytes | None) -> bytes | None:
        """
        The name of the host a request is for, as routes compare it: from
        the authority of an absolute-form target (which then replaces Host,
        RFC 9112 section 3.2.2), else from its one Host header. L{BadTarget}
        when HTTP/1.1's rules are broken (no Host, or several).
        """
        headers = request.headers
        if authority is not None:
            name = checked_host_name(authority)
            if name is None:
                raise BadTarget("a malformed authority")
            headers.replace(b"Host", authority)
            return name
        hosts = headers.index.get(b"host")
        if hosts is None:
            if request.version == b"HTTP/1.1":
                raise BadTarget("an HTTP/1.1 request without Host")
            return None
        if len(hosts) != 1:
            raise BadTarget("several Host headers")
        host = hosts[0]
        name = checked_host_name(host)
        if name is None:
            raise BadTarget("a malformed Host")
        return name or None


def limit_key(spec: str, request: ClientRequest) -> str:
    """
    The bucket a request counts against: one for the route (C{global}), one
    per client address, or one per value of a header (per client address
    when the request has no such header). Long values are hashed so a key
    costs bounded memory.
    """
    if spec == "global":
        return ""
    if spec != "client_ip":
        values = request.headers.get(spec[7:].encode())
        if values:
            if len(values) > 1:
                # Which one would the backend believe? Refuse to guess.
                raise BadTarget("the rate limit's key header is repeated")
            value = values[0]
            if len(value) > 64:
                return "h#" + hashlib.blake2b(value, digest_size=16).hexdigest()
            return "h:" + value.decode("latin-1")
    return client_key(request.client_address)


def client_key(address: str) -> str:
    """
    A client address as a bucket key: an IPv6 client gets its /64, since one
    host commonly has a whole /64 to pick addresses from.
    """
    if ":" not in address:
        return address
    try:
        network = ipaddress.ip_network(f"{address}/64", strict=False)
    except ValueError:
        return address
    return str(network)
