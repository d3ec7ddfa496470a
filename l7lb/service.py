# -*- test-case-name: tests.test_reload -*-
"""
The service of a running balancer:

    BalancerService (MultiService)   the runtime (pools, routes, checks)
      ListenerService * N            one per listen / tls_listen endpoint
      ListenerService                the admin API, when configured

It starts the runtime before its listeners, so traffic is accepted only once
everything behind it runs. It reloads (a new file, or runtime changes made
through the admin API) without dropping a request, opening and closing
listeners as the configuration asks. It stops gracefully: listeners close,
idle keep-alive connections close, the requests under way get up to
C{drain_timeout} to finish, then everything else stops.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import unix
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    fail,
    inlineCallbacks,
    succeed,
)
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from l7lb.config import Config, ConfigError
from l7lb.pool import Pool
from l7lb.resource import RoutePolicy
from l7lb.runtime import Runtime
from l7lb.state import RuntimeState, read_state, save_state
from l7lb.upstream import Upstream, UpstreamClient

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
        failures: list[Failure] = []
        d = self.endpoint.listen(self.factory)
        d.addCallbacks(self._listening, failures.append)
        if failures:
            raise ListenFailed(
                f"cannot listen on {self.description}: {failures[0].getErrorMessage()}"
            )
        super().startService()

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


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """
    Serves on a listening socket that another process opened (the
    supervisor of worker processes) and handed down as descriptor C{fd}:
    every process that adopts it accepts from the one queue, so a process
    that stops leaves the connections waiting there to the others.
    C{description} is the listen string the socket was opened for. The
    endpoint owns C{fd}: once adopted it is closed (the port has its copy).
    """

    def __init__(self, reactor: Any, fd: int, description: str) -> None:
        self.reactor = reactor
        self.fd = fd
        self.description = description

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        kind = self.description.partition(":")[0]
        try:
            if kind == "unix":
                port: IListeningPort = _SharedUNIXPort._fromListeningDescriptor(
                    self.reactor, self.fd, factory
                )
                port.mode = _unix_mode(self.description)  # type: ignore[attr-defined]
                port.startListening()
            else:
                family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
                port = self.reactor.adoptStreamPort(self.fd, family, factory)
        except Exception:
            return fail()
        # The port holds a copy of the descriptor: the inherited one would
        # keep the socket listening after the port stops (a worker draining
        # after its supervisor died would still take connections).
        os.close(self.fd)
        return succeed(port)


class _SharedUNIXPort(unix.Port):
    """
    A unix socket adopted from the supervisor, who owns its path: stopping
    to listen here must not remove the path that other workers serve.
    """

    def connectionLost(self, reason: Failure) -> None:
        super(unix.Port, self).connectionLost(reason)


def _unix_mode(description: str) -> int:
    """
    The C{mode=} of a unix endpoint string (octal), Twisted's 0666 without.
    """
    for option in re.split(r"(?<!\\):", description)[1:]:
        name, _, value = option.partition("=")
        if name == "mode":
            return int(value, 8)
    return 0o666


class BalancerService(MultiService):
    """
    A running balancer. C{pools}, C{policies} and C{listeners} are there to
    be inspected; C{reload} and C{change} reconfigure it while it serves.
    """

    exit_on_listen_failure = False

    def __init__(
        self,
        reactor: Any,
        config_path: str,
        upstream_for: Callable[..., UpstreamClient] = Upstream,
        state: RuntimeState | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.config_path = config_path
        self.runtime = Runtime(reactor, upstream_for)
        self.runtime.https_port = self.https_port
        self.state = state or RuntimeState()
        self._listeners: dict[tuple[str, str], ListenerService] = {}
        # Where a listen string is served: its own endpoint, or (in a
        # worker process) a socket inherited from the supervisor.
        self.endpoint_for: Callable[[str], IStreamServerEndpoint] = partial(
            listen_endpoint, reactor
        )
        self.admin: ListenerService | None = None
        self.admin_factory: Callable[[BalancerService], IProtocolFactory] | None = None

    @property
    def config(self) -> Config:
        config = self.runtime.config
        assert config is not None
        return config

    @property
    def pools(self) -> dict[str, Pool]:
        return self.runtime.pools

    @property
    def policies(self) -> dict[str, RoutePolicy]:
        return self.runtime.policies

    @property
    def listeners(self) -> list[ListenerService]:
        return list(self._listeners.values())

    @property
    def tls_listeners(self) -> list[ListenerService]:
        return [s for (kind, _), s in self._listeners.items() if kind == "tls"]

    @property
    def admin_listener(self) -> ListenerService | None:
        for (kind, _), listener in self._listeners.items():
            if kind == "admin":
                return listener
        return None

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

    def apply(self, config: Config) -> list[str]:
        """
        Make C{config} the running configuration; the problems opening new
        listeners, if any (the rest of the change still takes effect).
        """
        self.runtime.apply(config)
        return self._sync_listeners(config)

    def _sync_listeners(self, config: Config) -> list[str]:
        runtime = self.runtime
        wanted: dict[tuple[str, str], IProtocolFactory] = {
            ("http", d): runtime.site for d in config.lb.listen
        }
        if runtime.tls_factory is not None:
            wanted.update(
                {("tls", d): runtime.tls_factory for d in config.lb.tls_listen}
            )
        if config.admin is not None and self.admin_factory is not None:
            wanted[("admin", config.admin.listen)] = self.admin_factory(self)
        problems = []
        for key in [key for key in self._listeners if key not in wanted]:
            listener = self._listeners.pop(key)
            listener.disownServiceParent()
            log.info("stopped listening on {description}", description=key[1])
        for key, factory in wanted.items():
            if key in self._listeners:
                continue
            listener = ListenerService(self.endpoint_for(key[1]), factory, key[1])
            try:
                # Started at once when the balancer already runs.
                listener.setServiceParent(self)
            except ListenFailed as e:
                self.removeService(listener)
                problems.append(str(e))
                log.error("{problem}", problem=str(e))
                continue
            self._listeners[key] = listener
        return problems

    def reload(self) -> list[str]:
        """
        Read the file again (runtime changes on top) and apply it; when it
        has problems, log every one and keep running as before. Returns the
        problems (empty when the new configuration took effect).
        """
        try:
            config = self.load(self.state)
        except ConfigError as e:
            for problem in e.problems:
                log.error("reload refused: {problem}", problem=problem)
            return e.problems
        if config.lb.workers != self.config.lb.workers and self.runtime.share == 1:
            log.warn(
                "[lb] workers = {workers} takes effect at the next start",
                workers=config.lb.workers,
            )
        try:
            problems = self.apply(config)
        except ValueError as e:  # a certificate changed under us
            log.error("reload refused: {problem}", problem=str(e))
            return [str(e)]
        self.runtime.reopen_logs()
        log.info("configuration reloaded from {path}", path=self.config_path)
        return problems

    def load(self, state: RuntimeState) -> Config:
        """
        The file with C{state}'s changes on top, validated.

        @raise ConfigError: with every problem.
        """
        return state.config(self.config_path)

    def change(self, state: RuntimeState) -> list[str]:
        """
        Apply runtime changes (from the admin API): validated like the file,
        saved atomically when C{[admin] state_file} is set, then applied.
        Nothing is changed when they are refused; returns the problems.
        """
        try:
            config = self.load(state)
        except ConfigError as e:
            return e.problems
        admin = config.admin
        if admin is not None and admin.state_file is not None:
            save_state(admin.state_file, state)
        self.state = state
        return self.apply(config)

    def startService(self) -> None:
        self.runtime.start()
        try:
            super().startService()
        except ListenFailed as e:
            if self.exit_on_listen_failure:
                # twistd prints this line and exits 1, without a traceback.
                raise SystemExit(f"l7lb: {e}") from None
            raise

    @inlineCallbacks
    def stopService(self) -> Any:
        """
        Stop gracefully: no new connections, idle keep-alive connections
        closed, busy ones closed after their answer (with Connection:
        close), then up to C{drain_timeout} for the requests under way.
        """
        Service.stopService(self)
        stopping: list[Deferred[Any]] = []
        for listener in self.listeners:
            if listener.running:
                d = listener.stopService()
                if d is not None:
                    stopping.append(d)
        yield DeferredList(stopping)
        sites = self.runtime.sites
        busy = []
        for site in sites:
            site.draining = True
            site.connections.close_all_when_done()
            if site.requests_in_flight:
                busy.append(site.connections.when_drained())
        timeout = self.runtime.config.lb.drain_timeout if self.runtime.config else 30.0
        if busy:
            log.info(
                "draining {count} requests (up to {timeout}s)",
                count=sum(site.requests_in_flight for site in sites),
                timeout=timeout,
            )
            drained = yield _within(
                DeferredList(busy, consumeErrors=True), timeout, self.reactor
            )
            if not drained:
                log.warn(
                    "drain timeout: closing {count} requests still under way",
                    count=sum(site.requests_in_flight for site in sites),
                )
                for site in sites:
                    site.connections.abort_all()
        # What is left is closing after its last answer: let it flush.
        closing = [site.connections.when_closed() for site in sites]
        yield _within(DeferredList(closing, consumeErrors=True), 2.0, self.reactor)
        for site in sites:
            site.connections.abort_all()
        yield self.runtime.stop()


@inlineCallbacks
def _within(d: Deferred[Any], seconds: float, clock: Any) -> Any:
    """
    Wait for C{d} at most C{seconds}: True if it fired in time.
    """
    timed_out = []

    def expire() -> None:
        timed_out.append(True)
        d.cancel()

    timer = clock.callLater(seconds, expire)
    with contextlib.suppress(Exception):
        yield d
    if timer.active():
        timer.cancel()
    return not timed_out


def build(
    config: Config,
    reactor: Any,
    upstream_for: Callable[..., UpstreamClient] = Upstream,
    state: RuntimeState | None = None,
) -> BalancerService:
    """
    The service for C{config} (read from its C{source} file, with C{state}'s
    runtime changes on top), on C{reactor}.
    """
    service = BalancerService(reactor, config.source, upstream_for, state)
    from l7lb.admin import admin_site

    service.admin_factory = admin_site
    service.apply(config)
    return service


def read_runtime_state(config: Config) -> RuntimeState:
    """
    The runtime changes saved for this configuration, if any.
    """
    return read_state(config.admin.state_file if config.admin else None)
