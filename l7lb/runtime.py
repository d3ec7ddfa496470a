# -*- test-case-name: tests.test_reload -*-
"""
The running balancer, reconfigured in place.

L{Runtime.apply} takes a validated L{Config} and makes it the one that new
requests see, without dropping a request: pools are updated in place (their
counters and queues carry on), backends that exist before and after keep
their health state, passive-health record, counters and open connections,
route limiters whose settings did not change keep their buckets. Requests
already under way finish on the objects they started with. Backends that
are gone stop taking requests and close their connections once their last
request is answered.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from l7lb.access import AccessList
from l7lb.accesslog import AccessLog
from l7lb.balancing import balancer_for
from l7lb.certificates import expiry_warnings, load_certificate_file
from l7lb.config import Config, LBConfig, PoolConfig, ServerConfig
from l7lb.connlimit import ConnectionCounts
from l7lb.health import HealthChecker, HTTPProbe, ProbeResult, fixed_agent, quiet_pool
from l7lb.metrics import Metrics
from l7lb.outlier import PassiveHealth
from l7lb.pool import UNLIMITED, Backend, Pool
from l7lb.proxy import Forwarder
from l7lb.ratelimit import RateLimiter
from l7lb.resource import BalancerResource, RoutePolicy
from l7lb.routing import RouteMap
from l7lb.site import BalancerSite
from l7lb.tls import ServerTLS, tls_server_factory
from l7lb.trust import TrustedProxies
from l7lb.upstream import Upstream, UpstreamClient, client_endpoint


def _connection_settings(pool: PoolConfig, server: ServerConfig) -> tuple[Any, ...]:
    """
    What a backend's connections depend on: while these stay the same, a
    reconfigured backend keeps its connections (and everything else).
    """
    return (
        server.url,
        pool.connect_timeout,
        pool.keepalive_connections,
        pool.keepalive_timeout,
        pool.tls_verify,
        pool.tls_ca,
    )


class Runtime:
    """
    Pools, routes, policies, sites and TLS of the running balancer.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        upstream_for: Callable[..., UpstreamClient] = Upstream,
    ) -> None:
        self.reactor = reactor
        self.upstream_for = upstream_for
        self.config: Config | None = None
        self.pools: dict[str, Pool] = {}
        self.policies: dict[str, RoutePolicy] = {}
        self.metrics = Metrics()
        self.trusted = TrustedProxies(())
        self.forwarder = Forwarder(reactor, self.trusted)
        self.https_port: Callable[[], int | None] = lambda: None
        self.resource = BalancerResource(
            RouteMap(()), {}, self.forwarder, lambda: self.https_port(), {}
        )
        self.access_log = AccessLog(None, reactor)
        self._flusher = LoopingCall(self.access_log.flush)
        self._flusher.clock = reactor
        by_address: Counter[str] = Counter()
        limits = LBConfig()
        self.site = BalancerSite(
            self.resource,
            limits,
            self.access_log,
            reactor,
            timeout=limits.keepalive_timeout,
            trusted=self.trusted,
            connections=ConnectionCounts(self.metrics, by_address),
            metrics=self.metrics,
        )
        self.tls_site = BalancerSite(
            self.resource,
            limits,
            self.access_log,
            reactor,
            timeout=limits.keepalive_timeout,
            scheme=b"https",
            trusted=self.trusted,
            connections=ConnectionCounts(self.metrics, by_address),
            metrics=self.metrics,
        )
        self.server_tls: ServerTLS | None = None
        self.tls_factory: IProtocolFactory | None = None
        self.checkers: dict[Backend, HealthChecker] = {}
        # Probes open a connection of their own each time (as HAProxy's
        # do): that checks the backend still accepts, and no stale
        # connection can fail a probe.
        self.probe_connections = quiet_pool(reactor, persistent=False)
        self._settings: dict[Backend, tuple[Any, ...]] = {}
        self._secret_file: str | None = None
        self._secret = b""
        self.running = False
        # How many processes serve together ([lb] workers): each enforces
        # this share of every rate limit.
        self.share = 1
        # Connections of backends no longer configured, still closing.
        self._retiring: list[Deferred[Any]] = []

    @property
    def sites(self) -> tuple[BalancerSite, BalancerSite]:
        return self.site, self.tls_site

    def apply(self, config: Config) -> None:
        """
        Make C{config} the running configuration.
        """
        if self.config is None or config.lb.secret_file != self._secret_file:
            self._secret = read_secret(config.lb.secret_file)
            self._secret_file = config.lb.secret_file
        self._apply_pools(config)
        self._apply_tls(config)
        self.trusted = TrustedProxies(config.lb.trusted_proxies)
        self.forwarder.trusted = self.trusted
        for site in self.sites:
            site.limits = config.lb
            site.timeOut = config.lb.keepalive_timeout
            site.trusted = self.trusted
        old = self.config.lb if self.config else None
        if old is None or (old.access_log, old.access_log_format) != (
            config.lb.access_log,
            config.lb.access_log_format,
        ):
            self.access_log.reopen(config.lb.access_log, config.lb.access_log_format)
        self.policies = self._policies(config)
        resource = self.resource
        resource.routes = RouteMap(config.routes)
        resource.pools = dict(self.pools)
        resource.policies = self.policies
        self.config = config
        self._sync_health()

    def reopen_logs(self) -> None:
        """
        Reopen a file access log (after logrotate moved it away).
        """
        if self.config is not None:
            self.access_log.reopen(
                self.config.lb.access_log, self.config.lb.access_log_format
            )

    def _apply_pools(self, config: Config) -> None:
        wanted = {pool.name for pool in config.pools}
        for name in [name for name in self.pools if name not in wanted]:
            for backend in self.pools.pop(name).backends:
                self._retire(backend)
        for pool_config in config.pools:
            pool = self.pools.get(pool_config.name)
            old = (
                {}
                if pool is None
                else {
                    self._settings[b]: b for b in pool.backends if b in self._settings
                }
            )
            backends = []
            for server in pool_config.servers:
                settings = _connection_settings(pool_config, server)
                reused = old.pop(settings, None)
                if reused is None:
                    backend = self._backend(pool_config, server)
                    self._settings[backend] = settings
                else:
                    backend = reused
                    self._update_backend(backend, pool_config, server)
                backends.append(backend)
            for gone in old.values():
                self._retire(gone)
            if pool is None:
                self.pools[pool_config.name] = Pool(
                    pool_config,
                    backends,
                    balancer_for(pool_config.balance),
                    self._secret,
                    self.reactor,
                )
            else:
                changed = pool_config.balance != pool.config.balance
                pool.reconfigure(
                    pool_config,
                    backends,
                    self._secret,
                    balancer_for(pool_config.balance) if changed else None,
                )

    def _backend(self, pool: PoolConfig, server: ServerConfig) -> Backend:
        client = self.upstream_for(self.reactor, server, pool)
        backend = Backend(
            server, client, pool.slow_start, self.reactor, pool.max_connections
        )
        self._passive(backend, pool)
        return backend

    def _update_backend(
        self, backend: Backend, pool: PoolConfig, server: ServerConfig
    ) -> None:
        backend.config = server
        backend.weight = server.weight
        backend.slow_start = pool.slow_start
        backend.max_inflight = pool.max_connections or UNLIMITED
        self._passive(backend, pool)

    def _passive(self, backend: Backend, pool: PoolConfig) -> None:
        passive = backend.passive
        if not pool.max_fails:
            if passive is not None:
                passive.stop()
                backend.set_ejected(False)
            backend.passive = None
        elif passive is None:
            backend.passive = PassiveHealth(
                pool.name, backend, pool.max_fails, pool.fail_timeout, self.reactor
            )
        else:
            passive.max_fails, passive.fail_timeout = pool.max_fails, pool.fail_timeout

    def _retire(self, backend: Backend) -> None:
        """
        A backend no longer configured: no new requests; its connections
        close once its last request is answered.
        """
        backend.retired = True
        backend.set_draining(True)
        if backend.passive is not None:
            backend.passive.stop()
        checker = self.checkers.pop(backend, None)
        if checker is not None:
            checker.stop()
        self._settings.pop(backend, None)
        # Idle connections close now, busy ones after their answer; stop()
        # waits for them.
        closed = backend.client.close()
        self._retiring.append(closed)
        closed.addBoth(lambda result: self._retiring.remove(closed))

    def _policies(self, config: Config) -> dict[str, RoutePolicy]:
        policies = {}
        for route in config.routes:
            access = AccessList(route.access) if route.access else None
            limiter = None
            if route.rate_limit is not None:
                old = self.policies.get(route.name)
                limiter = old.limiter if old else None
                if (
                    limiter is None
                    or limiter.config != route.rate_limit
                    or limiter.max_keys != config.ratelimit_max_keys
                    or limiter.share != self.share
                ):
                    limiter = RateLimiter(
                        route.name,
                        route.rate_limit,
                        self.reactor,
                        config.ratelimit_max_keys,
                        share=self.share,
                    )
            if access is not None or limiter is not None:
                policies[route.name] = RoutePolicy(access, limiter)
        return policies

    def _apply_tls(self, config: Config) -> None:
        if config.tls is None or not config.lb.tls_listen:
            return
        certificates = [load_certificate_file(p) for p in config.tls.certificates]
        for warning in expiry_warnings(certificates, datetime.now(UTC)):
            self.log.warn("{warning}", warning=warning)
        if self.server_tls is None:
            self.server_tls = ServerTLS(config.tls, certificates)
        else:
            self.server_tls.update(config.tls, certificates)
        if self.tls_factory is None:
            # The handshake deadline is read from the site's limits, which
            # every apply updates.
            self.tls_factory = tls_server_factory(self.tls_site, self.server_tls)

    def _sync_health(self) -> None:
        """
        A checker for every backend of every pool that asks for checks;
        unchanged ones carry on, changed ones restart.
        """
        wanted: set[Backend] = set()
        for pool in self.pools.values():
            check = pool.config.health
            if check is None:
                continue
            for backend in pool.backends:
                wanted.add(backend)
                checker = self.checkers.get(backend)
                if checker is not None and checker.check == check:
                    continue
                if checker is not None:
                    checker.stop()
                self.checkers[backend] = checker = self._checker(pool, backend)
                if self.running:
                    checker.start()
        for backend in [b for b in self.checkers if b not in wanted]:
            self.checkers.pop(backend).stop()
            backend.set_healthy(True)

    def _checker(self, pool: Pool, backend: Backend) -> HealthChecker:
        check = pool.config.health
        assert check is not None
        endpoint = client_endpoint(
            self.reactor, backend.config, pool.config, check.timeout
        )
        client = HTTPClient(fixed_agent(self.reactor, endpoint, self.probe_connections))
        url = f"{backend.config.scheme}://{backend.address}{check.path}"
        probe = HTTPProbe(client, url, check, self.reactor)
        checker = HealthChecker(pool.name, backend, probe, check, self.reactor)
        counts = self.metrics.health_checks
        labels = (pool.name, backend.address)

        def count(result: ProbeResult) -> None:
            counts[(*labels, "pass" if result.ok else "fail")] += 1

        checker.on_result = count
        return checker

    def start(self) -> None:
        self.running = True
        for checker in self.checkers.values():
            checker.start()
        if self.access_log.enabled:
            self._flusher.start(1.0, now=False)

    def stop(self) -> Any:
        """
        Stop checks and timers, flush and close the access log, and close
        idle connections to backends.
        """
        self.running = False
        for checker in self.checkers.values():
            checker.stop()
        if self._flusher.running:
            self._flusher.stop()
        self.access_log.close()
        closing = [self.probe_connections.closeCachedConnections(), *self._retiring]
        for pool in self.pools.values():
            for backend in pool.backends:
                if backend.passive is not None:
                    backend.passive.stop()
                closing.append(backend.client.close())
        return DeferredList(closing)


def read_secret(path: str | None) -> bytes:
    """
    The key for sticky-session tokens: from C{secret_file}, or made up for
    this process (cookies then change when l7lb restarts).
    """
    if path is None:
        return os.urandom(32)
    with open(path, "rb") as f:
        return f.read().strip()
