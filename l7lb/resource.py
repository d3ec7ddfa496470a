# -*- test-case-name: tests.test_resource -*-
"""
The twisted.web resource every request reaches: it normalises the target,
consults the route map and hands the request to the forwarder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from l7lb.headers import request_id
from l7lb.paths import BadTarget, parse_target
from l7lb.pool import Pool
from l7lb.proxy import Forwarder
from l7lb.routing import RouteMap, host_name, strip_prefix
from l7lb.site import BalancerRequest


class BalancerResource(Resource):
    """
    Routes each request to its pool; answers 400, 404 and HTTPS redirects
    itself. C{https_port} tells where the TLS listener is, for redirects.
    """

    isLeaf = True

    def __init__(
        self,
        routes: RouteMap,
        pools: Mapping[str, Pool],
        forwarder: Forwarder,
        https_port: Callable[[], int | None] = lambda: None,
    ) -> None:
        super().__init__()
        self.routes = routes
        self.pools = pools
        self.forwarder = forwarder
        self.https_port = https_port

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
            request.method, host_name(host) if host else None, target.path, headers
        )
        if route is None:
            request.respond_error(404)
            return NOT_DONE_YET
        request.route_name = route.name
        if request.scheme == b"https":
            request.hsts = route.hsts
        elif route.redirect_https:
            self._redirect(request, host, target.forwarded())
            return NOT_DONE_YET
        path = target.path
        if route.strip_prefix and route.path_prefix is not None:
            path = strip_prefix(path, route.path_prefix)
        self.forwarder.forward(request, self.pools[route.pool], target.forwarded(path))
        return NOT_DONE_YET

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
        return hosts[0] or None
