# -*- test-case-name: tests.test_config -*-
"""
The configuration file, read once into frozen values.

Nothing else in l7lb reads the INI file. L{load} returns a L{Config} or
raises L{ConfigError} carrying every problem found, one line each, naming
the file, the section and the key, so an operator fixes them all in one go.
"""

from __future__ import annotations

import configparser
import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from twisted.internet.endpoints import serverFromString

from l7lb import units
from l7lb.certificates import load_ca_certificates, load_certificate_file
from l7lb.paths import BadTarget, normalise_path

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

BALANCE_STRATEGIES = (
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "power_of_two",
    "hash",
)

T = TypeVar("T")
U = TypeVar("U")


class ConfigError(Exception):
    """
    The configuration cannot be used; C{problems} holds one line per problem.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """
    One backend server of a pool, as written in its C{servers} list.
    """

    url: str
    scheme: str
    host: str
    port: int
    weight: int = 1

    @property
    def address(self) -> str:
        """
        C{host:port}, the name logs and the access log use for this backend.
        """
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """
    Active health checks of a pool's backends.
    """

    path: str
    interval: float = 10.0
    timeout: float = 2.0
    status_low: int = 200
    status_high: int = 399
    rise: int = 2
    fall: int = 3


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """
    A named set of backends and how requests are spread over them.
    """

    name: str
    servers: tuple[ServerConfig, ...]
    balance: str = "round_robin"
    health: HealthCheckConfig | None = None
    connect_timeout: float = 3.0
    response_timeout: float = 30.0
    keepalive_connections: int = 256
    keepalive_timeout: float = 60.0
    tls_verify: bool = True
    tls_ca: str | None = None
    hash_key: str = "client_ip"
    sticky_cookie: str | None = None
    slow_start: float = 0.0
    max_fails: int = 3
    fail_timeout: float = 10.0
    fail_on_5xx: bool = False
    max_connections: int = 0
    pool_max_connections: int = 0
    max_queue: int = 0
    queue_timeout: float = 5.0
    retries: int = 1
    retry_budget: float = 0.2
    idle_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """
    A token bucket: C{rate} tokens per second, at most C{burst} saved up.
    C{quota} per C{window} seconds is the rate as written (C{6000/m} is 6000
    per 60), which is how the RateLimit-Policy field states it.
    """

    rate: float
    burst: int
    key: str = "client_ip"
    text: str = ""
    quota: int = 0
    window: int = 1


@dataclass(frozen=True, slots=True)
class AccessRule:
    """
    Who may use a route: when C{allow} is set only those addresses may;
    C{deny} refuses addresses even so; C{deny_all} refuses everyone.
    """

    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    deny_all: bool = False


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """
    Which requests go to which pool. A condition left as C{None} always holds.
    """

    name: str
    pool: str | None
    path_prefix: bytes | None = None
    host: str | None = None
    methods: frozenset[bytes] | None = None
    header: tuple[bytes, bytes] | None = None
    strip_prefix: bool = False
    rate_limit: RateLimitConfig | None = None
    redirect_https: bool = False
    hsts: bytes | None = None
    access: AccessRule | None = None


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """
    Certificates and protocol settings for the C{tls_listen} endpoints.
    """

    certificates: tuple[str, ...]
    min_version: str = "TLSv1.2"
    alpn: tuple[str, ...] = ("h2", "http/1.1")


@dataclass(frozen=True, slots=True)
class LBConfig:
    """
    The C{[lb]} section: listeners and process-wide limits.
    """

    listen: tuple[str, ...] = ()
    tls_listen: tuple[str, ...] = ()
    access_log: str | None = "-"
    trusted_proxies: tuple[IPNetwork, ...] = ()
    max_header_size: int = 16 * 1024
    max_uri_length: int = 8 * 1024
    max_body_size: int = 100 * 1024 * 1024
    keepalive_timeout: float = 60.0
    tls_handshake_timeout: float = 10.0
    secret_file: str | None = None
    client_header_timeout: float = 10.0
    client_body_timeout: float = 120.0
    send_timeout: float = 60.0
    max_connections: int = 0
    max_connections_per_ip: int = 0
    max_headers: int = 100
    drain_timeout: float = 30.0
    access_log_format: str = "combined"
    workers: int = 1


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """
    The C{[admin]} section: the admin API's listener, its bearer token and
    where runtime changes are kept.
    """

    listen: str
    token_file: str | None = None
    state_file: str | None = None


@dataclass(frozen=True, slots=True)
class Config:
    """
    The whole configuration. C{notices} lists what was accepted but has no
    effect (yet), so that nothing in the file is silently ignored.
    """

    source: str
    lb: LBConfig
    pools: tuple[PoolConfig, ...]
    routes: tuple[RouteConfig, ...]
    tls: TLSConfig | None = None
    notices: tuple[str, ...] = field(default=())
    ratelimit_max_keys: int = 100_000
    admin: AdminConfig | None = None

    def pool(self, name: str) -> PoolConfig:
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)


Sections = dict[str, dict[str, str]]


def load(
    path: str,
    overlay: Sections | None = None,
    removed: Sequence[str] = (),
    text: str | None = None,
) -> Config:
    """
    Read and validate the file at C{path}, with runtime changes on top:
    C{overlay} sections replace (or add to) the file's, C{removed} sections
    are left out. With C{text}, that is the file's content (read earlier),
    and C{path} only names it and locates the relative paths in it.

    @raise ConfigError: with every problem found.
    """
    parser = read_sections(path, overlay, removed, text)
    return _Reader(path, parser).read()


def effective_sections(
    path: str, overlay: Sections | None = None, removed: Sequence[str] = ()
) -> Sections:
    """
    The configuration's sections and values as text, runtime changes
    applied (what the admin API shows and edits).
    """
    parser = read_sections(path, overlay, removed)
    return {name: dict(parser.items(name)) for name in parser.sections()}


def read_sections(
    path: str,
    overlay: Sections | None = None,
    removed: Sequence[str] = (),
    text: str | None = None,
) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        interpolation=None,
        comment_prefixes=("#", ";"),
        inline_comment_prefixes=("#", ";"),
        strict=True,
        default_section="\x00no default section",
    )
    try:
        if text is None:
            text = read_text(path)
        parser.read_string(text, source=path)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the file: {e.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: the file is not UTF-8 text"]) from None
    except configparser.Error as e:
        message = " ".join(str(e).split())
        raise ConfigError([f"{path}: {message}"]) from None
    for name in removed:
        parser.remove_section(name)
    for name, values in (overlay or {}).items():
        parser.remove_section(name)
        parser.add_section(name)
        for key, value in values.items():
            parser.set(name, key, value)
    return parser


def read_text(path: str) -> str:
    """
    A configuration file's content (OSError, UnicodeDecodeError).
    """
    with open(path, encoding="utf-8") as f:
        return f.read()


_KNOWN_POOL_KEYS = frozenset(
    {
        "servers",
        "balance",
        "health_path",
        "health_interval",
        "health_timeout",
        "health_status",
        "rise",
        "fall",
        "connect_timeout",
        "response_timeout",
        "keepalive_connections",
        "keepalive_timeout",
        "tls_verify",
        "tls_ca",
        "hash_key",
        "sticky",
        "slow_start",
        "max_fails",
        "fail_timeout",
        "fail_on_5xx",
        "max_connections",
        "pool_max_connections",
        "max_queue",
        "queue_timeout",
        "retries",
        "retry_budget",
        "idle_timeout",
    }
)
_KNOWN_ROUTE_KEYS = frozenset(
    {
        "path_prefix",
        "host",
        "methods",
        "header",
        "pool",
        "strip_prefix",
        "rate_limit",
        "burst",
        "rate_limit_key",
        "redirect_https",
        "hsts",
        "allow",
        "deny",
    }
)
_KNOWN_LB_KEYS = frozenset(
    {
        "listen",
        "tls_listen",
        "access_log",
        "trusted_proxies",
        "max_header_size",
        "max_uri_length",
        "max_body_size",
        "keepalive_timeout",
        "tls_handshake_timeout",
        "secret_file",
        "client_header_timeout",
        "client_body_timeout",
        "send_timeout",
        "max_connections",
        "max_connections_per_ip",
        "max_headers",
        "drain_timeout",
        "access_log_format",
        "workers",
    }
)
_KNOWN_ADMIN_KEYS = frozenset({"listen", "token_file", "state_file"})
_KNOWN_RATELIMIT_KEYS = frozenset({"rate_limit", "burst", "rate_limit_key", "max_keys"})
_KNOWN_TLS_KEYS = frozenset({"certificates", "min_version", "alpn"})

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HOST_NAME = re.compile(
    r"(\*\.)?([a-z0-9]([a-z0-9-]*[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*"
)
_SERVER_URL = re.compile(
    r"(https?)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})/?"
)
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


class _Reader:
    """
    Walks the parsed INI sections, collecting values and problems.
    """

    def __init__(self, path: str, parser: configparser.ConfigParser) -> None:
        self.path = path
        self.base = os.path.dirname(os.path.abspath(path))
        self.parser = parser
        self.problems: list[str] = []
        self.notices: list[str] = []
        self.default_limit: RateLimitConfig | None = None

    def problem(self, section: str, key: str | None, message: str) -> None:
        where = f"[{section}] {key}" if key else f"[{section}]"
        self.problems.append(f"{self.path}: {where}: {message}")

    def notice(self, section: str, key: str | None, message: str) -> None:
        where = f"[{section}] {key}" if key else f"[{section}]"
        self.notices.append(f"{where}: {message}")

    def value(
        self,
        section: str,
        key: str,
        parse: Callable[[str], T],
        default: U,
    ) -> T | U:
        """
        The parsed value of C{key}, or C{default} when it is absent or bad
        (a bad one is recorded as a problem).
        """
        text = self.parser.get(section, key, fallback=None)
        if text is None:
            return default
        try:
            return parse(text)
        except ValueError as e:
            self.problem(section, key, str(e))
            return default

    def read(self) -> Config:
        lb = LBConfig()
        tls = None
        pools: list[PoolConfig] = []
        routes: list[RouteConfig] = []
        max_keys = 100_000
        admin = None
        if self.parser.has_section("ratelimit"):
            self.unknown_keys("ratelimit", _KNOWN_RATELIMIT_KEYS)
            self.default_limit = self.read_rate_limit("ratelimit", None)
            max_keys = self.value(
                "ratelimit",
                "max_keys",
                lambda t: units.parse_int(t, 1, 100_000_000),
                100_000,
            )
        for section in self.parser.sections():
            kind, _, name = section.partition(":")
            if section == "lb":
                lb = self.read_lb(section)
            elif section == "tls":
                tls = self.read_tls(section)
            elif section == "ratelimit":
                pass
            elif section == "admin":
                admin = self.read_admin(section)
            elif kind == "pool" and name:
                pools.append(self.read_pool(section, name))
            elif kind == "route" and name:
                routes.append(self.read_route(section, name))
            else:
                self.problem(
                    section,
                    None,
                    "unknown section (expected [lb], [tls], [ratelimit], "
                    "[admin], [pool:NAME] or [route:NAME])",
                )
        if not self.parser.has_section("lb"):
            self.problems.append(f"{self.path}: [lb]: missing section")
        self.check_whole(lb, tls, pools, routes)
        if self.problems:
            raise ConfigError(self.problems)
        return Config(
            source=self.path,
            lb=lb,
            pools=tuple(pools),
            routes=tuple(routes),
            tls=tls,
            notices=tuple(self.notices),
            ratelimit_max_keys=max_keys,
            admin=admin,
        )

    def unknown_keys(self, section: str, known: frozenset[str]) -> None:
        for key in self.parser.options(section):
            if key not in known:
                self.problem(
                    section, key, f"unknown key (known: {', '.join(sorted(known))})"
                )

    def read_lb(self, section: str) -> LBConfig:
        self.unknown_keys(section, _KNOWN_LB_KEYS)
        listen = tuple(self.value(section, "listen", self.endpoints, ()))
        tls_listen = tuple(self.value(section, "tls_listen", self.endpoints, ()))
        if not any(
            self.parser.has_option(section, k) for k in ("listen", "tls_listen")
        ):
            self.problem(section, "listen", "no listen or tls_listen endpoint given")
        return LBConfig(
            listen=listen,
            tls_listen=tls_listen,
            access_log=self.value(section, "access_log", self.access_log, "-"),
            trusted_proxies=tuple(
                self.value(section, "trusted_proxies", _networks, ())
            ),
            max_header_size=self.value(
                section, "max_header_size", _size_at_least(1024), 16 * 1024
            ),
            max_uri_length=self.value(
                section, "max_uri_length", _size_at_least(256), 8 * 1024
            ),
            max_body_size=self.value(
                section, "max_body_size", _size_at_least(0), 100 * 1024 * 1024
            ),
            keepalive_timeout=self.value(
                section, "keepalive_timeout", _positive_duration, 60.0
            ),
            tls_handshake_timeout=self.value(
                section, "tls_handshake_timeout", _positive_duration, 10.0
            ),
            secret_file=self.value(section, "secret_file", self.secret_file, None),
            client_header_timeout=self.value(
                section, "client_header_timeout", _positive_duration, 10.0
            ),
            client_body_timeout=self.value(
                section, "client_body_timeout", _positive_duration, 120.0
            ),
            send_timeout=self.value(section, "send_timeout", _positive_duration, 60.0),
            max_connections=self.value(
                section, "max_connections", _count(0, 10_000_000), 0
            ),
            max_connections_per_ip=self.value(
                section, "max_connections_per_ip", _count(0, 10_000_000), 0
            ),
            max_headers=self.value(section, "max_headers", _count(1, 10_000), 100),
            drain_timeout=self.value(
                section, "drain_timeout", _positive_duration, 30.0
            ),
            access_log_format=self.value(
                section, "access_log_format", _one_of("combined", "json"), "combined"
            ),
            workers=self.value(section, "workers", _workers, 1),
        )

    def read_admin(self, section: str) -> AdminConfig | None:
        self.unknown_keys(section, _KNOWN_ADMIN_KEYS)
        listen = self.value(section, "listen", self.endpoints, None)
        token_file = self.value(section, "token_file", self.token_file, None)
        state_file = self.value(section, "state_file", self.state_file, None)
        if listen is None:
            if not self.parser.has_option(section, "listen"):
                self.problem(
                    section, "listen", "missing: the admin API needs an endpoint"
                )
            return None
        if len(listen) != 1:
            self.problem(section, "listen", "expected one endpoint")
            return None
        if token_file is None and not _loopback_only(listen[0]):
            self.problem(
                section,
                "listen",
                "without token_file the admin API may only listen on loopback "
                "(interface=127.0.0.1 or ::1) or a unix socket",
            )
        return AdminConfig(listen[0], token_file, state_file)

    def token_file(self, text: str) -> str:
        path = self.relative(text.strip())
        try:
            with open(path, "rb") as f:
                token = f.read().strip()
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror}") from None
        if len(token) < 16:
            raise ValueError(
                f"{path} holds {len(token)} bytes; a token needs 16 or more"
            )
        return path

    def state_file(self, text: str) -> str:
        path = self.relative(text.strip())
        directory = os.path.dirname(path)
        if not (os.path.isdir(directory) and os.access(directory, os.W_OK)):
            raise ValueError(f"cannot write into {directory}")
        return path

    def endpoints(self, text: str) -> list[str]:
        descriptions = units.parse_list(text)
        for description in descriptions:
            _check_endpoint(description)
        if not descriptions:
            raise ValueError("expected one or more endpoint strings")
        return descriptions

    def access_log(self, text: str) -> str | None:
        text = text.strip()
        if text == "-":
            return "-"
        if text.lower() == "off":
            return None
        path = self.relative(text)
        if os.path.exists(path):
            writable = os.path.isfile(path) and os.access(path, os.W_OK)
        else:
            directory = os.path.dirname(path)
            writable = os.path.isdir(directory) and os.access(directory, os.W_OK)
        if not writable:
            raise ValueError(
                f"cannot write {path} (expected -, off or a writable file)"
            )
        return path

    def secret_file(self, text: str) -> str:
        path = self.relative(text.strip())
        try:
            with open(path, "rb") as f:
                secret = f.read().strip()
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror}") from None
        if len(secret) < 16:
            raise ValueError(
                f"{path} holds {len(secret)} bytes; a secret needs 16 or more"
            )
        return path

    def relative(self, path: str) -> str:
        return os.path.normpath(os.path.join(self.base, path))

    def read_tls(self, section: str) -> TLSConfig:
        self.unknown_keys(section, _KNOWN_TLS_KEYS)
        certificates = tuple(self.value(section, "certificates", self.certificates, ()))
        if not self.parser.has_option(section, "certificates"):
            self.problem(section, "certificates", "at least one PEM file is needed")
        min_version = self.value(
            section, "min_version", _one_of("TLSv1.2", "TLSv1.3"), "TLSv1.2"
        )
        alpn = tuple(self.value(section, "alpn", _alpn, ("h2", "http/1.1")))
        return TLSConfig(certificates, min_version, alpn)

    def certificates(self, text: str) -> list[str]:
        paths = [self.relative(p) for p in units.parse_list(text)]
        if not paths:
            raise ValueError("at least one PEM file is needed")
        for path in paths:
            load_certificate_file(path)
        return paths

    def ca_file(self, text: str) -> str:
        path = self.relative(text.strip())
        load_ca_certificates(path)
        return path

    def read_pool(self, section: str, name: str) -> PoolConfig:
        self.unknown_keys(section, _KNOWN_POOL_KEYS)
        servers = tuple(self.value(section, "servers", _servers, ()))
        if not self.parser.has_option(section, "servers"):
            self.problem(
                section, "servers", "missing: a pool needs at least one server"
            )
        balance = self.value(
            section, "balance", _one_of(*BALANCE_STRATEGIES), "round_robin"
        )
        if balance != "hash" and self.parser.has_option(section, "hash_key"):
            self.notice(section, "hash_key", "has no effect unless balance = hash")
        if balance == "hash" and self.parser.has_option(section, "slow_start"):
            self.notice(
                section,
                "slow_start",
                "has no effect with balance = hash (keys stay put)",
            )
        if not any(server.scheme == "https" for server in servers):
            for key in ("tls_verify", "tls_ca"):
                if self.parser.has_option(section, key):
                    self.notice(section, key, "has no effect without https:// servers")
        if balance == "round_robin" and any(s.weight != 1 for s in servers):
            self.notice(
                section,
                "servers",
                "weights have no effect with balance = round_robin "
                "(use weighted_round_robin)",
            )
        return PoolConfig(
            name=name,
            servers=servers,
            balance=balance,
            health=self.read_health(section),
            connect_timeout=self.value(
                section, "connect_timeout", _positive_duration, 3.0
            ),
            response_timeout=self.value(
                section, "response_timeout", _positive_duration, 30.0
            ),
            keepalive_connections=self.value(
                section,
                "keepalive_connections",
                lambda t: units.parse_int(t, 0, 100_000),
                256,
            ),
            keepalive_timeout=self.value(
                section, "keepalive_timeout", _positive_duration, 60.0
            ),
            tls_verify=self.value(section, "tls_verify", units.parse_bool, True),
            tls_ca=self.value(section, "tls_ca", self.ca_file, None),
            hash_key=self.value(section, "hash_key", _request_key, "client_ip"),
            sticky_cookie=self.value(section, "sticky", _sticky, None),
            slow_start=self.value(section, "slow_start", units.parse_duration, 0.0),
            max_fails=self.value(section, "max_fails", _count(0, 1000), 3),
            fail_timeout=self.value(section, "fail_timeout", _positive_duration, 10.0),
            fail_on_5xx=self.value(section, "fail_on_5xx", units.parse_bool, False),
            max_connections=self.value(
                section, "max_connections", _count(0, 10_000_000), 0
            ),
            pool_max_connections=self.value(
                section, "pool_max_connections", _count(0, 10_000_000), 0
            ),
            max_queue=self.value(section, "max_queue", _count(0, 10_000_000), 0),
            queue_timeout=self.value(section, "queue_timeout", _positive_duration, 5.0),
            retries=self.value(section, "retries", _count(0, 10), 1),
            retry_budget=self.value(section, "retry_budget", _percentage, 0.2),
            idle_timeout=self.value(section, "idle_timeout", _positive_duration, 60.0),
        )

    def read_health(self, section: str) -> HealthCheckConfig | None:
        keys = ("health_interval", "health_timeout", "health_status", "rise", "fall")
        path = self.value(section, "health_path", _health_path, None)
        if path is None:
            for key in keys:
                if self.parser.has_option(section, key):
                    self.notice(section, key, "has no effect without health_path")
            return None
        low, high = self.value(section, "health_status", _status_range, (200, 399))
        return HealthCheckConfig(
            path=path,
            interval=self.value(section, "health_interval", _positive_duration, 10.0),
            timeout=self.value(section, "health_timeout", _positive_duration, 2.0),
            status_low=low,
            status_high=high,
            rise=self.value(section, "rise", lambda t: units.parse_int(t, 1, 1000), 2),
            fall=self.value(section, "fall", lambda t: units.parse_int(t, 1, 1000), 3),
        )

    def read_route(self, section: str, name: str) -> RouteConfig:
        self.unknown_keys(section, _KNOWN_ROUTE_KEYS)
        access = self.read_access(section)
        pool = self.parser.get(section, "pool", fallback="").strip() or None
        if pool is None and not (access and access.deny_all):
            self.problem(
                section, "pool", "missing: a route must name a pool (or deny = all)"
            )
        path_prefix = self.value(section, "path_prefix", _path_prefix, None)
        strip_prefix = self.value(section, "strip_prefix", units.parse_bool, False)
        if strip_prefix and path_prefix is None:
            self.notice(section, "strip_prefix", "has no effect without path_prefix")
        return RouteConfig(
            name=name,
            pool=pool,
            path_prefix=path_prefix,
            host=self.value(section, "host", _host_pattern, None),
            methods=self.value(section, "methods", _methods, None),
            header=self.value(section, "header", _header_condition, None),
            strip_prefix=strip_prefix,
            rate_limit=self.read_rate_limit(section, self.default_limit),
            redirect_https=self.value(
                section, "redirect_https", units.parse_bool, False
            ),
            hsts=self.value(section, "hsts", _hsts, None),
            access=access,
        )

    def read_access(self, section: str) -> AccessRule | None:
        allow = self.value(section, "allow", _networks, None)
        deny_text = self.parser.get(section, "deny", fallback=None)
        if deny_text is not None and deny_text.strip().lower() == "all":
            return AccessRule(allow=tuple(allow or ()), deny_all=True)
        deny = self.value(section, "deny", _networks, None)
        if allow is None and deny is None:
            return None
        return AccessRule(allow=tuple(allow or ()), deny=tuple(deny or ()))

    def read_rate_limit(
        self, section: str, inherited: RateLimitConfig | None
    ) -> RateLimitConfig | None:
        """
        A section's token bucket. A route takes each setting it does not name
        from C{[ratelimit]} (C{inherited}); C{rate_limit = off} turns it off.
        """
        text = self.parser.get(section, "rate_limit", fallback=None)
        if text is not None and text.strip().lower() == "off":
            for key in ("burst", "rate_limit_key"):
                if self.parser.has_option(section, key):
                    self.notice(section, key, "has no effect with rate_limit = off")
            return None
        if text is None:
            if inherited is None:
                for key in ("burst", "rate_limit_key"):
                    if self.parser.has_option(section, key):
                        self.notice(section, key, "has no effect without rate_limit")
                return None
            text = inherited.text
        try:
            count, period = units.parse_rate_as_written(text)
        except ValueError as e:
            self.problem(section, "rate_limit", str(e))
            return None
        rate = count / period
        own_rate = self.parser.has_option(section, "rate_limit")
        default_burst = (
            inherited.burst if inherited and not own_rate else max(1, math.ceil(rate))
        )
        burst = self.value(
            section, "burst", lambda t: units.parse_int(t, 1), default_burst
        )
        key = self.value(
            section,
            "rate_limit_key",
            _request_key_or_global,
            inherited.key if inherited else "client_ip",
        )
        quota, window = _quota(count, period)
        return RateLimitConfig(rate, burst, key, text.strip(), quota, window)

    def check_whole(
        self,
        lb: LBConfig,
        tls: TLSConfig | None,
        pools: list[PoolConfig],
        routes: list[RouteConfig],
    ) -> None:
        """
        Problems that only show when sections are seen together.
        """
        names = {pool.name for pool in pools}
        for route in routes:
            if route.pool is not None and route.access and route.access.deny_all:
                self.notice(
                    f"route:{route.name}", "pool", "never used: the route denies all"
                )
            if route.pool and route.pool not in names:
                self.problem(
                    f"route:{route.name}",
                    "pool",
                    f"names pool {route.pool!r}, "
                    f"which has no [pool:{route.pool}] section",
                )
        used = {route.pool for route in routes}
        for pool in pools:
            if pool.name not in used:
                self.notice(f"pool:{pool.name}", None, "no route sends requests here")
            if pool.sticky_cookie and lb.secret_file is None:
                self.notice(
                    f"pool:{pool.name}",
                    "sticky",
                    "without [lb] secret_file, sticky cookies change when "
                    "l7lb restarts",
                )
        if not routes:
            self.problems.append(
                f"{self.path}: no [route:NAME] section: every request would get 404"
            )
        if lb.tls_listen and tls is None:
            self.problem("lb", "tls_listen", "needs a [tls] section with certificates")
        if lb.workers > 1:
            for key, endpoints in (
                ("listen", lb.listen),
                ("tls_listen", lb.tls_listen),
            ):
                for description in endpoints:
                    if not shareable_endpoint(description):
                        self.problem(
                            "lb",
                            key,
                            f"{description!r}: with workers > 1 every listener must "
                            "be a tcp, tcp6 or unix endpoint (its socket is shared "
                            "by the worker processes)",
                        )
        if tls is not None and not lb.tls_listen:
            self.notice("tls", None, "has no effect without tls_listen in [lb]")
        for route in routes:
            if route.redirect_https and not lb.tls_listen:
                self.problem(
                    f"route:{route.name}",
                    "redirect_https",
                    "needs a tls_listen endpoint in [lb] to redirect to",
                )
            if route.hsts is not None and not lb.tls_listen:
                self.notice(
                    f"route:{route.name}", "hsts", "has no effect without tls_listen"
                )


def _servers(text: str) -> list[ServerConfig]:
    """
    One server per line: a URL and optional C{weight=N}.
    """
    servers: list[ServerConfig] = []
    seen: set[str] = set()
    options: set[str] = set()
    for token in text.split():
        if "=" in token and "://" not in token:
            if not servers:
                raise ValueError(f"{token!r} comes before any server URL")
            key = token.partition("=")[0]
            if key in options:
                raise ValueError(f"{servers[-1].url}: {key} is given twice")
            options.add(key)
            servers[-1] = _server_option(servers[-1], token)
            continue
        match = _SERVER_URL.fullmatch(token)
        if match is None:
            raise ValueError(
                f"{token!r} is not a server URL (expected http://HOST:PORT [weight=N])"
            )
        scheme, written, port = match.group(1), match.group(2), int(match.group(3))
        host = written.strip("[]")
        if not 0 < port < 65536:
            raise ValueError(f"{token!r}: port {port} is out of range")
        if written.startswith("["):
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(
                    f"{token!r}: {host!r} is not an IPv6 address"
                ) from None
        else:
            _check_host_name(token, host)
        server = ServerConfig(f"{scheme}://{written}:{port}", scheme, host, port)
        if server.url in seen:
            raise ValueError(f"{server.url} is listed twice")
        seen.add(server.url)
        servers.append(server)
        options = set()
    if not servers:
        raise ValueError("expected at least one server URL")
    return servers


def _check_host_name(token: str, host: str) -> None:
    """
    An IPv4 address, or a DNS name whose labels are 1-63 letters, digits and
    inner hyphens.
    """
    try:
        ipaddress.IPv4Address(host)
        return
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{token!r}: {host!r} is not a valid host name")
    if all(label.isdigit() for label in labels):
        raise ValueError(f"{token!r}: {host!r} is not a valid IPv4 address")


def _server_option(server: ServerConfig, token: str) -> ServerConfig:
    key, _, value = token.partition("=")
    if key == "weight":
        try:
            weight = units.parse_int(value, 1, 1000)
        except ValueError as e:
            raise ValueError(f"{server.url} weight: {e}") from None
        return ServerConfig(server.url, server.scheme, server.host, server.port, weight)
    raise ValueError(f"{server.url}: unknown server option {key!r} (known: weight)")


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        word = text.strip()
        if word not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {word!r}")
        return word

    return parse


def _size_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        size = units.parse_size(text)
        if size < minimum:
            raise ValueError(f"expected at least {minimum} bytes, got {size}")
        return size

    return parse


def _count(minimum: int, maximum: int) -> Callable[[str], int]:
    return lambda text: units.parse_int(text, minimum, maximum)


def _workers(text: str) -> int:
    """
    A number of worker processes, or C{auto}: one per core this process may
    run on.
    """
    if text.strip() == "auto":
        return cores()
    try:
        return units.parse_int(text, 1, 1024)
    except ValueError:
        raise ValueError(
            f"expected auto or a number from 1 to 1024, got {text.strip()!r}"
        ) from None


def cores() -> int:
    """
    The cores this process may run on (its CPU affinity), as NGINX's
    C{worker_processes auto} counts them.
    """
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def shareable_endpoint(description: str) -> bool:
    """
    Whether the socket of a listen endpoint can be opened once and handed
    to worker processes: a tcp, tcp6 or unix stream socket.
    """
    return description.partition(":")[0] in ("tcp", "tcp6", "unix")


def _percentage(text: str) -> float:
    word = text.strip()
    number = word[:-1] if word.endswith("%") else ""
    if not (number.isascii() and number.isdigit() and int(number) <= 100):
        raise ValueError(f"expected a percentage like 20%, got {word!r}")
    return int(number) / 100


def _positive_duration(text: str) -> float:
    seconds = units.parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"expected a duration above zero, got {text.strip()!r}")
    return seconds


def _networks(text: str) -> list[IPNetwork]:
    networks = []
    for item in units.parse_list(text):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(
                f"{item!r} is not an IP address or CIDR block (like 10.0.0.0/8)"
            ) from None
    return networks


def _alpn(text: str) -> list[str]:
    protocols = units.parse_list(text)
    for protocol in protocols:
        if protocol not in ("h2", "http/1.1"):
            raise ValueError(f"expected h2 and/or http/1.1, got {protocol!r}")
    if not protocols:
        raise ValueError("expected h2 and/or http/1.1")
    return protocols


def _health_path(text: str) -> str:
    path = text.strip()
    if not path.startswith("/") or any(c.isspace() for c in path):
        raise ValueError(f"expected a path starting with /, got {path!r}")
    return path


def _status_range(text: str) -> tuple[int, int]:
    low, sep, high = text.strip().partition("-")
    if not sep:
        high = low
    if not (low.isdigit() and high.isdigit()):
        raise ValueError(f"expected a status range like 200-399, got {text.strip()!r}")
    lo, hi = int(low), int(high)
    if not 100 <= lo <= hi <= 599:
        raise ValueError(f"expected statuses within 100-599, low first, got {lo}-{hi}")
    return lo, hi


def _path_prefix(text: str) -> bytes:
    prefix = text.strip()
    if not prefix.startswith("/") or "?" in prefix or "#" in prefix:
        raise ValueError(f"expected a path starting with /, got {prefix!r}")
    try:
        normal = normalise_path(prefix.encode("utf-8"))
    except BadTarget as e:
        raise ValueError(f"{prefix!r} is not a usable path: {e}") from None
    if len(normal) > 1:
        normal = normal.rstrip(b"/")
    return normal


def _host_pattern(text: str) -> str:
    host = text.strip().lower()
    if not _HOST_NAME.fullmatch(host):
        raise ValueError(
            f"expected a host name like api.example.com or *.example.com, got {host!r}"
        )
    return host


def _methods(text: str) -> frozenset[bytes]:
    methods = units.parse_list(text)
    for method in methods:
        if not _TOKEN.fullmatch(method):
            raise ValueError(f"{method!r} is not an HTTP method name")
    if not methods:
        raise ValueError("expected one or more method names like GET POST")
    return frozenset(m.upper().encode("ascii") for m in methods)


def _header_condition(text: str) -> tuple[bytes, bytes]:
    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not _TOKEN.fullmatch(name) or not value:
        raise ValueError(f"expected 'Header-Name: value', got {text.strip()!r}")
    return name.lower().encode("ascii"), value.encode("utf-8")


def _hsts(text: str) -> bytes:
    """
    C{1y}, optionally followed by C{includeSubDomains} and/or C{preload}: the
    Strict-Transport-Security value.
    """
    words = text.split()
    if not words:
        raise ValueError("expected a duration like 1y, optionally includeSubDomains")
    value = f"max-age={int(units.parse_duration(words[0]))}"
    for word in words[1:]:
        if word.lower() == "includesubdomains":
            value += "; includeSubDomains"
        elif word.lower() == "preload":
            value += "; preload"
        else:
            raise ValueError(f"expected includeSubDomains or preload, got {word!r}")
    return value.encode("ascii")


def _request_key_or_global(text: str) -> str:
    if text.strip() == "global":
        return "global"
    key = text.strip()
    kind, _, name = key.partition(":")
    if key == "client_ip" or (kind == "header" and _TOKEN.fullmatch(name)):
        return _request_key(key)
    raise ValueError(f"expected global, client_ip or header:NAME, got {key!r}")


def _request_key(text: str) -> str:
    """
    What identifies a client for hashing: C{client_ip}, C{header:NAME} or
    C{cookie:NAME}.
    """
    key = text.strip()
    if key == "client_ip":
        return key
    kind, _, name = key.partition(":")
    if kind == "header" and _TOKEN.fullmatch(name):
        return f"header:{name.lower()}"
    if kind == "cookie" and _TOKEN.fullmatch(name):
        return f"cookie:{name}"
    raise ValueError(f"expected client_ip, header:NAME or cookie:NAME, got {key!r}")


def _sticky(text: str) -> str:
    kind, _, name = text.strip().partition(" ")
    name = name.strip()
    if kind != "cookie" or not _TOKEN.fullmatch(name):
        raise ValueError(f"expected 'cookie NAME', got {text.strip()!r}")
    return name


def _quota(count: float, period: float) -> tuple[int, int]:
    """
    A rate as whole units per whole seconds, scaling both up when the count
    is fractional: C{2.5/s} is 5 per 2 seconds.
    """
    for scale in (1, 2, 4, 5, 10, 20, 25, 50, 100, 1000):
        if abs(count * scale - round(count * scale)) < 1e-9:
            return round(count * scale), round(period * scale)
    return max(1, round(count)), round(period)


def _loopback_only(description: str) -> bool:
    """
    Whether an endpoint is reachable from this machine only.
    """
    kind, _, rest = description.partition(":")
    if kind == "unix":
        return True
    for option in re.split(r"(?<!\\):", rest):
        name, _, value = option.partition("=")
        if name == "interface":
            try:
                return ipaddress.ip_address(value.replace("\\:", ":")).is_loopback
            except ValueError:
                return False
    return False


def _check_endpoint(description: str) -> None:
    """
    Refuse what cannot be listened on, with a reason, before start: only
    tcp, tcp6 and unix endpoints, a port in range, an address interface.
    """
    parts = re.split(r"(?<!\\):", description)
    kind, arguments = parts[0], parts[1:]
    positional = [a for a in arguments if "=" not in a]
    options = {
        name: value.replace("\\:", ":")
        for name, value in (a.split("=", 1) for a in arguments if "=" in a)
    }
    expected = "(like tcp:8080:interface=127.0.0.1)"
    if kind not in ("tcp", "tcp6", "unix"):
        raise ValueError(
            f"{description!r}: expected a tcp, tcp6 or unix endpoint {expected}"
        )
    if kind in ("tcp", "tcp6"):
        port = positional[0] if positional else options.get("port", "")
        if not (port.isascii() and port.isdigit() and int(port) <= 65535):
            raise ValueError(f"{description!r}: the port must be 0-65535 {expected}")
        if "interface" in options:
            try:
                address = ipaddress.ip_address(options["interface"])
            except ValueError:
                raise ValueError(
                    f"{description!r}: interface must be an IP address"
                ) from None
            if (address.version == 6) != (kind == "tcp6"):
                raise ValueError(
                    f"{description!r}: an IPv{address.version} interface needs "
                    f"{'tcp6' if address.version == 6 else 'tcp'}"
                )
    backlog = options.get("backlog")
    if backlog is not None and not (
        backlog.isascii() and backlog.isdigit() and int(backlog) > 0
    ):
        raise ValueError(f"{description!r}: backlog must be a positive number")
    try:
        serverFromString(None, description)
    except Exception as e:
        raise ValueError(f"{description!r} is not a usable endpoint: {e}") from None


def describe(config: Config) -> Iterator[str]:
    """
    The summary C{--check} prints: listeners, pools, routes (in the order
    they are tried is the route map's business; here in file order) with
    each one's effective policy, and notices.
    """
    yield f"{config.source}: configuration is valid"
    for endpoint in config.lb.listen:
        yield f"listen      {endpoint} (http)"
    for endpoint in config.lb.tls_listen:
        yield f"listen      {endpoint} (tls)"
    workers = config.lb.workers
    yield (
        f"workers     {workers} processes sharing the listeners"
        if workers > 1
        else "workers     1 (one process)"
    )
    for pool in config.pools:
        details = [pool.balance]
        if pool.balance == "hash":
            details.append(f"by {pool.hash_key}")
        if pool.sticky_cookie:
            details.append(f"sticky cookie {pool.sticky_cookie}")
        if pool.slow_start:
            details.append(f"slow start {units.format_duration(pool.slow_start)}")
        details.append(
            f"health GET {pool.health.path} every "
            f"{units.format_duration(pool.health.interval)}"
            if pool.health
            else "no active health checks"
        )
        yield f"pool        {pool.name}: {', '.join(details)}"
        for server in pool.servers:
            yield f"              {server.url} weight={server.weight}"
    for route in config.routes:
        target = f"pool {route.pool}" if route.pool else "nowhere"
        yield f"route       {route.name}: {describe_route(route)} -> {target}"
        yield f"              {describe_policy(route)}"
    for notice in config.notices:
        yield f"notice      {notice}"


def describe_route(route: RouteConfig) -> str:
    """
    A route's conditions in one short phrase.
    """
    conditions = []
    if route.host:
        conditions.append(f"host {route.host}")
    if route.path_prefix:
        conditions.append(f"path {route.path_prefix.decode()}")
        if route.strip_prefix:
            conditions.append("(prefix stripped)")
    if route.methods:
        conditions.append(
            "methods " + ",".join(sorted(m.decode() for m in route.methods))
        )
    if route.header:
        conditions.append(
            f"header {route.header[0].decode()}: {route.header[1].decode()}"
        )
    return " ".join(conditions) or "every request"


def describe_policy(route: RouteConfig) -> str:
    """
    What a route does to requests besides routing them: its effective rate
    limit, access list, redirect and HSTS.
    """
    limit = route.rate_limit
    parts = [
        f"rate limit {limit.text} burst {limit.burst} by {limit.key}"
        if limit
        else "no rate limit"
    ]
    access = route.access
    if access is not None:
        if access.deny_all:
            parts.append("deny all")
        else:
            if access.allow:
                parts.append("allow " + " ".join(str(n) for n in access.allow))
            if access.deny:
                parts.append("deny " + " ".join(str(n) for n in access.deny))
    if route.redirect_https:
        parts.append("plain HTTP redirected to https")
    if route.hsts:
        parts.append(f"HSTS {route.hsts.decode()}")
    return "; ".join(parts)
