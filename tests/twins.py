"""
In-memory twins of l7lb's seams, for tests without sockets: upstream
clients (a twisted.web resource behind treq's RequestTraversalAgent, one that
refuses, one that never answers) and a balancer wired to them on a Clock.
"""

from __future__ import annotations

from treq.testing import RequestTraversalAgent
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from l7lb.accesslog import AccessLog
from l7lb.balancing import balancer_for
from l7lb.config import LBConfig, PoolConfig, RouteConfig, ServerConfig
from l7lb.deadlines import TICKS_PER_SECOND
from l7lb.fields import Fields, parse_field_lines
from l7lb.outlier import PassiveHealth
from l7lb.pool import Backend, Pool
from l7lb.proxy import Forwarder
from l7lb.resource import BalancerResource
from l7lb.routing import RouteMap
from l7lb.site import BalancerSite
from l7lb.trust import TrustedProxies
from l7lb.upstream import ConnectFailed, NoResponse, ResponseCut, ResponseHead


@implementer(IBodyProducer)
class _BytesBody:
    """
    A request body handed over whole, at once (no cooperator, so tests on a
    Clock stay synchronous).
    """

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.length = len(content)

    def startProducing(self, consumer):
        consumer.write(self.content)
        return succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class _MemoryCall:
    """
    The L{l7lb.upstream.Call} of an in-memory request.
    """

    def __init__(self, on_cancel=None) -> None:
        self.on_cancel = on_cancel
        self.receiver = None
        self.transport = None
        self.cancelled = False

    def pause(self):
        if self.transport is not None:
            self.transport.pauseProducing()

    def resume(self):
        if self.transport is not None:
            self.transport.resumeProducing()

    def cancel(self):
        if self.cancelled:
            return
        self.cancelled = True
        self.receiver = None
        if self.on_cancel is not None:
            self.on_cancel()
        if self.transport is not None:
            self.transport.stopProducing()


class _Relay(Protocol):
    def __init__(self, call: _MemoryCall) -> None:
        self.call = call

    def connectionMade(self):
        self.call.transport = self.transport

    def dataReceived(self, data):
        if self.call.receiver is not None:
            self.call.receiver.response_body(data)

    def connectionLost(self, reason=None):
        receiver, self.call.receiver = self.call.receiver, None
        if receiver is None:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            receiver.response_end()
        else:
            receiver.response_failed(ResponseCut(reason.getErrorMessage()))


def _head(response, method: bytes) -> ResponseHead:
    fields = Fields.of(
        (name, value)
        for name, values in response.headers.getAllRawHeaders()
        for value in values
    )
    length = None if response.length is UNKNOWN_LENGTH else response.length
    bodiless = method == b"HEAD" or response.code in (204, 304)
    return ResponseHead(
        b"%d.%d" % response.version[1:],
        response.code,
        response.phrase,
        fields,
        length=length,
        bodiless=bodiless,
    )


# How late a deadline may be met (see l7lb.deadlines).
TICK = 1 / TICKS_PER_SECOND


class InMemoryUpstream:
    """
    The in-memory twin of L{l7lb.upstream.Upstream}: requests are served by
    a twisted.web resource through treq's RequestTraversalAgent.
    """

    def __init__(self, resource: Resource) -> None:
        self.agent = RequestTraversalAgent(resource)
        self.calls = 0

    def send(self, request, receiver):
        self.calls += 1
        headers = Headers()
        raw_lines = request.raw.split(b"\r\n")[:-1]
        for name, value in parse_field_lines(raw_lines).items + request.fields:
            headers.addRawHeader(name, value)
        body = request.body
        if body is not None and not isinstance(body, bytes):
            body.seek(0)
            body = body.read()
        call = _MemoryCall()
        call.receiver = receiver
        d = self.agent.request(
            request.method,
            b"http://backend" + request.target,
            headers,
            _BytesBody(body) if body else None,
        )

        def got(response):
            if call.receiver is None:
                return
            call.receiver.response_head(_head(response, request.method))
            response.deliverBody(_Relay(call))

        def failed(failure):
            receiver, call.receiver = call.receiver, None
            if receiver is not None:
                receiver.response_failed(NoResponse(failure.getErrorMessage()))

        d.addCallbacks(got, failed)
        call.on_cancel = d.cancel
        return call

    def close(self):
        return succeed(None)


class Refusing:
    def __init__(self) -> None:
        self.calls = 0

    def send(self, request, receiver):
        self.calls += 1
        receiver.response_failed(ConnectFailed("Connection was refused"))
        return _MemoryCall()

    def close(self):
        return succeed(None)


class Hanging:
    def __init__(self) -> None:
        self.pending: list[tuple[object, _MemoryCall]] = []
        self.cancelled = 0

    def send(self, request, receiver):
        def cancelled():
            self.cancelled += 1

        call = _MemoryCall(cancelled)
        call.receiver = receiver
        self.pending.append((receiver, call))
        return call

    def fail(self, index: int) -> None:
        """
        The request C{index} fails as a connection reset would fail it.
        """
        receiver, call = self.pending[index]
        if call.receiver is not None:
            call.receiver = None
            receiver.response_failed(NoResponse("Connection lost"))

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
