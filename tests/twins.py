"""
In-memory twins of l7lb's seams, for tests without sockets: upstream
clients (a twisted.web resource behind treq's RequestTraversalAgent, one that
refuses, one that never answers) and a balancer wired to them on a Clock.
"""

from __future__ import annotations

from treq.testing import RequestTraversalAgent
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from l7lb.accesslog import AccessLog
from l7lb.balancing import balancer_for
from l7lb.config import LBConfig, PoolConfig, RouteConfig, ServerConfig
from l7lb.outlier import PassiveHealth
from l7lb.pool import Backend, Pool
from l7lb.proxy import Forwarder
from l7lb.resource import BalancerResource
from l7lb.routing import RouteMap
from l7lb.site import BalancerSite
from l7lb.trust import TrustedProxies


class InMemoryUpstream:
    """
    The in-memory twin of L{l7lb.upstream.Upstream}: requests are served by
    a twisted.web resource through treq's RequestTraversalAgent.
    """

    def __init__(self, resource: Resource) -> None:
        self.agent = RequestTraversalAgent(resource)
        self.calls = 0

    def request(self, method, target, headers, body):
        self.calls += 1
        return self.agent.request(method, b"http://backend" + target, headers, body)

    def close(self):
        return succeed(None)


class Refusing:
    def __init__(self) -> None:
        self.calls = 0

    def request(self, method, target, headers, body):
        self.calls += 1
        return fail(ConnectionRefusedError())

    def close(self):
        return succeed(None)


class Hanging:
    def __init__(self) -> None:
        self.pending: list[Deferred] = []
        self.cancelled = 0

    def request(self, method, target, headers, body):
        d: Deferred = Deferred(lambda _: setattr(self, "cancelled", self.cancelled + 1))
        self.pending.append(d)
        return d

    def close(self):
        return succeed(None)


class Hello(Resource):
    isLeaf = True

    def __init__(self, name: bytes) -> None:
        super().__init__()
        self.name = name
        self.held: list = []

    def render(self, request):
        if request.path == b"/hold":
            self.held.append(request)
            return NOT_DONE_YET
        request.setHeader(b"X-Seen-Host", request.getHeader(b"host") or b"-")
        return b"hello from " + self.name + b" " + request.uri


def server(name: str) -> ServerConfig:
    return ServerConfig(f"http://{name}:80", "http", name, 80)


class MemoryBalancer:
    """
    A balancer whose one route C{/app} (prefix stripped) goes to a pool of
    the given twins, all on one Clock; C{connect()} gives a client channel
    on a StringTransport.
    """

    def __init__(self, clients, clock: Clock | None = None, **pool_options) -> None:
        self.clock = clock or Clock()
        config = PoolConfig(
            "p", tuple(server(f"b{i}") for i in range(len(clients))), **pool_options
        )
        backends = []
        for server_config, client in zip(config.servers, clients, strict=True):
            backend = Backend(
                server_config,
                client,
                config.slow_start,
                self.clock,
                max_inflight=config.max_connections,
            )
            if config.max_fails:
                backend.passive = PassiveHealth(
                    "p", backend, config.max_fails, config.fail_timeout, self.clock
                )
            backends.append(backend)
        self.pool = Pool(
            config, backends, balancer_for(config.balance), b"s" * 16, self.clock
        )
        routes = RouteMap(
            [RouteConfig("r", "p", path_prefix=b"/app", strip_prefix=True)]
        )
        resource = BalancerResource(
            routes, {"p": self.pool}, Forwarder(self.clock, TrustedProxies(()))
        )
        self.site = BalancerSite(
            resource, LBConfig(), AccessLog(None, self.clock), self.clock, 60
        )

    def connect(self):
        channel = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.1", 5555))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 5555))
        channel.makeConnection(transport)
        return channel, transport

    def get(self, path: bytes = b"/app", method: bytes = b"GET"):
        """
        A request on a new connection; its transport collects the answer.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"%s %s HTTP/1.1\r\nHost: h\r\n\r\n" % (method, path))
        return channel, transport


def status(transport: StringTransport) -> int | None:
    value = transport.value()
    return int(value.split(b" ", 2)[1]) if value else None
