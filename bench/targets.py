"""The things the benchmark measures, and the backends behind them.

A target is a name (``l7lb``, ``nginx-tls``, ``haproxy-h2``...) with a
starter that writes its configuration into the run's directory, starts it
pinned to the proxy cores and says which port to load. ``session`` sets up
a run: a temporary directory, the child processes and the two backends.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import http.client
import json
import os
import platform
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

from backend import BODY
from load import Load
from processes import (
    LOCALHOST,
    Child,
    Children,
    UnavailableError,
    free_port,
    progress,
    wait_for_port,
)
from procfs import cpu_list

BENCH_DIR = Path(__file__).resolve().parent
TLS_SUFFIX = "-tls"
H2_SUFFIX = "-h2"
TARGETS = (
    "direct",
    "l7lb",
    "l7lb-ratelimit",
    "l7lb-sticky",
    "l7lb-sticky-pinned",
    "l7lb-hash",
    "twisted-proxy",
    "nginx",
    "haproxy",
    "l7lb-tls",
    "nginx-tls",
    "haproxy-tls",
    "l7lb-h2",
    "nginx-h2",
    "haproxy-h2",
)

# TLS 1.2 suites for NGINX and HAProxy, the list l7lb uses (Mozilla's
# "intermediate" without DHE: ECDHE with AES-GCM or ChaCha20). TLS 1.3 suites
# are OpenSSL's defaults in all three.
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
TLS_SUMMARY = (
    "TLS 1.2+1.3, ECDSA P-256 self-signed certificate (CN/SAN localhost) made "
    "for this run, TLS 1.2 ciphers ECDHE + AES-GCM/ChaCha20, TLS 1.3 "
    "OpenSSL's defaults, ALPN h2 and http/1.1 offered (wrk sends no ALPN: "
    "HTTP/1.1), plain HTTP to the backends"
)
H2_SUMMARY = (
    "the -tls set-up, h2load offering ALPN h2 only (HTTP/2 to the proxy, "
    "HTTP/1.1 to the backends)"
)
# In the idle-connections run, proxies keep idle client connections this long
# (seconds), so that opening many of them slowly cannot time the first out.
IDLE_KEEPALIVE = 300


def is_tls(target: str) -> bool:
    """Whether a target terminates TLS for HTTP/1.1 (``l7lb-tls``...)."""
    return target.endswith(TLS_SUFFIX)


def is_h2(target: str) -> bool:
    """Whether a target is driven over HTTP/2 by h2load (``l7lb-h2``...)."""
    return target.endswith(H2_SUFFIX)


def is_policy(target: str) -> bool:
    """Whether a target is l7lb with a traffic-policy feature (``l7lb-hash``...)."""
    return target in POLICIES


def proxy_of(target: str) -> str:
    """The proxy a target runs: ``nginx`` for ``nginx-tls`` and ``nginx-h2``."""
    return target.removesuffix(TLS_SUFFIX).removesuffix(H2_SUFFIX)


# The policy rows: l7lb with one traffic-policy feature on, against plain l7lb
# (round robin, no limit, no cookie) in the same run.
STICKY_COOKIE = "SRV"
RATE_LIMIT = 1_000_000  # per second, and the burst: far above any offered load


@dataclasses.dataclass(frozen=True)
class Policy:
    """What a policy row adds to the l7lb configuration, and how to check it.

    ``pool`` and ``route`` are lines appended to ``[pool:bench]`` and
    ``[route:all]``. Every check answer must carry ``header``; with ``pin``,
    wrk sends the sticky cookie a first request was given, and answers to
    requests carrying it must set no new cookie (the pinned path).
    """

    pool: tuple[str, ...] = ()
    route: tuple[str, ...] = ()
    header: str = ""
    pin: bool = False
    note: str = ""

    @property
    def description(self) -> str:
        """The configuration lines and the note, for the row's note line."""
        return "; ".join([*self.pool, *self.route, *([self.note] if self.note else [])])


POLICIES = {
    "l7lb-ratelimit": Policy(
        route=(
            f"rate_limit = {RATE_LIMIT}/s",
            f"burst = {RATE_LIMIT}",
            "rate_limit_key = client_ip",
        ),
        header="RateLimit",
        note="one bucket (every request is from 127.0.0.1), never empty",
    ),
    "l7lb-sticky": Policy(
        pool=(f"sticky = cookie {STICKY_COOKIE}",),
        header="Set-Cookie",
        note="wrk sends no cookie: every response sets one",
    ),
    "l7lb-sticky-pinned": Policy(
        pool=(f"sticky = cookie {STICKY_COOKIE}",),
        pin=True,
        note="wrk sends a valid cookie: every request pinned to one backend",
    ),
    "l7lb-hash": Policy(
        pool=("balance = hash", "hash_key = client_ip"),
        note="one key (127.0.0.1): every request to the same backend",
    ),
}


# --------------------------------------------------------------------------
# Checking what a target answers


def client_tls_context() -> ssl.SSLContext:
    """Like wrk's: any certificate accepted, no ALPN offered (so HTTP/1.1)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Answers(NamedTuple):
    """What the check requests got: the TLS protocol and cipher, and the headers."""

    negotiated: str
    headers: list[http.client.HTTPMessage]


def check_answers(
    port: int,
    exact_body: bool,
    tls: bool = False,
    headers: Mapping[str, str] | None = None,
) -> Answers:
    """A few GETs must come back 200 with the backend's body before measuring.

    Several requests on one connection, so both backends and keep-alive are
    exercised; a target that answers 502 is reported, not benchmarked. Over
    TLS, the protocol and cipher that were negotiated are returned too, with
    each response's headers.
    """
    conn: http.client.HTTPConnection
    if tls:
        conn = http.client.HTTPSConnection(
            LOCALHOST, port, timeout=5, context=client_tls_context()
        )
    else:
        conn = http.client.HTTPConnection(LOCALHOST, port, timeout=5)
    negotiated = ""
    received = []
    try:
        for _ in range(4):
            conn.request("GET", "/", headers=dict(headers or {}))
            response = conn.getresponse()
            body = response.read()
            received.append(response.headers)
            if response.status != 200:
                raise UnavailableError(
                    f"GET / answered {response.status} {body[:80]!r}"
                )
            if (exact_body and body != BODY) or len(body) != len(BODY):
                raise UnavailableError(
                    f"GET / returned an unexpected body {body[:80]!r}"
                )
        if isinstance(conn.sock, ssl.SSLSocket):
            cipher = conn.sock.cipher()
            negotiated = f"{conn.sock.version()} {cipher[0] if cipher else '?'}"
    except (OSError, http.client.HTTPException) as e:
        raise UnavailableError(f"GET / failed: {e!r}") from None
    finally:
        conn.close()
    return Answers(negotiated, received)


def check_alpn_h2(port: int) -> None:
    """A TLS client offering only ``h2`` must get it, or h2load measures nothing."""
    context = client_tls_context()
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((LOCALHOST, port), timeout=5) as raw,
            context.wrap_socket(raw) as tls,
        ):
            chosen = tls.selected_alpn_protocol()
    except OSError as e:
        raise UnavailableError(f"TLS handshake offering h2 failed: {e!r}") from None
    if chosen != "h2":
        raise UnavailableError(f"ALPN h2 offered, {chosen or 'nothing'} chosen")


# --------------------------------------------------------------------------
# Targets


@dataclasses.dataclass
class Backend:
    """The two fast backends every target forwards to.

    ``status_port`` answers a count of the requests the backends have served
    (NGINX's ``stub_status`` format), for rates over an interval of a long
    run.
    """

    kind: str
    description: str
    ports: list[int]
    status_port: int
    child: Child


@dataclasses.dataclass
class Context:
    """What target starters need: settings, the backends and a place for files.

    ``args`` needs ``venv``, ``backend``, ``workers``, ``proxy_cpus`` and
    ``load_cpus``. With ``idle_connections`` set, proxies are configured to
    hold that many idle clients (limits, and idle timeouts of
    ``IDLE_KEEPALIVE`` seconds).
    """

    args: argparse.Namespace
    children: Children
    workdir: Path
    ports: set[int]
    backend: Backend | None = None
    certificate: Path | None = None
    idle_connections: int = 0

    def capacity(self, usual: int) -> int:
        """A proxy's connection limit: ``usual``, or more for the idle clients."""
        return max(usual, self.idle_connections + 1024)


@dataclasses.dataclass
class Running:
    """A target ready for load: the port to hit and the process tree to account."""

    port: int
    child: Child | None
    note: str = ""
    tls: bool = False
    h2: bool = False
    policy: Policy | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def url(self) -> str:
        """What wrk or h2load is pointed at."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{LOCALHOST}:{self.port}/"

    def load(self, connections: int, cpus: str, streams: int = 0) -> Load:
        """How to drive this target: h2load for an h2 target, otherwise wrk."""
        if not self.h2:
            streams = 0
        elif not streams:
            raise ValueError("an h2 target needs h2load's streams per connection")
        return Load(self.url, connections, cpus, streams, self.headers)


# The fallback when the openssl command is missing: the venv's cryptography
# (an l7lb dependency) writes the same kind of key and certificate to stdout.
CERTIFICATE_SCRIPT = """
import datetime, ipaddress, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
now = datetime.datetime.now(datetime.timezone.utc)
san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
certificate = (
    x509.CertificateBuilder().subject_name(name).issuer_name(name)
    .public_key(key.public_key()).serial_number(x509.random_serial_number())
    .not_valid_before(now - datetime.timedelta(hours=1))
    .not_valid_after(now + datetime.timedelta(days=2))
    .add_extension(x509.SubjectAlternativeName(san), critical=False)
    .sign(key, hashes.SHA256())
)
sys.stdout.buffer.write(
    key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    + certificate.public_bytes(serialization.Encoding.PEM)
)
"""


def _certificate_tool(argv: list[str]) -> bytes:
    """Run a certificate-making command; its stdout, or the reason it failed."""
    try:
        done = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UnavailableError(f"making the test certificate failed: {e}") from None
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        raise UnavailableError(
            f"making the test certificate failed: {said[-1] if said else '?'}"
        )
    return done.stdout


def tls_certificate(ctx: Context) -> Path:
    """One PEM file, private key then certificate, made once per run in workdir.

    ECDSA P-256, self-signed, CN and SAN localhost (and 127.0.0.1), valid for
    two days. It lives in the run's temporary directory and goes with it.
    """
    if ctx.certificate is not None:
        return ctx.certificate
    home = ctx.workdir / "tls"
    home.mkdir(mode=0o700, exist_ok=True)
    openssl = shutil.which("openssl")
    python = Path(ctx.args.venv) / "bin" / "python"
    if openssl is not None:
        key, cert = home / "key.pem", home / "cert.pem"
        argv = [openssl, "req", "-x509", "-newkey", "ec"]
        argv += ["-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        argv += ["-keyout", str(key), "-out", str(cert), "-days", "2"]
        argv += ["-subj", "/CN=localhost"]
        argv += ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
        _certificate_tool(argv)
        pem = key.read_bytes() + cert.read_bytes()
    elif python.exists():
        pem = _certificate_tool([str(python), "-c", CERTIFICATE_SCRIPT])
    else:
        raise UnavailableError(
            "no openssl command and no venv python to make a test certificate"
        )
    combined = home / "combined.pem"
    fd = os.open(combined, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    ctx.certificate = combined
    return combined


def nginx_config(
    workdir: Path, workers: int, http_block: str, connections: int = 8192
) -> str:
    """A self-contained NGINX configuration: foreground, no logs, files in workdir."""
    temp = "\n".join(
        f"    {kind}_temp_path {workdir}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
worker_processes {workers};
pid {workdir}/nginx.pid;
error_log stderr error;
events {{
    worker_connections {connections};
}}
http {{
    access_log off;
    keepalive_requests 1000000;
{temp}
{http_block}
}}
"""


def start_nginx(
    ctx: Context,
    name: str,
    workers: int,
    http_block: str,
    cpus: str,
    connections: int = 8192,
) -> Child:
    """Run NGINX on a generated configuration in a directory of its own."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(nginx, os.X_OK):
        raise UnavailableError("nginx is not installed")
    home = ctx.workdir / name
    home.mkdir()
    conf = home / "nginx.conf"
    conf.write_text(nginx_config(home, workers, http_block, connections))
    argv = [nginx, "-p", str(home), "-e", "stderr", "-c", str(conf)]
    return ctx.children.start(name, argv, cpus)


def start_nginx_backend(ctx: Context) -> Backend:
    """NGINX answering a fixed body on two ports: the fastest server available here.

    A third port serves ``stub_status``, the count of requests served.
    """
    ports = [free_port(ctx.ports), free_port(ctx.ports)]
    status_port = free_port(ctx.ports)
    listens = "\n".join(f"        listen {LOCALHOST}:{p} backlog=4096;" for p in ports)
    body = BODY.decode().replace("\\", "\\\\").replace('"', '\\"')
    server = f"""    server {{
{listens}
        location / {{
            default_type text/plain;
            return 200 "{body}";
        }}
    }}
    server {{
        listen {LOCALHOST}:{status_port};
        location / {{
            stub_status;
        }}
    }}"""
    child = start_nginx(ctx, "nginx-backend", 1, server, ctx.args.load_cpus)
    description = (
        f"{tool_version('nginx')}, one worker on CPU {ctx.args.load_cpus}, "
        f"one process listening on {LOCALHOST}:{ports[0]} and :{ports[1]}"
    )
    return Backend("nginx", description, ports, status_port, child)


def start_python_backend(ctx: Context) -> Backend:
    """The stdlib asyncio backend, for machines without NGINX."""
    ports = [free_port(ctx.ports), free_port(ctx.ports)]
    status_port = free_port(ctx.ports)
    argv = [sys.executable, str(BENCH_DIR / "backend.py")]
    for port in ports:
        argv += ["--port", str(port)]
    argv += ["--status-port", str(status_port)]
    child = ctx.children.start("python-backend", argv, ctx.args.load_cpus)
    description = (
        f"bench/backend.py (asyncio, Python {platform.python_version()}) on CPU "
        f"{ctx.args.load_cpus}, one process listening on {LOCALHOST}:{ports[0]} "
        f"and :{ports[1]}"
    )
    return Backend("python", description, ports, status_port, child)


def start_backend(ctx: Context) -> Backend:
    """Start the chosen backend; with ``auto``, NGINX first and Python as fallback."""
    choice = ctx.args.backend
    starters: list[Callable[[Context], Backend]] = []
    if choice in ("auto", "nginx"):
        starters.append(start_nginx_backend)
    if choice in ("auto", "python"):
        starters.append(start_python_backend)
    failures = []
    for starter in starters:
        backend: Backend | None = None
        try:
            backend = starter(ctx)
            for port in backend.ports:
                wait_for_port(backend.child, port)
                check_answers(port, exact_body=True)
            wait_for_port(backend.child, backend.status_port)
            backend_requests(backend)
            return backend
        except UnavailableError as e:
            failures.append(str(e))
            progress(f"backend not usable: {e}")
            if backend is not None:
                ctx.children.stop(backend.child)
    raise SystemExit("no backend could be started: " + "; ".join(failures))


def backend_requests(backend: Backend) -> int:
    """How many requests the backends have answered so far (both ports).

    Read from the status port, in NGINX's ``stub_status`` format, which
    bench/backend.py imitates: the third number under
    ``server accepts handled requests``. The reading itself counts as one.
    """
    conn = http.client.HTTPConnection(LOCALHOST, backend.status_port, timeout=5)
    try:
        conn.request("GET", "/")
        text = conn.getresponse().read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as e:
        raise UnavailableError(f"backend status: {e!r}") from None
    finally:
        conn.close()
    match = re.search(r"accepts handled requests\s+\d+\s+\d+\s+(\d+)", text)
    if match is None:
        raise UnavailableError(f"backend status: no request count in {text[:80]!r}")
    return int(match.group(1))


def start_direct(ctx: Context) -> Running:
    """No proxy: wrk talks to the first backend."""
    assert ctx.backend is not None
    return Running(ctx.backend.ports[0], None)


def backend_urls(ctx: Context) -> list[str]:
    """The backends as l7lb's config spells them."""
    assert ctx.backend is not None
    return [f"http://{LOCALHOST}:{port}" for port in ctx.backend.ports]


def l7lb_config(
    ctx: Context,
    port: int,
    certificate: Path | None = None,
    policy: Policy | None = None,
) -> str:
    """The l7lb configuration: round robin over the two backends, no access log.

    With a certificate, the one listener terminates TLS (and nothing is
    served in plain HTTP). A policy adds its lines to the pool and the route
    (its ``balance`` replaces round robin); a sticky pool gets a
    ``secret_file`` made for the run, so that its cookies do not depend on
    which process made them.
    """
    servers = "".join(f"\n    {url}" for url in backend_urls(ctx))
    pool_lines = list(policy.pool) if policy else []
    route_lines = list(policy.route) if policy else []
    if not any(line.startswith("balance ") for line in pool_lines):
        pool_lines.insert(0, "balance = round_robin")
    secret = ""
    if any(line.startswith("sticky ") for line in pool_lines):
        path = ctx.workdir / "sticky-secret"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(os.urandom(32).hex() + "\n")
        secret = f"secret_file = {path}\n"
    workers = f"workers = {ctx.args.workers}\n" if ctx.args.workers != 1 else ""
    if ctx.idle_connections:
        workers += f"keepalive_timeout = {IDLE_KEEPALIVE}s\n"
    key = "listen" if certificate is None else "tls_listen"
    tls = (
        ""
        if certificate is None
        else f"""
[tls]
certificates = {certificate}
min_version = TLSv1.2
alpn = h2 http/1.1
"""
    )
    pool = "".join(f"{line}\n" for line in pool_lines)
    route = "".join(f"{line}\n" for line in route_lines)
    return f"""[lb]
{key} = tcp:{port}:interface={LOCALHOST}
access_log = off
{workers}{secret}{tls}
[pool:bench]
servers ={servers}
{pool}
[route:all]
pool = bench
{route}"""


def check_l7lb_plugin(twistd: Path) -> None:
    """Tell "not installed" apart from "installed but broken" before starting it."""
    if not twistd.exists():
        raise UnavailableError(f"{twistd} not found (create the venv, pip install .)")
    try:
        done = subprocess.run(
            [str(twistd), "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UnavailableError(f"`twistd --help` failed: {e}") from None
    if not re.search(r"^\s+l7lb\s", done.stdout, re.MULTILINE):
        raise UnavailableError(
            f"`{twistd} --help` does not list l7lb (pip install . into that venv)"
        )


def start_l7lb(ctx: Context, tls: bool = False, name: str = "l7lb") -> Running:
    """``twistd -n l7lb`` on a generated config, pinned to the proxy cores.

    ``name`` is the target: ``l7lb``, ``l7lb-tls``, ``l7lb-h2`` or one of
    the policy rows. ``l7lb-h2`` is ``l7lb-tls``, loaded by h2load.
    """
    h2 = is_h2(name)
    tls = tls or h2
    twistd = Path(ctx.args.venv) / "bin" / "twistd"
    check_l7lb_plugin(twistd)
    certificate = tls_certificate(ctx) if tls else None
    policy = POLICIES.get(name)
    port = free_port(ctx.ports)
    config = ctx.workdir / f"{name}.ini"
    config.write_text(l7lb_config(ctx, port, certificate, policy))
    argv = [str(twistd), "-n", "--pidfile=", "l7lb", "--config", str(config)]
    child = ctx.children.start(name, argv, ctx.args.proxy_cpus)
    note = policy.description if policy else ""
    return Running(port, child, note, tls=tls, h2=h2, policy=policy)


def start_twisted_proxy(ctx: Context) -> Running:
    """bench/twisted_reverse_proxy.py with the venv's Python."""
    if ctx.args.workers != 1:
        raise UnavailableError("runs as one process only; use --workers 1")
    python = Path(ctx.args.venv) / "bin" / "python"
    if not python.exists():
        raise UnavailableError(f"{python} not found")
    port = free_port(ctx.ports)
    argv = [str(python), str(BENCH_DIR / "twisted_reverse_proxy.py")]
    argv += ["--port", str(port)]
    assert ctx.backend is not None
    for backend_port in ctx.backend.ports:
        argv += ["--backend", f"{LOCALHOST}:{backend_port}"]
    child = ctx.children.start("twisted-proxy", argv, ctx.args.proxy_cpus)
    return Running(port, child, "new backend connection per request, HTTP/1.0")


def start_nginx_proxy(ctx: Context, tls: bool = False, h2: bool = False) -> Running:
    """NGINX as a round-robin reverse proxy with upstream keep-alive.

    Over TLS it offers HTTP/2 by ALPN (``listen ... ssl http2``); ``h2``
    is the same server, loaded by h2load.
    """
    assert ctx.backend is not None
    tls = tls or h2
    tls_lines = ""
    if tls:
        certificate = tls_certificate(ctx)
        tls_lines = f"""
        ssl_certificate {certificate};
        ssl_certificate_key {certificate};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {TLS12_CIPHERS};
        ssl_prefer_server_ciphers on;"""
    if ctx.idle_connections:
        tls_lines += f"""
        keepalive_timeout {IDLE_KEEPALIVE}s;"""
    port = free_port(ctx.ports)
    servers = "\n".join(f"        server {LOCALHOST}:{p};" for p in ctx.backend.ports)
    http_block = f"""    upstream bench {{
{servers}
        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen {LOCALHOST}:{port}{" ssl http2" if tls else ""} backlog=4096;{tls_lines}
        location / {{
            proxy_pass http://bench;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""
    name = "nginx-h2-proxy" if h2 else "nginx-tls-proxy" if tls else "nginx-proxy"
    child = start_nginx(
        ctx,
        name,
        ctx.args.workers,
        http_block,
        ctx.args.proxy_cpus,
        ctx.capacity(8192),
    )
    note = f"{ctx.args.workers} worker(s), keepalive 256"
    return Running(port, child, note, tls, h2)


def start_haproxy(ctx: Context, tls: bool = False, h2: bool = False) -> Running:
    """HAProxy in HTTP mode, round robin, idle server connections always reused.

    Over TLS it offers HTTP/2 by ALPN; ``h2`` is the same, loaded by h2load.
    """
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.access(haproxy, os.X_OK):
        raise UnavailableError("haproxy is not installed")
    assert ctx.backend is not None
    tls = tls or h2
    client_timeout = f"{IDLE_KEEPALIVE}s" if ctx.idle_connections else "30s"
    tls_global = bind_tls = ""
    if tls:
        certificate = tls_certificate(ctx)
        tls_global = f"""
    ssl-default-bind-ciphers {TLS12_CIPHERS}
    ssl-default-bind-options ssl-min-ver TLSv1.2"""
        bind_tls = f" ssl crt {certificate} alpn h2,http/1.1"
    port = free_port(ctx.ports)
    servers = "\n".join(
        f"    server b{i} {LOCALHOST}:{p}"
        for i, p in enumerate(ctx.backend.ports, start=1)
    )
    config = f"""global
    nbthread {ctx.args.workers}
    maxconn {ctx.capacity(4096)}{tls_global}

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client {client_timeout}
    timeout server 30s
    timeout http-keep-alive {client_timeout}

frontend bench
    bind {LOCALHOST}:{port}{bind_tls}
    default_backend bench

backend bench
    balance roundrobin
{servers}
"""
    name = "haproxy-h2" if h2 else "haproxy-tls" if tls else "haproxy"
    path = ctx.workdir / f"{name}.cfg"
    path.write_text(config)
    argv = [haproxy, "-db", "-f", str(path)]
    child = ctx.children.start(name, argv, ctx.args.proxy_cpus)
    note = f"nbthread {ctx.args.workers}, http-reuse always"
    return Running(port, child, note, tls, h2)


STARTERS: dict[str, Callable[[Context], Running]] = {
    "direct": start_direct,
    "l7lb": start_l7lb,
    **{name: functools.partial(start_l7lb, name=name) for name in POLICIES},
    "twisted-proxy": start_twisted_proxy,
    "nginx": start_nginx_proxy,
    "haproxy": start_haproxy,
    "l7lb-tls": functools.partial(start_l7lb, tls=True, name="l7lb-tls"),
    "nginx-tls": functools.partial(start_nginx_proxy, tls=True),
    "haproxy-tls": functools.partial(start_haproxy, tls=True),
    "l7lb-h2": functools.partial(start_l7lb, name="l7lb-h2"),
    "nginx-h2": functools.partial(start_nginx_proxy, h2=True),
    "haproxy-h2": functools.partial(start_haproxy, h2=True),
}


@contextlib.contextmanager
def running(ctx: Context, target: str) -> Iterator[Running]:
    """Start a target, wait until it proxies correctly, and always stop it."""
    started = STARTERS[target](ctx)
    try:
        if started.child is not None:
            wait_for_port(started.child, started.port)
        answers = check_answers(started.port, exact_body=False, tls=started.tls)
        if answers.negotiated:
            started.note = f"{started.note}, {answers.negotiated}".lstrip(", ")
        if started.policy is not None:
            check_policy(started, started.policy, answers)
        if started.h2:
            check_alpn_h2(started.port)
        yield started
    finally:
        if started.child is not None:
            ctx.children.stop(started.child)


def check_policy(run: Running, policy: Policy, answers: Answers) -> None:
    """Make sure the policy is really in force before measuring it.

    Each answer must carry the policy's header (``RateLimit``, ``Set-Cookie``);
    for a pinned row, the cookie from the first answer goes into
    ``run.headers`` for wrk, and answers to requests carrying it must set
    none (a refused token would quietly measure the unpinned path).
    """
    if policy.header:
        for headers in answers.headers:
            if headers.get(policy.header) is None:
                raise UnavailableError(f"an answer without a {policy.header} header")
    if not policy.pin:
        return
    cookie = sticky_cookie(answers.headers[0])
    again = check_answers(run.port, exact_body=False, tls=run.tls, headers=cookie)
    for headers in again.headers:
        if headers.get("Set-Cookie") is not None:
            raise UnavailableError(
                f"{cookie['Cookie']} was not honoured: got {headers['Set-Cookie']!r}"
            )
    run.headers.update(cookie)


def sticky_cookie(headers: http.client.HTTPMessage) -> dict[str, str]:
    """The ``Cookie`` header that sends back the sticky cookie of a response."""
    for value in headers.get_all("Set-Cookie") or []:
        pair = value.split(";", 1)[0].strip()
        name, _, token = pair.partition("=")
        if name == STICKY_COOKIE and token:
            return {"Cookie": pair}
    raise UnavailableError(f"no {STICKY_COOKIE} cookie was set")


# --------------------------------------------------------------------------
# A run: its directory, children and backends


@contextlib.contextmanager
def session(args: argparse.Namespace, idle_connections: int = 0) -> Iterator[Context]:
    """A temporary directory with the backends running; everything stops after."""
    with tempfile.TemporaryDirectory(prefix="l7lb-bench-") as tmp:
        children = Children(Path(tmp))
        try:
            ctx = Context(args, children, Path(tmp), set())
            ctx.idle_connections = idle_connections
            ctx.backend = start_backend(ctx)
            progress(f"backend: {ctx.backend.description}")
            yield ctx
        finally:
            children.stop_all()


def default_cpus(workers: int, available: set[int]) -> tuple[str, str]:
    """Where the proxy and the load go unless told: ``(proxy, load)`` CPU lists.

    The proxy gets one core per worker, from the lowest; wrk (or h2load) and
    the backends share the next one. When there are not cores enough for
    both, the proxy gets all of them and the load the highest, which it then
    shares with proxy workers: on two cores, one worker means proxy 0 and
    load 1, two or more mean proxy 0,1 and load 1.
    """
    cpus = sorted(available)
    if workers < len(cpus):
        return cpu_list(cpus[:workers]), cpu_list(cpus[workers : workers + 1])
    return cpu_list(cpus), cpu_list(cpus[-1:])


# --------------------------------------------------------------------------
# Versions, for the record


def tool_version(tool: str) -> str:
    """One line naming the version of an external tool, for the record."""
    commands = {
        "nginx": ["nginx", "-v"],
        "haproxy": ["haproxy", "-v"],
        "wrk": ["wrk", "--version"],
        "h2load": ["h2load", "--version"],
        "openssl": ["openssl", "version"],
    }
    try:
        done = subprocess.run(
            commands[tool], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return f"{tool} (not found)"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].replace("nginx version: ", "") if text else tool


# Run by the venv's Python with our environment, so that a PYTHONPATH pointing
# at a working tree shows up as the l7lb that twistd will import.
VERSIONS_SCRIPT = """
import importlib.metadata as m, importlib.util, json, os, platform
def v(n):
    try: return m.version(n)
    except m.PackageNotFoundError: return "not installed"
spec = importlib.util.find_spec("l7lb")
where = os.path.dirname(spec.origin) if spec and spec.origin else "not found"
print(json.dumps({"python": platform.python_version(), "twisted": v("twisted"),
                  "l7lb": v("l7lb"), "l7lb_code": where}))
"""


def venv_versions(venv: str) -> dict[str, str]:
    """Python, Twisted and l7lb versions in the venv the Python targets run from.

    ``l7lb_code`` is the directory l7lb is imported from: the venv's copy,
    or a working tree when PYTHONPATH names one.
    """
    python = Path(venv) / "bin" / "python"
    try:
        done = subprocess.run(
            [str(python), "-c", VERSIONS_SCRIPT],
            cwd="/",  # as for twistd, which runs elsewhere: not this directory's l7lb
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        found: dict[str, str] = json.loads(done.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return {"venv": venv, "python": "unavailable"}
    return {"venv": venv, **found}
