# -*- test-case-name: tests.test_resource -*-
"""
The twisted.web resource every request reaches: it normalises the target,
consults the route map and hands the request to the forwarder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from l7lb.access import AccessList
from l7lb.headers import request_id
from l7lb.paths import BadTarget, parse_target
from l7lb.pool import Pool
from l7lb.proxy import Forwarder
from l7lb.ratelimit import RateLimiter
from l7lb.routing import RouteMap, host_name, strip_prefix, valid_host
from l7lb.site import BalancerRequest


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """
    What a route asks of a request before it is forwarded: an allowed
    client address, and a token from its rate limit.
    """

    access: AccessList | None = None
    limiter: RateLimiter | None = None


_NO_POLICY = RoutePolicy()


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

    def render(self, request: BalancerRequest) -> int:
        headers = request.requestHeaders
        request.request_id = request_id(headers.getRawHeaders(b"X-Request-Id"))
        try:
            target = parse_target(request.uri)
            host = self._host(request, target.authority)
        except BadTarget:
            request.respond_error(400)
            return NOT_DONE_YET
        route = self.routes.match(
            request.method,
            host_name(host) if host else None,
            target.route_path,
            headers,
        )
        if route is None:
            request.respond_error(404)
            return NOT_DONE_YET
        request.route_name = route.name
        if request.scheme == b"https":
            if route.hsts is not None:
                request.additions.append((b"Strict-Transport-Security", route.hsts))
        elif route.redirect_https:
            self._redirect(request, host, target.forwarded())
            return NOT_DONE_YET
        policy = self.policies.get(route.name, _NO_POLICY)
        if policy.access is not None and not policy.access.admits(
            request.client_address
        ):
            request.respond_error(403)
            return NOT_DONE_YET
        if policy.limiter is not None and not self._admit(request, policy.limiter):
            return NOT_DONE_YET
        assert route.pool is not None  # only a deny-all route has none
        path = target.path
        if route.strip_prefix and route.path_prefix is not None:
            path = strip_prefix(path, route.path_prefix)
        self.forwarder.forward(request, self.pools[route.pool], target.forwarded(path))
        return NOT_DONE_YET

    @staticmethod
    def _admit(request: BalancerRequest, limiter: RateLimiter) -> bool:
        """
        Spend a token of the request's bucket; answer 429 when there is none.
        Either way the response says how much is left.
        """
        decision = limiter.check(limit_key(limiter.config.key, request))
        fields = limiter.headers(decision)
        if decision.allowed:
            request.additions.extend(fields[:2])
            return True
        request.additions.extend(fields[:2])
        request.respond_error(429, dict(fields[2:]))
        return False

    def _redirect(
        self, request: BalancerRequest, host: bytes | None, target: bytes
    ) -> None:
        """
        308 to the same target on the TLS listener: the method and body are
        kept by the client, unlike with 301.
        """
        name = host_name(host) if host else request.getHost().host.encode()
        port = self.https_port()
        authority = name if port in (None, 443) else b"%s:%d" % (name, port)
        request.respond_error(308, {b"Location": b"https://" + authority + target})

    @staticmethod
    def _host(request: BalancerRequest, authority: bytes | None) -> bytes | None:
        """
        The host a request is for: the authority of an absolute-form target
        (which then replaces Host, RFC 9112 section 3.2.2), else its one Host
        header. L{BadTarget} when HTTP/1.1's rules are broken (no Host, or
        several).
        """
        headers = request.requestHeaders
        if authority is not None:
            headers.setRawHeaders(b"Host", [authority])
            return authority
        hosts = headers.getRawHeaders(b"Host")
        if hosts is None:
            if request.clientproto == b"HTTP/1.1":
                raise BadTarget("an HTTP/1.1 request without Host")
            return None
        if len(hosts) != 1:
            raise BadTarget("several Host headers")
        if not valid_host(hosts[0]):
            raise BadTarget("a malformed Host")
        return hosts[0] or None


def limit_key(spec: str, request: BalancerRequest) -> str:
    """
    The bucket a request counts against: one for the route (C{global}), one
    per client address, or one per value of a header (per client address
    when the request has no such header). Long values are hashed so a key
    costs bounded memory.
    """
    if spec == "global":
        return ""
    if spec != "client_ip":
        values = request.requestHeaders.getRawHeaders(spec[7:].encode())
        if values:
            value = values[0]
            if len(value) > 64:
                return "h#" + hashlib.blake2b(value, digest_size=16).hexdigest()
            return "h:" + value.decode("latin-1")
    return request.client_address
