"""Benchmark l7lb against a direct backend, Twisted's stock proxy, NGINX and HAProxy.

One run starts two fast local backends, then each target in turn, and drives
each with ``wrk -t1`` at every requested connection count. Proxies run pinned
to one core, wrk and the backends to another, so that the numbers say how
much one core of proxy buys. The ``-tls`` targets are l7lb, NGINX and HAProxy
terminating TLS (a self-signed certificate made for the run) in front of the
same plain-HTTP backends. The policy targets (``l7lb-ratelimit``,
``l7lb-sticky``, ``l7lb-sticky-pinned``, ``l7lb-hash``) are l7lb with one
traffic-policy feature switched on, compared with the plain ``l7lb`` row.
Standard library only: it runs with the system ``python3`` and uses the venv
only to start l7lb and the Twisted baseline.

    python3 bench/run.py [--duration 10] [--connections 50,200]
                         [--only l7lb,direct,...] [--no-tls] [--no-policy]
                         [--workers N]

See bench/README.md for how to read the tables.
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
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

from backend import BODY

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
WRK_SCRIPT = BENCH_DIR / "wrk_report.lua"
TLS_SUFFIX = "-tls"
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
)
LOCALHOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
NEAR_DIRECT = 0.85
LOAD_SATURATED = 90.0
OTHER_LOAD_WARNING = 10.0
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


class UnavailableError(Exception):
    """A target cannot be measured; the message becomes its row in the table."""


# --------------------------------------------------------------------------
# Child processes


@dataclasses.dataclass
class Child:
    """A started process and the file that holds its stdout and stderr."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def last_line(self) -> str:
        """The last thing the process said: usually why it failed."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        lines = [line.strip() for line in lines if line.strip()]
        return lines[-1] if lines else ""


class Children:
    """Every process the harness starts, so that all of them get stopped.

    Each child leads its own process group: the terminal's Ctrl-C does not
    reach it, and stopping the group also stops what it forked (NGINX
    workers, for example).
    """

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._running: list[Child] = []
        self._counter = 0

    def start(self, name: str, argv: Sequence[str], cpus: str | None) -> Child:
        """Start ``argv`` pinned to ``cpus`` (a taskset list) with output to a file."""
        self._counter += 1
        log = self._workdir / f"{self._counter:02d}-{name}.log"
        if cpus is not None:
            argv = ["taskset", "-c", cpus, *argv]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self._workdir,
                start_new_session=True,
            )
        child = Child(name, proc, log)
        self._running.append(child)
        return child

    def stop(self, child: Child) -> None:
        """SIGTERM the child's group, then SIGKILL whatever is left after a grace.

        The leader is reaped only at the end: until then its pid, and so the
        group id, cannot be reused by an unrelated process.
        """
        if child.proc.returncode is None:
            _signal_group(child.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while exit_status(child.proc) is None and time.monotonic() < deadline:
                time.sleep(0.02)
            _signal_group(child.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(STOP_TIMEOUT)
        if child in self._running:
            self._running.remove(child)

    def stop_all(self) -> None:
        """Stop everything still running, newest first."""
        for child in reversed(list(self._running)):
            self.stop(child)


def exit_status(proc: subprocess.Popen[bytes]) -> str | None:
    """How the process ended, or ``None`` if it runs; never reaps it."""
    if proc.returncode is not None:
        status = proc.returncode
    else:
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return "exited"
        if info is None:
            return None
        status = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
    if status >= 0:
        return f"exited with status {status}"
    return f"was killed by {signal.Signals(-status).name}"


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def free_port(taken: set[int]) -> int:
    """An unused 127.0.0.1 port, never one handed out earlier in this run."""
    while True:
        with socket.socket() as sock:
            sock.bind((LOCALHOST, 0))
            port: int = sock.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def wait_for_port(child: Child, port: int, timeout: float = START_TIMEOUT) -> None:
    """Poll until ``port`` accepts connections, the child dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        status = exit_status(child.proc)
        if status is not None:
            said = child.last_line() or "no output"
            raise UnavailableError(f"{child.name} {status}: {said}")
        try:
            with socket.create_connection((LOCALHOST, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            said = child.last_line() or "no output"
            raise UnavailableError(
                f"{child.name} did not open port {port} in {timeout:.0f}s: {said}"
            )
        time.sleep(0.05)


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


# --------------------------------------------------------------------------
# /proc accounting


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, for masters that fork workers."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_ticks(root: int) -> dict[int, int]:
    """utime + stime of every process in the tree, in clock ticks."""
    ticks = {}
    for pid in process_tree(root):
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        ticks[pid] = int(fields[11]) + int(fields[12])
    return ticks


def cpu_seconds_between(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU time a process tree used between two snapshots (new workers count whole)."""
    used = sum(ticks - before.get(pid, 0) for pid, ticks in after.items())
    return used / CLOCK_TICKS


def peak_rss_mib(root: int) -> float:
    """Sum of VmHWM over the process tree."""
    total_kib = 0
    for pid in process_tree(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        if match:
            total_kib += int(match.group(1))
    return total_kib / 1024


class Jiffies(NamedTuple):
    """One CPU's /proc/stat counters, reduced to what the report needs.

    ``tasks`` (user, nice, system) is the part that processes are charged
    for; ``busy`` also holds interrupt and softirq time, which loopback
    networking puts on whichever core happens to be running.
    """

    busy: int
    tasks: int
    total: int


def core_times() -> dict[int, Jiffies]:
    """Counters per CPU from /proc/stat."""
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        user, nice, system, idle, iowait, *rest = (int(v) for v in values[:8])
        total = user + nice + system + idle + iowait + sum(rest)
        times[int(name[3:])] = Jiffies(
            total - idle - iowait, user + nice + system, total
        )
    return times


def core_percent(
    before: dict[int, Jiffies],
    after: dict[int, Jiffies],
    cpus: Sequence[int],
    tasks_only: bool = False,
) -> float:
    """How busy a set of cores was between two snapshots, in percent."""
    if tasks_only:
        used = sum(after[c].tasks - before[c].tasks for c in cpus)
    else:
        used = sum(after[c].busy - before[c].busy for c in cpus)
    total = sum(after[c].total - before[c].total for c in cpus)
    return 100.0 * used / total if total else 0.0


def parse_cpu_list(text: str) -> list[int]:
    """A taskset-style list such as ``0`` or ``0,2-3``."""
    cpus: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.extend(range(int(low), int(high or low) + 1))
    return cpus


# --------------------------------------------------------------------------
# wrk


@dataclasses.dataclass
class WrkResult:
    """What one wrk run reported through wrk_report.lua."""

    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]
    cpu_s: float

    @property
    def rps(self) -> float:
        """Completed requests per second of measured time."""
        return self.requests / self.seconds if self.seconds else 0.0


def run_wrk(
    children: Children,
    url: str,
    connections: int,
    seconds: float,
    cpus: str,
    headers: Mapping[str, str] | None = None,
) -> WrkResult:
    """Run wrk to completion and read the JSON line its done() hook prints."""
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--latency",
        "-s",
        str(WRK_SCRIPT),
    ]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = children.start(f"wrk-c{connections}", argv, cpus)
    try:
        status = child.proc.wait(seconds + 60)
    except subprocess.TimeoutExpired:
        raise UnavailableError("wrk did not finish in time") from None
    finally:
        children.stop(child)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = child.log.read_text(errors="replace")
    match = re.search(r"^BENCH_JSON (.*)$", output, re.MULTILINE)
    if status != 0 or not match:
        raise UnavailableError(f"wrk failed (status {status}): {child.last_line()}")
    raw = json.loads(match.group(1))
    return WrkResult(
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        errors={
            key: raw[key] for key in ("connect", "read", "write", "timeout", "status")
        },
        # wrk is the only child reaped in this window, so the difference is its own.
        cpu_s=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    )


# --------------------------------------------------------------------------
# Targets


@dataclasses.dataclass
class Backend:
    """The two fast backends every target forwards to."""

    kind: str
    description: str
    ports: list[int]
    child: Child


@dataclasses.dataclass
class Context:
    """What target starters need: settings, the backends and a place for files."""

    args: argparse.Namespace
    children: Children
    workdir: Path
    ports: set[int]
    backend: Backend | None = None
    certificate: Path | None = None


@dataclasses.dataclass
class Running:
    """A target ready for load: the port to hit and the process tree to account."""

    port: int
    child: Child | None
    note: str = ""
    tls: bool = False
    policy: Policy | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def url(self) -> str:
        """What wrk is pointed at."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{LOCALHOST}:{self.port}/"


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


def nginx_config(workdir: Path, workers: int, http_block: str) -> str:
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
    worker_connections 8192;
}}
http {{
    access_log off;
    keepalive_requests 1000000;
{temp}
{http_block}
}}
"""


def start_nginx(
    ctx: Context, name: str, workers: int, http_block: str, cpus: str
) -> Child:
    """Run NGINX on a generated configuration in a directory of its own."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(nginx, os.X_OK):
        raise UnavailableError("nginx is not installed")
    home = ctx.workdir / name
    home.mkdir()
    conf = home / "nginx.conf"
    conf.write_text(nginx_config(home, workers, http_block))
    argv = [nginx, "-p", str(home), "-e", "stderr", "-c", str(conf)]
    return ctx.children.start(name, argv, cpus)


def start_nginx_backend(ctx: Context) -> Backend:
    """NGINX answering a fixed body on two ports: the fastest server available here."""
    ports = [free_port(ctx.ports), free_port(ctx.ports)]
    listens = "\n".join(f"        listen {LOCALHOST}:{p} backlog=4096;" for p in ports)
    body = BODY.decode().replace("\\", "\\\\").replace('"', '\\"')
    server = f"""    server {{
{listens}
        location / {{
            default_type text/plain;
            return 200 "{body}";
        }}
    }}"""
    child = start_nginx(ctx, "nginx-backend", 1, server, ctx.args.load_cpus)
    description = (
        f"{tool_version('nginx')}, one worker on CPU {ctx.args.load_cpus}, "
        f"one process listening on {LOCALHOST}:{ports[0]} and :{ports[1]}"
    )
    return Backend("nginx", description, ports, child)


def start_python_backend(ctx: Context) -> Backend:
    """The stdlib asyncio backend, for machines without NGINX."""
    ports = [free_port(ctx.ports), free_port(ctx.ports)]
    argv = [sys.executable, str(BENCH_DIR / "backend.py")]
    for port in ports:
        argv += ["--port", str(port)]
    child = ctx.children.start("python-backend", argv, ctx.args.load_cpus)
    description = (
        f"bench/backend.py (asyncio, Python {platform.python_version()}) on CPU "
        f"{ctx.args.load_cpus}, one process listening on {LOCALHOST}:{ports[0]} "
        f"and :{ports[1]}"
    )
    return Backend("python", description, ports, child)


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
            return backend
        except UnavailableError as e:
            failures.append(str(e))
            progress(f"backend not usable: {e}")
            if backend is not None:
                ctx.children.stop(backend.child)
    raise SystemExit("no backend could be started: " + "; ".join(failures))


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
    """``twistd -n l7lb`` on a generated config, pinned to the proxy core.

    ``name`` is the target: ``l7lb``, ``l7lb-tls`` or one of the policy rows.
    """
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
    return Running(port, child, note, tls=tls, policy=policy)


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


def start_nginx_proxy(ctx: Context, tls: bool = False) -> Running:
    """NGINX as a round-robin reverse proxy with upstream keep-alive."""
    assert ctx.backend is not None
    tls_lines = ""
    if tls:
        certificate = tls_certificate(ctx)
        tls_lines = f"""
        ssl_certificate {certificate};
        ssl_certificate_key {certificate};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {TLS12_CIPHERS};
        ssl_prefer_server_ciphers on;"""
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
    name = "nginx-tls-proxy" if tls else "nginx-proxy"
    child = start_nginx(ctx, name, ctx.args.workers, http_block, ctx.args.proxy_cpus)
    return Running(port, child, f"{ctx.args.workers} worker(s), keepalive 256", tls)


def start_haproxy(ctx: Context, tls: bool = False) -> Running:
    """HAProxy in HTTP mode, round robin, idle server connections always reused."""
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.access(haproxy, os.X_OK):
        raise UnavailableError("haproxy is not installed")
    assert ctx.backend is not None
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
    maxconn 4096{tls_global}

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s

frontend bench
    bind {LOCALHOST}:{port}{bind_tls}
    default_backend bench

backend bench
    balance roundrobin
{servers}
"""
    name = "haproxy-tls" if tls else "haproxy"
    path = ctx.workdir / f"{name}.cfg"
    path.write_text(config)
    argv = [haproxy, "-db", "-f", str(path)]
    child = ctx.children.start(name, argv, ctx.args.proxy_cpus)
    note = f"nbthread {ctx.args.workers}, http-reuse always"
    return Running(port, child, note, tls)


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
# Measuring


@dataclasses.dataclass
class Row:
    """One target at one connection count; ``reason`` set when not measured."""

    target: str
    connections: int
    reason: str = ""
    note: str = ""
    rps: float | None = None
    requests: int | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    proxy_cpu_s_per_1k: float | None = None
    proxy_peak_rss_mib: float | None = None
    backend_cpu_s_per_1k: float | None = None
    wrk_cpu_s_per_1k: float | None = None
    proxy_cores_busy_pct: float | None = None
    load_cores_busy_pct: float | None = None
    proxy_cores_other_pct: float | None = None
    load_cores_other_pct: float | None = None
    l7lb_rps_ratio: float | None = None
    l7lb_cpu_ratio: float | None = None
    tls_cpu_ratio: float | None = None
    policy_rps_ratio: float | None = None
    policy_cpu_ratio: float | None = None

    @property
    def error_total(self) -> int:
        """All errors of the row, whatever their kind."""
        return sum(self.errors.values())


@dataclasses.dataclass
class Usage:
    """CPU counters taken just before and just after a measured wrk run."""

    proxy: dict[int, int]
    backend: dict[int, int]
    cores: dict[int, Jiffies]
    clock: float

    @classmethod
    def now(cls, proxy_pid: int | None, backend_pid: int) -> Usage:
        """Snapshot the proxy tree, the backend tree and the cores."""
        return cls(
            cpu_ticks(proxy_pid) if proxy_pid else {},
            cpu_ticks(backend_pid),
            core_times(),
            time.monotonic(),
        )


def measure(ctx: Context, target: str, run: Running, connections: int) -> Row:
    """Warm up, then one measured wrk run with CPU accounting around it."""
    args = ctx.args
    assert ctx.backend is not None
    progress(f"{target} c={connections}: warm-up {args.warmup:g}s")
    run_wrk(
        ctx.children, run.url, connections, args.warmup, args.load_cpus, run.headers
    )
    progress(f"{target} c={connections}: measuring {args.duration:g}s")
    proxy_pid = run.child.proc.pid if run.child else None
    backend_pid = ctx.backend.child.proc.pid
    before = Usage.now(proxy_pid, backend_pid)
    wrk = run_wrk(
        ctx.children, run.url, connections, args.duration, args.load_cpus, run.headers
    )
    after = Usage.now(proxy_pid, backend_pid)
    row = row_from(target, connections, run, wrk, before, after, args)
    if proxy_pid:
        row.proxy_peak_rss_mib = peak_rss_mib(proxy_pid)
    progress(
        f"{target} c={connections}: {wrk.rps:,.0f} req/s, p99 {wrk.p99_ms:.2f} ms, "
        f"{row.error_total} errors"
    )
    return row


def row_from(
    target: str,
    connections: int,
    run: Running,
    wrk: WrkResult,
    before: Usage,
    after: Usage,
    args: argparse.Namespace,
) -> Row:
    """Turn wrk's totals and the CPU counters into per-request figures.

    The ``*_other_pct`` fields are the share of each core set used by
    processes that are not ours: other work on the machine, which makes a
    row less trustworthy.
    """
    per_1k = 1000 / wrk.requests if wrk.requests else 0.0
    wall = after.clock - before.clock
    proxy_cpus = parse_cpu_list(args.proxy_cpus)
    load_cpus = parse_cpu_list(args.load_cpus)
    proxy_s = cpu_seconds_between(before.proxy, after.proxy)
    backend_s = cpu_seconds_between(before.backend, after.backend)
    proxy_busy = core_percent(before.cores, after.cores, proxy_cpus)
    load_busy = core_percent(before.cores, after.cores, load_cpus)
    proxy_tasks = core_percent(before.cores, after.cores, proxy_cpus, True)
    load_tasks = core_percent(before.cores, after.cores, load_cpus, True)
    return Row(
        target=target,
        connections=connections,
        note=run.note,
        rps=wrk.rps,
        requests=wrk.requests,
        p50_ms=wrk.p50_ms,
        p90_ms=wrk.p90_ms,
        p99_ms=wrk.p99_ms,
        max_ms=wrk.max_ms,
        errors=wrk.errors,
        proxy_cpu_s_per_1k=proxy_s * per_1k if run.child else None,
        backend_cpu_s_per_1k=backend_s * per_1k,
        wrk_cpu_s_per_1k=wrk.cpu_s * per_1k,
        proxy_cores_busy_pct=proxy_busy,
        load_cores_busy_pct=load_busy,
        proxy_cores_other_pct=(
            max(0.0, proxy_tasks - 100 * proxy_s / (wall * len(proxy_cpus)))
            if run.child
            else None
        ),
        load_cores_other_pct=max(
            0.0, load_tasks - 100 * (backend_s + wrk.cpu_s) / (wall * len(load_cpus))
        ),
    )


def benchmark_target(ctx: Context, target: str, rows: list[Row]) -> None:
    """Append one row per connection count; a failure becomes rows, not a crash.

    Rows go into the caller's list as they are measured, so an interrupted
    run still reports what it finished.
    """
    counts: list[int] = ctx.args.connections
    progress(f"{target}: starting")
    try:
        with running(ctx, target) as run:
            for count in counts:
                rows.append(measure(ctx, target, run, count))
    except UnavailableError as e:
        progress(f"{target}: not available: {e}")
        done = {row.connections for row in rows if row.target == target}
        rows += [Row(target, c, reason=str(e)) for c in counts if c not in done]


def is_tls(target: str) -> bool:
    """Whether a target terminates TLS (``l7lb-tls``, ``nginx-tls``...)."""
    return target.endswith(TLS_SUFFIX)


def is_policy(target: str) -> bool:
    """Whether a target is l7lb with a traffic-policy feature (``l7lb-hash``...)."""
    return target in POLICIES


def add_ratios(rows: list[Row]) -> None:
    """Ratios between rows measured at the same connection count.

    ``l7lb_*_ratio``: l7lb's req/s and CPU per request divided by the row's;
    a ``-tls`` row is compared with ``l7lb-tls``, the others with plain l7lb
    (but not the policy rows, which get the inverse below).
    ``tls_cpu_ratio``: a ``-tls`` row's CPU per request divided by that of
    the same proxy in plain HTTP, what terminating TLS costs it.
    ``policy_*_ratio``: a policy row's req/s and CPU per request divided by
    plain l7lb's, what the feature costs.
    """
    for count in {row.connections for row in rows}:
        measured = {
            row.target: row
            for row in rows
            if row.connections == count and not row.reason
        }
        for row in measured.values():
            tls = is_tls(row.target)
            l7lb = measured.get("l7lb-tls" if tls else "l7lb")
            if l7lb is not None and is_policy(row.target):
                if l7lb.rps and row.rps:
                    row.policy_rps_ratio = row.rps / l7lb.rps
                if l7lb.proxy_cpu_s_per_1k and row.proxy_cpu_s_per_1k:
                    row.policy_cpu_ratio = (
                        row.proxy_cpu_s_per_1k / l7lb.proxy_cpu_s_per_1k
                    )
            elif l7lb is not None:
                if l7lb.rps and row.rps:
                    row.l7lb_rps_ratio = l7lb.rps / row.rps
                if l7lb.proxy_cpu_s_per_1k and row.proxy_cpu_s_per_1k:
                    row.l7lb_cpu_ratio = (
                        l7lb.proxy_cpu_s_per_1k / row.proxy_cpu_s_per_1k
                    )
            plain = measured.get(row.target.removesuffix(TLS_SUFFIX)) if tls else None
            if plain and plain.proxy_cpu_s_per_1k and row.proxy_cpu_s_per_1k:
                row.tls_cpu_ratio = row.proxy_cpu_s_per_1k / plain.proxy_cpu_s_per_1k


# --------------------------------------------------------------------------
# Reporting


COLUMNS = (
    ("target", "<"),
    ("req/s", ">"),
    ("p50 ms", ">"),
    ("p99 ms", ">"),
    ("errors", ">"),
    ("CPU s/1k req", ">"),
    ("peak RSS MiB", ">"),
    ("proxy core %", ">"),
    ("load core %", ">"),
    ("l7lb/this req/s", ">"),
    ("l7lb/this CPU", ">"),
    ("TLS/plain CPU", ">"),
    ("policy/l7lb req/s", ">"),
    ("policy/l7lb CPU", ">"),
)
# Left out of a table in which no row has a figure for them.
OPTIONAL_COLUMNS = {"TLS/plain CPU", "policy/l7lb req/s", "policy/l7lb CPU"}


def _num(value: float | None, spec: str) -> str:
    """A number for the table, ``-`` where the row has none (no proxy, no l7lb)."""
    return "-" if value is None else format(value, spec)


def format_errors(errors: dict[str, int]) -> str:
    """``0``, or the non-zero kinds, e.g. ``read=3 http=12``."""
    parts = [
        f"{'http' if kind == 'status' else kind}={n}" for kind, n in errors.items() if n
    ]
    return " ".join(parts) or "0"


def table_cells(row: Row) -> list[str]:
    """One table line; an unavailable row is its name and its reason."""
    if row.reason:
        return [row.target, f"not available: {row.reason}"]
    return [
        row.target,
        _num(row.rps, ",.0f"),
        _num(row.p50_ms, ".2f"),
        _num(row.p99_ms, ".2f"),
        format_errors(row.errors),
        _num(row.proxy_cpu_s_per_1k, ".3f"),
        _num(row.proxy_peak_rss_mib, ".1f"),
        _num(row.proxy_cores_busy_pct, ".0f"),
        _num(row.load_cores_busy_pct, ".0f"),
        _num(row.l7lb_rps_ratio, ".2f"),
        _num(row.l7lb_cpu_ratio, ".2f"),
        _num(row.tls_cpu_ratio, ".2f"),
        _num(row.policy_rps_ratio, ".2f"),
        _num(row.policy_cpu_ratio, ".2f"),
    ]


def format_table(rows: Sequence[Row]) -> str:
    """Plain aligned text; an unavailable row spans the columns after its name.

    A ratio column that only some rows have (``TLS/plain CPU``, the
    ``policy/l7lb`` pair) is left out when no row of the table has it.
    """
    cells = [table_cells(row) for row in rows]
    full = [line for line in cells if len(line) == len(COLUMNS)]
    keep = [
        i
        for i, (name, _) in enumerate(COLUMNS)
        if name not in OPTIONAL_COLUMNS or any(line[i] != "-" for line in full)
    ]
    columns = [COLUMNS[i] for i in keep]
    header = [name for name, _ in columns]
    cells = [
        [line[i] for i in keep] if len(line) == len(COLUMNS) else line for line in cells
    ]
    widths = [len(name) for name in header]
    widths[0] = max(len(line[0]) for line in [header, *cells])
    for line in cells:
        if len(line) == len(header):
            widths = [max(w, len(c)) for w, c in zip(widths, line, strict=True)]

    def render(line: list[str]) -> str:
        if len(line) != len(header):
            return f"{line[0]:<{widths[0]}}  {line[1]}"
        return "  ".join(
            f"{cell:{align}{width}}"
            for cell, (_, align), width in zip(line, columns, widths, strict=True)
        )

    lines = [render(header), "  ".join("-" * w for w in widths)]
    lines += [render(line) for line in cells]
    return "\n".join(lines)


def limit_notes(rows: Sequence[Row]) -> list[str]:
    """Point out rows where the wrk+backend core may have set the pace.

    Behind a proxy, wrk and the backend spend about twice the CPU per request
    that they spend in the direct run (less batching at lower rates), so the
    direct rate is not a reliable ceiling; the load core's own busy time is.
    A capped row's req/s is a lower bound for that proxy, while its CPU per
    request still holds.
    """
    direct = next((r for r in rows if r.target == "direct" and r.rps), None)
    notes = []
    for row in rows:
        if row.target == "direct" or not row.rps:
            continue
        load = row.load_cores_busy_pct or 0.0
        own = row.proxy_cores_busy_pct or 0.0
        share = row.rps / direct.rps if direct and direct.rps else 0.0
        if load >= LOAD_SATURATED or share >= NEAR_DIRECT:
            notes.append(
                f"{row.target}: load core {load:.0f}% busy, proxy core {own:.0f}% "
                "busy: wrk+backend were near their limit, so this req/s may be a "
                "lower bound (CPU s/1k req still holds)"
            )
    return notes


def policy_notes(rows: Sequence[Row]) -> list[str]:
    """What each policy feature adds to plain l7lb, in absolute terms too.

    A policy row with errors is called out: with ``l7lb-ratelimit`` an
    ``http=`` count means the limit refused requests (429), which makes its
    figures those of a different workload.
    """
    l7lb = next((r for r in rows if r.target == "l7lb" and r.rps), None)
    notes = []
    for row in rows:
        if not is_policy(row.target) or row.reason:
            continue
        if row.error_total:
            notes.append(
                f"warning: {row.target} had errors ({format_errors(row.errors)}); "
                "its comparison with l7lb does not hold"
            )
        if l7lb is None or row.policy_cpu_ratio is None or not row.policy_rps_ratio:
            continue
        assert row.proxy_cpu_s_per_1k is not None
        assert l7lb.proxy_cpu_s_per_1k is not None
        extra = row.proxy_cpu_s_per_1k - l7lb.proxy_cpu_s_per_1k
        notes.append(
            f"overhead: {row.target} {extra * 1000:+.1f} CPU ms/1k req over l7lb "
            f"({100 * (row.policy_cpu_ratio - 1):+.0f}% CPU per request, "
            f"{100 * (row.policy_rps_ratio - 1):+.0f}% req/s)"
        )
    return notes


def noise_notes(rows: Sequence[Row], meta: dict[str, Any]) -> list[str]:
    """Name rows during which processes other than ours took a real share of a core."""
    notes = []
    for row in rows:
        for cpus, other in (
            (meta["proxy_cpus"], row.proxy_cores_other_pct),
            (meta["load_cpus"], row.load_cores_other_pct),
        ):
            if other is not None and other >= OTHER_LOAD_WARNING:
                notes.append(
                    f"{row.target}: other processes used ~{other:.0f}% of CPU {cpus} "
                    "during this run; repeat it on a quiet machine"
                )
    return notes


def report(meta: dict[str, Any], rows: list[Row]) -> str:
    """All tables, one per connection count, with the facts needed to read them."""
    direct = [row for row in rows if row.target == "direct" and row.rps]
    rates = ", ".join(f"c={row.connections} {row.rps:,.0f} req/s" for row in direct)
    out = [
        f"backend: {meta['backend']}",
        f"backend direct: {rates or 'not measured'}",
        f"wrk -t1, keep-alive, GET / with a {len(BODY)}-byte body; "
        f"wrk and backends on CPU {meta['load_cpus']}, each proxy on CPU "
        f"{meta['proxy_cpus']}; warm-up {meta['warmup_s']:g}s, "
        f"measured {meta['duration_s']:g}s",
        f"before start: CPU {meta['proxy_cpus']} {meta['idle_check'][0]:.0f}% busy, "
        f"CPU {meta['load_cpus']} {meta['idle_check'][1]:.0f}% busy "
        "(other load on the machine skews the numbers)",
    ]
    if any(is_tls(row.target) for row in rows):
        out.append(f"-tls rows: wrk over https; {TLS_SUMMARY}")
    for count in meta["connections"]:
        same = [row for row in rows if row.connections == count]
        if not same:
            continue
        out += ["", f"c={count}", format_table(same)]
        notes = [row for row in same if row.note and not row.reason]
        out += [f"  {row.target}: {row.note}" for row in notes]
        out += [f"  {note}" for note in policy_notes(same)]
        out += [f"  note: {note}" for note in limit_notes(same)]
        out += [f"  warning: {note}" for note in noise_notes(same, meta)]
    out += [
        "",
        "CPU s/1k req = proxy process tree utime+stime per 1,000 requests; "
        "errors = wrk connect/read/write/timeout + http (status >= 400); "
        "l7lb/this > 1 means l7lb has more req/s (or uses more CPU) than that row "
        "(l7lb-tls for -tls rows); TLS/plain CPU = a -tls row's CPU s/1k req "
        "divided by the same proxy's in plain HTTP; policy/l7lb = an l7lb-<policy> "
        "row's req/s and CPU s/1k req divided by plain l7lb's (CPU > 1 is what "
        "the feature costs).",
    ]
    return "\n".join(out)


def tool_version(tool: str) -> str:
    """One line naming the version of an external tool, for the record."""
    commands = {
        "nginx": ["nginx", "-v"],
        "haproxy": ["haproxy", "-v"],
        "wrk": ["wrk", "--version"],
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


def venv_versions(venv: str) -> dict[str, str]:
    """Python, Twisted and l7lb versions in the venv the Python targets run from."""
    code = (
        "import importlib.metadata as m, platform\n"
        "def v(n):\n"
        "    try: return m.version(n)\n"
        "    except m.PackageNotFoundError: return 'not installed'\n"
        "print(platform.python_version(), v('twisted'), v('l7lb'))"
    )
    python = Path(venv) / "bin" / "python"
    try:
        done = subprocess.run(
            [str(python), "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        python_version, twisted, l7lb = done.stdout.split()
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return {"venv": venv, "python": "unavailable"}
    return {"venv": venv, "python": python_version, "twisted": twisted, "l7lb": l7lb}


def machine() -> dict[str, Any]:
    """Enough about the machine to compare results files with each other."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


def idle_check(args: argparse.Namespace) -> tuple[float, float]:
    """How busy the two core sets are before we add load: other work skews results."""
    before = core_times()
    time.sleep(1.0)
    after = core_times()
    return (
        core_percent(before, after, parse_cpu_list(args.proxy_cpus)),
        core_percent(before, after, parse_cpu_list(args.load_cpus)),
    )


def write_json(meta: dict[str, Any], rows: list[Row]) -> Path:
    """Keep the full results, more than the table shows, for later comparison."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{meta['started'].replace(':', '')}.json"
    data = {**meta, "results": [dataclasses.asdict(row) for row in rows]}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def progress(message: str) -> None:
    """Progress goes to stderr so stdout holds only the report."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Command line


def comma_ints(text: str) -> list[int]:
    """``50,200`` -> ``[50, 200]``, for argparse."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive numbers")
    return values


def target_list(text: str) -> list[str]:
    """Validate ``--only`` and keep the usual order, direct first, TLS last."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(names) - set(TARGETS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}"
        )
    return [name for name in TARGETS if name in names]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Options, checked against this machine before anything starts."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds")
    parser.add_argument(
        "--connections",
        type=comma_ints,
        default=[50, 200],
        help="comma-separated wrk -c values",
    )
    parser.add_argument(
        "--only",
        type=target_list,
        default=argparse.SUPPRESS,  # all, less what --no-tls/--no-policy leave out
        help=f"comma-separated targets to run, of {', '.join(TARGETS)} "
        "(default: all of them, less those --no-tls and --no-policy leave out)",
    )
    parser.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include the -tls rows (l7lb, NGINX and HAProxy terminating TLS)",
    )
    parser.add_argument(
        "--policy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include the l7lb policy rows "
        f"({', '.join(POLICIES)}): rate limit, sticky cookie, hash",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="proxy processes/threads: nginx worker_processes, haproxy nbthread, "
        "l7lb 'workers' in [lb] (written only when not 1)",
    )
    parser.add_argument(
        "--venv",
        default=str(BENCH_DIR.parent / ".venv"),
        help="venv with l7lb installed; its python runs the Twisted baseline",
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "nginx", "python"),
        default="auto",
        help="auto: NGINX when installed, else bench/backend.py",
    )
    parser.add_argument("--proxy-cpus", default="0", help="taskset list")
    parser.add_argument("--load-cpus", default="1", help="taskset list (wrk, backend)")
    args = parser.parse_args(argv)
    check_environment(parser, args)
    return args


def check_environment(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> None:
    """Refuse early, with one line, what would otherwise fail in every row."""
    if args.duration <= 0 or args.warmup <= 0:
        parser.error("--duration and --warmup must be positive")
    if not (args.duration.is_integer() and args.warmup.is_integer()):
        parser.error("--duration and --warmup must be whole seconds (wrk's -d)")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if "only" not in args:
        args.only = [
            t
            for t in TARGETS
            if (args.tls or not is_tls(t)) and (args.policy or not is_policy(t))
        ]
    elif not args.tls and any(is_tls(t) for t in args.only):
        parser.error("--no-tls contradicts the -tls targets named in --only")
    elif not args.policy and any(is_policy(t) for t in args.only):
        parser.error("--no-policy contradicts the policy targets named in --only")
    allowed = os.sched_getaffinity(0)
    for option in ("proxy_cpus", "load_cpus"):
        try:
            cpus = parse_cpu_list(getattr(args, option))
        except ValueError:
            parser.error(f"--{option.replace('_', '-')}: not a CPU list")
        if not set(cpus) <= allowed:
            parser.error(f"--{option.replace('_', '-')}: CPUs available: {allowed}")
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM and SIGHUP into the Ctrl-C path, which stops every child."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every target, print the tables, write the JSON; exit 130 if interrupted."""
    args = parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    rows: list[Row] = []
    meta: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": [sys.argv[0], *(sys.argv[1:] if argv is None else argv)],
        "connections": args.connections,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "workers": args.workers,
        "proxy_cpus": args.proxy_cpus,
        "load_cpus": args.load_cpus,
        "tls": TLS_SUMMARY if any(is_tls(t) for t in args.only) else None,
        "tls12_ciphers": TLS12_CIPHERS,
        "machine": machine(),
        "versions": {
            "wrk": tool_version("wrk"),
            "nginx": tool_version("nginx"),
            "haproxy": tool_version("haproxy"),
            "openssl": tool_version("openssl"),
            **venv_versions(args.venv),
        },
        "idle_check": idle_check(args),
    }
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="l7lb-bench-") as tmp:
        children = Children(Path(tmp))
        try:
            ctx = Context(args, children, Path(tmp), set())
            ctx.backend = start_backend(ctx)
            meta["backend"] = ctx.backend.description
            meta["backend_kind"] = ctx.backend.kind
            progress(f"backend: {ctx.backend.description}")
            for target in args.only:
                benchmark_target(ctx, target, rows)
        except KeyboardInterrupt:
            interrupted = True
            progress("interrupted; stopping every child process")
        finally:
            children.stop_all()
    if not rows:
        return 130 if interrupted else 1
    meta["interrupted"] = interrupted
    add_ratios(rows)
    print(report(meta, rows))
    print(f"\nJSON: {write_json(meta, rows)}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
