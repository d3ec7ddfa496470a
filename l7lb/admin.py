# -*- test-case-name: tests.test_admin -*-
"""
The admin API: JSON in and out, every request with C{Authorization: Bearer
<token>} when C{[admin] token_file} is set (compared in constant time).

    GET    /pools  /pools/NAME  /routes  /stats  /config  /metrics
    POST   /pools                              {"name": ..., "servers": [...], ...}
    POST   /pools/NAME/backends                {"url": ..., "weight": N}
    DELETE /pools/NAME/backends/ID
    POST   /pools/NAME/backends/ID/drain
    PUT    /pools/NAME/backends/ID/weight      {"weight": N}
    POST   /routes                             {"name": ..., "pool": ..., ...}
    DELETE /routes/NAME
    POST   /reload

Changes are configuration sections edited on top of the file, validated as
C{--check} validates the file (the same messages come back with a 400, and
nothing is applied), saved to C{state_file}, and applied at once without
dropping a request. ID is a backend's C{host:port} or its URL,
percent-encoded.

With C{[lb] workers = N} the supervisor serves this API
(L{l7lb.fleetadmin.FleetAdmin}) from every worker's private one
(L{AdminResource} with C{private}, on a unix socket, which also takes C{PUT
/state}: the whole runtime state, as the supervisor validated and saved
it).
"""

from __future__ import annotations

import hmac
import json
import os
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from l7lb.config import (
    Config,
    ServerConfig,
    _servers,
    describe_policy,
    describe_route,
)
from l7lb.metrics import BalancerCollector, registry
from l7lb.pool import Backend, Pool
from l7lb.routing import RouteMap
from l7lb.state import RuntimeState

if TYPE_CHECKING:
    from l7lb.service import BalancerService

# A status and a JSON value (or bytes of metrics text).
Answer = tuple[int, Any]


class AdminError(Exception):
    """
    An answer other than 200: a status and a JSON body.
    """

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def _not_found(what: str) -> AdminError:
    return AdminError(404, {"error": f"no {what}"})


def _value(value: Any) -> str:
    """
    A JSON value as configuration text.
    """
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return "\n".join(_value(item) for item in value)
    return str(value)


class Managed(Protocol):
    """
    What the admin API changes: the file, the runtime changes on top, and
    the configuration they make.
    """

    config_path: str
    state: RuntimeState

    @property
    def config(self) -> Config: ...


class AdminAPI(Resource):
    """
    The admin API, one leaf resource routing on method and path: the
    authentication, the routing and the changes (each one a new
    L{RuntimeState}, validated and applied by L{apply_change}). What is
    read and how a change is applied are the subclasses' business; any
    answer may come later, as a Deferred.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, managed: Managed) -> None:
        super().__init__()
        self.managed = managed
        self.started = time.time()

    def render(self, request: Request) -> int:
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        try:
            answer = self._answer(request)
        except Exception:
            d: Deferred[Answer] = fail()
        else:
            d = answer if isinstance(answer, Deferred) else succeed(answer)
        d.addErrback(self._failed)
        d.addCallback(self._respond, request, gone)
        return NOT_DONE_YET

    def _failed(self, failure: Failure) -> Answer:
        if failure.check(AdminError):
            error: AdminError = failure.value  # type: ignore[assignment]
            return error.status, error.body
        self.log.failure("admin API error", failure)
        return 500, {"error": "internal error"}

    @staticmethod
    def _respond(answer: Answer, request: Request, gone: list[Failure]) -> None:
        if gone:
            return
        status, body = answer
        request.setResponseCode(status)
        if isinstance(body, bytes):
            request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
            request.write(body)
        else:
            request.setHeader(b"Content-Type", b"application/json")
            request.write(json.dumps(body, indent=2).encode() + b"\n")
        request.finish()

    def _authorise(self, request: Request) -> None:
        admin = self.managed.config.admin
        if admin is None or admin.token_file is None:
            return
        with open(admin.token_file, "rb") as f:
            token = f.read().strip()
        given = request.getHeader(b"Authorization") or b""
        scheme, _, credentials = given.partition(b" ")
        if not (
            scheme.lower() == b"bearer"
            and hmac.compare_digest(credentials.strip(), token)
        ):
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="l7lb"')
            raise AdminError(401, {"error": "a valid bearer token is needed"})

    def _answer(self, request: Request) -> Answer | Deferred[Answer]:
        self._authorise(request)
        method = request.method
        parts = [
            unquote(p.decode("utf-8", "replace")) for p in request.path.split(b"/") if p
        ]
        match method, parts:
            case b"GET", ["pools"]:
                return self.pools()
            case b"GET", ["pools", name]:
                return self.pool(name)
            case b"GET", ["routes"]:
                return self.routes()
            case b"GET", ["stats"]:
                return self.stats()
            case b"GET", ["config"]:
                return self.effective_config()
            case b"GET", ["metrics"]:
                return self.metrics()
            case b"POST", ["reload"]:
                return self.reload()
            case b"POST", ["pools"]:
                return self._new_section("pool", self._json(request))
            case b"POST", ["routes"]:
                return self._new_section("route", self._json(request))
            case b"DELETE", ["routes", name]:
                return self._delete_section(f"route:{name}", {"deleted": name})
            case b"POST", ["pools", name, "backends"]:
                return self._add_backend(name, self._json(request))
            case b"DELETE", ["pools", name, "backends", backend]:
                return self._remove_backend(name, backend)
            case b"POST", ["pools", name, "backends", backend, "drain"]:
                return self.drain(name, backend)
            case b"PUT", ["pools", name, "backends", backend, "weight"]:
                return self._set_weight(name, backend, self._json(request))
        return self.other(method, parts, request)

    def other(
        self, method: bytes, parts: list[str], request: Request
    ) -> Answer | Deferred[Answer]:
        raise AdminError(
            404,
            {"error": f"no such endpoint: {method.decode()} {request.path.decode()}"},
        )

    @staticmethod
    def _json(request: Request) -> dict[str, Any]:
        assert request.content is not None
        try:
            body = json.loads(request.content.read() or b"{}")
        except ValueError as e:
            raise AdminError(400, {"errors": [f"the body is not JSON: {e}"]}) from None
        if not isinstance(body, dict):
            raise AdminError(400, {"errors": ["the body must be a JSON object"]})
        return body

    # What subclasses answer.

    def pools(self) -> Answer | Deferred[Answer]:
        raise NotImplementedError

    def pool(self, name: str) -> Answer | Deferred[Answer]:
        raise NotImplementedError

    def routes(self) -> Answer | Deferred[Answer]:
        raise NotImplementedError

    def stats(self) -> Answer | Deferred[Answer]:
        raise NotImplementedError

    def effective_config(self) -> Answer | Deferred[Answer]:
        raise NotImplementedError

    def metrics(self) -> Answer | Deferred[Answer]:
        raise NotImplementedError

    def reload(self) -> Answer | Deferred[Answer]:
        raise NotImplementedError

    def drain(self, pool_name: str, backend_id: str) -> Answer | Deferred[Answer]:
        raise NotImplementedError

    def apply_change(
        self, state: RuntimeState, status: int, body: dict[str, Any]
    ) -> Answer | Deferred[Answer]:
        """
        Validate C{state}, save it, apply it; answer C{status} and C{body},
        or 400 with the problems.
        """
        raise NotImplementedError

    # Changing.

    @staticmethod
    def _outcome(problems: list[str], status: int, body: dict[str, Any]) -> Answer:
        if problems:
            raise AdminError(400, {"errors": problems})
        return status, body

    def _sections(self) -> dict[str, dict[str, str]]:
        return self.managed.state.effective(self.managed.config_path)

    def _new_section(
        self, kind: str, body: dict[str, Any]
    ) -> Answer | Deferred[Answer]:
        name = body.pop("name", None)
        if not isinstance(name, str) or not name or ":" in name:
            raise AdminError(400, {"errors": [f'a {kind} needs a "name"']})
        section = f"{kind}:{name}"
        if section in self._sections():
            raise AdminError(409, {"error": f"[{section}] exists already"})
        values = {key: _value(value) for key, value in body.items()}
        state = self.managed.state.with_section(section, values)
        return self.apply_change(state, 201, {"created": section})

    def _delete_section(
        self, section: str, body: dict[str, Any]
    ) -> Answer | Deferred[Answer]:
        if section not in self._sections():
            raise _not_found(f"[{section}]")
        in_file = section in _file_sections(self.managed)
        state = self.managed.state.without_section(section, in_file)
        return self.apply_change(state, 200, body)

    def _servers(self, pool_name: str) -> tuple[dict[str, str], list[ServerConfig]]:
        section = self._sections().get(f"pool:{pool_name}")
        if section is None:
            raise _not_found(f"pool named {pool_name!r}")
        return section, _servers(section.get("servers", ""))

    def _write_servers(
        self,
        pool_name: str,
        section: dict[str, str],
        servers: list[ServerConfig],
        status: int,
        body: dict[str, Any],
    ) -> Answer | Deferred[Answer]:
        values = dict(section)
        values["servers"] = "\n".join(f"{s.url} weight={s.weight}" for s in servers)
        state = self.managed.state.with_section(f"pool:{pool_name}", values)
        return self.apply_change(state, status, body)

    def _add_backend(
        self, pool_name: str, body: dict[str, Any]
    ) -> Answer | Deferred[Answer]:
        url = body.get("url")
        weight = body.get("weight", 1)
        if not isinstance(url, str):
            raise AdminError(400, {"errors": ['a backend needs a "url"']})
        try:
            (server,) = _servers(f"{url} weight={weight}")
        except ValueError as e:
            raise AdminError(
                400, {"errors": [f"[pool:{pool_name}] servers: {e}"]}
            ) from None
        section, servers = self._servers(pool_name)
        existing = [s for s in servers if s.url == server.url]
        servers = [s for s in servers if s.url != server.url] + [server]
        return self._write_servers(
            pool_name,
            section,
            servers,
            200 if existing else 201,
            {"id": server.address, "url": server.url, "weight": server.weight},
        )

    def _match(
        self, servers: list[ServerConfig], backend_id: str, pool_name: str
    ) -> ServerConfig:
        for server in servers:
            if backend_id in (server.address, server.url):
                return server
        raise _not_found(f"backend {backend_id!r} in pool {pool_name!r}")

    def _remove_backend(
        self, pool_name: str, backend_id: str
    ) -> Answer | Deferred[Answer]:
        section, servers = self._servers(pool_name)
        gone = self._match(servers, backend_id, pool_name)
        remaining = [s for s in servers if s is not gone]
        if not remaining:
            raise AdminError(
                400,
                {
                    "errors": [
                        f"[pool:{pool_name}] servers: a pool needs at least one server"
                    ]
                },
            )
        return self._write_servers(
            pool_name, section, remaining, 200, {"removed": gone.address}
        )

    def _set_weight(
        self, pool_name: str, backend_id: str, body: dict[str, Any]
    ) -> Answer | Deferred[Answer]:
        section, servers = self._servers(pool_name)
        target = self._match(servers, backend_id, pool_name)
        try:
            (changed,) = _servers(f"{target.url} weight={body.get('weight')}")
        except ValueError as e:
            raise AdminError(
                400, {"errors": [f"[pool:{pool_name}] servers: {e}"]}
            ) from None
        servers = [changed if s is target else s for s in servers]
        return self._write_servers(
            pool_name,
            section,
            servers,
            200,
            {"id": changed.address, "weight": changed.weight},
        )


class AdminResource(AdminAPI):
    """
    The admin API of one balancer process. C{private}: a worker's own API,
    reached by its supervisor only (through a unix socket in a directory
    only the supervisor's user may enter), which also takes C{PUT /state}.
    """

    def __init__(self, service: BalancerService, private: bool = False) -> None:
        super().__init__(service)
        self.service = service
        self.private = private
        # The newest runtime state the supervisor sent (private API).
        self.state_version = 0
        self.registry = registry(
            BalancerCollector(
                service.runtime.metrics,
                lambda: (service.runtime.pools, service.runtime.policies),
            )
        )

    def _authorise(self, request: Request) -> None:
        # The private API is protected by its directory's permissions.
        if not self.private:
            super()._authorise(request)

    def pools(self) -> Answer:
        return 200, {"pools": [self._pool(p) for p in self.service.pools.values()]}

    def pool(self, name: str) -> Answer:
        return 200, self._pool(self._find_pool(name), detail=True)

    def routes(self) -> Answer:
        return 200, {"routes": self._routes()}

    def stats(self) -> Answer:
        return 200, self._stats()

    def effective_config(self) -> Answer:
        return 200, self.service.state.effective(self.service.config_path)

    def metrics(self) -> Answer:
        return 200, generate_latest(self.registry)

    def reload(self) -> Answer:
        return self._outcome(self.service.reload(), 200, {"reloaded": True})

    def apply_change(
        self, state: RuntimeState, status: int, body: dict[str, Any]
    ) -> Answer:
        return self._outcome(self.service.change(state), status, body)

    def other(self, method: bytes, parts: list[str], request: Request) -> Answer:
        if self.private and (method, parts) == (b"PUT", ["state"]):
            body = self._json(request)
            version = body.get("version", 0)
            if not isinstance(version, int) or version < self.state_version:
                # Changes race to the workers on separate connections: an
                # older state arriving after a newer one is not applied.
                return 200, {"applied": False, "stale": True}
            self.state_version = version
            state = RuntimeState(
                {
                    str(name): {str(k): str(v) for k, v in values.items()}
                    for name, values in body.get("sections", {}).items()
                },
                tuple(str(name) for name in body.get("removed", [])),
            )
            return self.apply_change(state, 200, {"applied": True})
        return super().other(method, parts, request)  # type: ignore[return-value]

    # Reading.

    def _find_pool(self, name: str) -> Pool:
        pool = self.service.pools.get(name)
        if pool is None:
            raise _not_found(f"pool named {name!r}")
        return pool

    def _pool(self, pool: Pool, detail: bool = False) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "name": pool.name,
            "balance": pool.config.balance,
            "backends": len(pool.backends),
            "in_rotation": sum(1 for b in pool.backends if b.in_rotation),
            "in_flight": pool.inflight,
            "queued_now": len(pool.queue),
            "retries": pool.retried,
        }
        if detail:
            summary["backends"] = [self._backend(pool, b) for b in pool.backends]
        return summary

    def _backend(self, pool: Pool, backend: Backend) -> dict[str, Any]:
        checker = self.service.runtime.checkers.get(backend)
        last_change = None
        if checker is not None and checker.changed is not None:
            at, reason = checker.changed
            last_change = {"at": _iso(at), "reason": reason}
        answered: Counter[str] = Counter()
        for (
            _,
            pool_name,
            address,
            code,
        ), count in self.service.runtime.metrics.requests.items():
            if pool_name == pool.name and address == backend.address:
                answered[code] += count
        passive = backend.passive
        return {
            "id": backend.address,
            "url": backend.config.url,
            "weight": backend.weight,
            "state": "in rotation" if backend.in_rotation else "out of rotation",
            "healthy": backend.healthy,
            "ejected": backend.ejected,
            "draining": backend.draining,
            "in_flight": backend.inflight,
            "answered": dict(answered),
            "ejections": passive.total_ejections if passive else 0,
            "last_health_change": last_change,
            "last_check": checker.last.reason if checker and checker.last else None,
            "last_latency_seconds": backend.last_latency,
        }

    def _routes(self) -> list[dict[str, Any]]:
        routes = RouteMap(self.service.config.routes).routes
        return [
            {
                "name": route.name,
                "matches": describe_route(route),
                "pool": route.pool,
                "policy": describe_policy(route),
            }
            for route in routes
        ]

    def _stats(self) -> dict[str, Any]:
        metrics = self.service.runtime.metrics
        by_class: Counter[str] = Counter()
        for (_, _, _, code), count in metrics.requests.items():
            by_class[code] += count
        policies = self.service.policies.values()
        pools = self.service.pools.values()
        return {
            "uptime_seconds": round(time.time() - self.started, 3),
            "requests": dict(by_class),
            "requests_in_flight": sum(
                s.requests_in_flight for s in self.service.runtime.sites
            ),
            "client_connections": metrics.connections_open,
            "bytes_sent": metrics.bytes_sent,
            "bytes_received": metrics.bytes_received,
            "retries": sum(p.retried for p in pools),
            "shed": sum(p.shed for p in pools),
            "rate_limited": sum(p.limiter.refused for p in policies if p.limiter),
            "pid": os.getpid(),
        }

    def drain(self, pool_name: str, backend_id: str) -> Answer:
        pool = self._find_pool(pool_name)
        for backend in pool.backends:
            if backend_id in (backend.address, backend.config.url):
                backend.set_draining(True)
                return 200, {
                    "id": backend.address,
                    "draining": True,
                    "in_flight": backend.inflight,
                }
        raise _not_found(f"backend {backend_id!r} in pool {pool_name!r}")


def _file_sections(managed: Managed) -> set[str]:
    from l7lb.config import read_sections

    return set(read_sections(managed.config_path).sections())


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def admin_site(service: BalancerService, private: bool = False) -> Site:
    site = Site(AdminResource(service, private))
    site.noisy = False
    site.displayTracebacks = False
    if private:
        # The supervisor's requests (a scrape asks every worker) are not
        # worth a log line each.
        site.log = lambda request: None  # type: ignore[method-assign]
    return site
