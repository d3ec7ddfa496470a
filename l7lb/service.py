# -*- test-case-name: tests.test_service -*-
"""
The service tree of a running balancer, built from a L{Config}:

    BalancerService (MultiService)
      HealthService        one LoopingCall per checked backend
      AccessLogService     flushes the access log
      UpstreamService      closes backend connections at shutdown
      ListenerService * N  one per listen endpoint

Listeners come last so that they start last and stop first: the balancer
accepts traffic only once everything behind it runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from treq.client import HTTPClient
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from l7lb.access import AccessList
from l7lb.accesslog import AccessLog, AccessLogService
from l7lb.balancing import balancer_for
from l7lb.certificates import expiry_warnings, load_certificate_file
from l7lb.config import Config, HealthCheckConfig
from l7lb.connlimit import ConnectionCounts, ConnectionLimitFactory
from l7lb.health import HealthService, checkers_for
from l7lb.outlier import PassiveHealth
from l7lb.pool import Backend, Pool
from l7lb.proxy import Forwarder
from l7lb.ratelimit import RateLimiter
from l7lb.resource import BalancerResource, RoutePolicy
from l7lb.routing import RouteMap
from l7lb.site import BalancerSite
from l7lb.tls import ServerTLS, tls_server_factory
from l7lb.trust import TrustedProxies
from l7lb.upstream import (
    Upstream,
    UpstreamClient,
    client_endpoint,
    fixed_agent,
    quiet_pool,
)

log = Logger()


class ListenFailed(Exception):
    """
    A listening endpoint could not be opened (port in use, no permission).
    """


class ListenerService(Service):
    """
    Serves a factory on one endpoint. A failure to listen is raised from
    C{startService}, so l7lb does not run without a listener it was asked
    to open.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        description: str,
    ) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.description = description
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        failures: list[Failure] = []
        d = self.endpoint.listen(self.factory)
        d.addCallbacks(self._listening, failures.append)
        if failures:
            raise ListenFailed(
                f"cannot listen on {self.description}: {failures[0].getErrorMessage()}"
            )

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        self.log.info(
            "listening on {description} ({address})",
            description=self.description,
            address=port.getHost(),
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is None:
            return None
        port, self.port = self.port, None
        return port.stopListening()


class UpstreamService(Service):
    """
    At shutdown: closes the idle keep-alive connections to every backend and
    stops the ejection timers of passive health.
    """

    def __init__(
        self, clients: Sequence[UpstreamClient], pools: Sequence[Pool]
    ) -> None:
        self.clients = clients
        self.pools = pools

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        for pool in self.pools:
            for backend in pool.backends:
                if backend.passive is not None:
                    backend.passive.stop()
        return DeferredList([client.close() for client in self.clients])


class BalancerService(MultiService):
    """
    A running balancer. C{pools} and C{listeners} are there to be inspected.
    """

    exit_on_listen_failure = False

    def __init__(self, config: Config, pools: dict[str, Pool]) -> None:
        super().__init__()
        self.config = config
        self.pools = pools
        self.listeners: list[ListenerService] = []
        self.tls_listeners: list[ListenerService] = []
        self.policies: dict[str, RoutePolicy] = {}

    def https_port(self) -> int | None:
        """
        The port of the first TLS listener, where plain-HTTP requests to a
        C{redirect_https} route are sent.
        """
        for listener in self.tls_listeners:
            if listener.port is not None:
                port: int | None = getattr(listener.port.getHost(), "port", None)
                return port
        return None

    def startService(self) -> None:
        try:
            super().startService()
        except ListenFailed as e:
            if self.exit_on_listen_failure:
                # twistd prints this line and exits 1, without a traceback.
                raise SystemExit(f"l7lb: {e}") from None
            raise


def listen_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """
    The endpoint for a listen string; TCP ones get a backlog of 1024 unless
    they name one (Twisted's 50 drops connections in a burst).
    """
    if (
        description.split(":", 1)[0] in ("tcp", "tcp6")
        and "backlog=" not in description
    ):
        description += ":backlog=1024"
    endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
    return endpoint


def read_secret(path: str | None) -> bytes:
    """
    The key for sticky-session tokens: from C{secret_file}, or made up for
    this process (cookies then change when l7lb restarts).
    """
    if path is None:
        return os.urandom(32)
    with open(path, "rb") as f:
        return f.read().strip()


def route_policies(config: Config, clock: IReactorTime) -> dict[str, RoutePolicy]:
    """
    Each route's access list and rate limiter, where it has them.
    """
    policies = {}
    for route in config.routes:
        access = AccessList(route.access) if route.access else None
        limiter = (
            RateLimiter(route.name, route.rate_limit, clock, config.ratelimit_max_keys)
            if route.rate_limit
            else None
        )
        if access is not None or limiter is not None:
            policies[route.name] = RoutePolicy(access, limiter)
    return policies


def build(
    config: Config,
    reactor: Any,
    upstream_for: Callable[..., UpstreamClient] = Upstream,
) -> BalancerService:
    """
    The service tree for C{config}, on C{reactor} (which must provide the
    TCP, time and thread interfaces of a real reactor).
    """
    secret = read_secret(config.lb.secret_file)
    pools = {}
    clients: list[UpstreamClient] = []
    for pool_config in config.pools:
        backends = []
        for server in pool_config.servers:
            client = upstream_for(reactor, server, pool_config)
            clients.append(client)
            backend = Backend(
                server,
                client,
                pool_config.slow_start,
                reactor,
                max_inflight=pool_config.max_connections,
            )
            if pool_config.max_fails:
                backend.passive = PassiveHealth(
                    pool_config.name,
                    backend,
                    pool_config.max_fails,
                    pool_config.fail_timeout,
                    reactor,
                )
            backends.append(backend)
        pools[pool_config.name] = Pool(
            pool_config, backends, balancer_for(pool_config.balance), secret, reactor
        )

    root = BalancerService(config, pools)
    trusted = TrustedProxies(config.lb.trusted_proxies)
    forwarder = Forwarder(reactor, trusted)
    root.policies = policies = route_policies(config, reactor)
    resource = BalancerResource(
        RouteMap(config.routes), pools, forwarder, root.https_port, policies
    )
    access_log = AccessLog.open(config.lb.access_log, reactor)
    site = BalancerSite(
        resource,
        config.lb,
        access_log,
        reactor,
        timeout=config.lb.keepalive_timeout,
        trusted=trusted,
    )

    # Probes open a connection of their own each time (as HAProxy's do):
    # that checks the backend still accepts, and no stale connection can fail
    # a probe.
    probe_connections = quiet_pool(reactor, persistent=False)

    def probe_client(
        pool: Pool, backend: Backend, check: HealthCheckConfig
    ) -> HTTPClient:
        endpoint = client_endpoint(reactor, backend.config, pool.config, check.timeout)
        return HTTPClient(fixed_agent(reactor, endpoint, probe_connections))

    HealthService(
        checkers_for(list(pools.values()), probe_client, reactor),
        [probe_connections.closeCachedConnections],
    ).setServiceParent(root)
    AccessLogService(access_log, reactor).setServiceParent(root)
    UpstreamService(clients, list(pools.values())).setServiceParent(root)
    counts = ConnectionCounts(config.lb.max_connections_per_ip)

    def limited(factory: IProtocolFactory) -> IProtocolFactory:
        if not (config.lb.max_connections or config.lb.max_connections_per_ip):
            return factory
        return ConnectionLimitFactory(
            factory, config.lb.max_connections, counts, reactor
        )

    for description in config.lb.listen:
        listener = ListenerService(
            listen_endpoint(reactor, description), limited(site), description
        )
        listener.setServiceParent(root)
        root.listeners.append(listener)
    if config.tls is not None and config.lb.tls_listen:
        certificates = [load_certificate_file(p) for p in config.tls.certificates]
        for warning in expiry_warnings(certificates, datetime.now(UTC)):
            log.warn("{warning}", warning=warning)
        tls_site = BalancerSite(
            resource,
            config.lb,
            access_log,
            reactor,
            timeout=config.lb.keepalive_timeout,
            scheme=b"https",
            trusted=trusted,
        )
        factory = tls_server_factory(
            tls_site,
            ServerTLS(config.tls, certificates),
            reactor,
            config.lb.tls_handshake_timeout,
        )
        for description in config.lb.tls_listen:
            listener = ListenerService(
                listen_endpoint(reactor, description), limited(factory), description
            )
            listener.setServiceParent(root)
            root.listeners.append(listener)
            root.tls_listeners.append(listener)
    return root
