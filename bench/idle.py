"""Idle keep-alive clients: what holding many of them costs a proxy.

    python3 bench/run.py --idle-connections [N] [--only l7lb,nginx,...]

For each proxy, N clients connect (over TLS to a ``-tls`` target), send one
``GET /``, read the answer and then stay connected without a word. With all
of them open, the proxy's resident memory and open file descriptors are
read from /proc (summed over its process tree); then the clients close and
both are read once more. The clients are asyncio streams in the harness's
own process, which raises its open-file limit first (children inherit it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import time
from collections.abc import Callable, Sequence

import tables
from processes import LOCALHOST, UnavailableError, progress
from procfs import open_fds, peak_rss_mib, rss_mib
from targets import IDLE_KEEPALIVE, Context, client_tls_context, is_tls, running

IDLE_TARGETS = ("l7lb", "nginx", "haproxy", "l7lb-tls", "nginx-tls", "haproxy-tls")
DEFAULT_CONNECTIONS = 2000
# Connections being set up at once: well under every proxy's listen backlog,
# so that no SYN is dropped and retried a second later.
CONNECT_CONCURRENCY = 64
# How long one client may take to connect, send and be answered.
CLIENT_TIMEOUT = 30.0
# A pause for the proxy to finish with what just happened before /proc is read.
SETTLE = 1.0
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: l7lb-bench-idle\r\n\r\n"


def open_files_needed(connections: int) -> int:
    """The open-file limit the harness and a proxy need for ``connections`` clients.

    The harness holds one socket per client, the proxy one per client plus
    its backend connections and listeners; HAProxy reserves two per
    ``maxconn``, which is set to ``connections`` + 1024.
    """
    return 2 * (connections + 1024) + 1024


@dataclasses.dataclass
class IdleResult:
    """One proxy holding idle clients; ``reason`` set when it was not measured.

    ``*_before`` is after a warm-up round of clients has come and gone,
    ``*_idle`` with the clients open and idle, ``*_after`` once they closed.
    ``still_open`` counts the clients the proxy had not closed when it was
    measured.
    """

    target: str
    connections: int
    reason: str = ""
    note: str = ""
    opened: int = 0
    still_open: int = 0
    failures: int = 0
    first_failure: str = ""
    open_seconds: float = 0.0
    rss_before_mib: float = 0.0
    rss_idle_mib: float = 0.0
    rss_after_mib: float = 0.0
    peak_rss_mib: float = 0.0
    fds_before: int = 0
    fds_idle: int = 0
    fds_after: int = 0

    @property
    def kib_per_connection(self) -> float | None:
        """Resident memory each open client added, in KiB."""
        if not self.opened:
            return None
        return (self.rss_idle_mib - self.rss_before_mib) * 1024 / self.opened


@dataclasses.dataclass
class Held:
    """What a round of clients achieved."""

    opened: int
    still_open: int
    failures: list[BaseException]
    seconds: float


def measure(ctx: Context, target: str, connections: int) -> IdleResult:
    """Start ``target``, hold ``connections`` idle clients on it, read /proc."""
    result = IdleResult(target, connections)
    progress(f"{target}: idle connections, starting")
    try:
        with running(ctx, target) as run:
            assert run.child is not None
            pid = run.child.pid
            result.note = run.note
            tls = client_tls_context() if run.tls else None
            asyncio.run(hold(run.port, tls, CONNECT_CONCURRENCY, lambda: None))
            time.sleep(SETTLE)
            result.rss_before_mib, result.fds_before = rss_mib(pid), open_fds(pid)

            def with_all_open() -> None:
                result.rss_idle_mib, result.fds_idle = rss_mib(pid), open_fds(pid)
                result.peak_rss_mib = peak_rss_mib(pid)

            progress(f"{target}: opening {connections} connections")
            held = asyncio.run(hold(run.port, tls, connections, with_all_open))
            time.sleep(SETTLE)
            result.rss_after_mib, result.fds_after = rss_mib(pid), open_fds(pid)
    except UnavailableError as e:
        result.reason = str(e)
        progress(f"{target}: not available: {e}")
        return result
    result.opened, result.still_open = held.opened, held.still_open
    result.failures, result.open_seconds = len(held.failures), held.seconds
    if held.failures:
        result.first_failure = repr(held.failures[0])
    progress(
        f"{target}: {held.still_open}/{connections} open, "
        f"RSS {result.rss_before_mib:.1f} -> {result.rss_idle_mib:.1f} MiB, "
        f"fds {result.fds_before} -> {result.fds_idle}"
    )
    return result


async def hold(
    port: int,
    tls: ssl.SSLContext | None,
    connections: int,
    with_all_open: Callable[[], None],
) -> Held:
    """Open ``connections`` clients, let them idle, call ``with_all_open``, close.

    Each client sends one request and reads the answer before the next
    client may start, ``CONNECT_CONCURRENCY`` at a time.
    """
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    started = time.monotonic()
    outcomes = await asyncio.gather(
        *(_client(port, tls, gate) for _ in range(connections)),
        return_exceptions=True,
    )
    seconds = time.monotonic() - started
    streams = [o for o in outcomes if isinstance(o, tuple)]
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    await asyncio.sleep(SETTLE)
    still_open = sum(not reader.at_eof() for reader, _ in streams)
    with_all_open()
    for _, writer in streams:
        writer.close()
    await asyncio.gather(
        *(writer.wait_closed() for _, writer in streams), return_exceptions=True
    )
    return Held(len(streams), still_open, failures, seconds)


async def _client(
    port: int, tls: ssl.SSLContext | None, gate: asyncio.Semaphore
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """One client: connect, one GET, read the whole answer, keep the connection."""
    async with gate:
        return await asyncio.wait_for(_exchange(port, tls), CLIENT_TIMEOUT)


async def _exchange(
    port: int, tls: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(LOCALHOST, port, ssl=tls)
    writer.write(REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if status.split(b" ")[1:2] != [b"200"]:
        writer.close()
        raise UnavailableError(f"answered {status.decode(errors='replace')!r}")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return reader, writer


# --------------------------------------------------------------------------
# Reporting


COLUMNS = (
    "target",
    "open",
    "open s",
    "RSS before",
    "RSS idle",
    "KiB/conn",
    "peak RSS",
    "fds before",
    "fds idle",
    "RSS after",
    "fds after",
    "l7lb/this KiB",
)


def _cells(result: IdleResult, l7lb: IdleResult | None) -> list[str]:
    if result.reason:
        return [result.target, f"not available: {result.reason}"]
    per_connection = result.kib_per_connection
    ours = l7lb.kib_per_connection if l7lb else None
    ratio = f"{ours / per_connection:.2f}" if ours and per_connection else "-"
    return [
        result.target,
        f"{result.still_open}/{result.connections}",
        f"{result.open_seconds:.1f}",
        f"{result.rss_before_mib:.1f}",
        f"{result.rss_idle_mib:.1f}",
        "-" if per_connection is None else f"{per_connection:.1f}",
        f"{result.peak_rss_mib:.1f}",
        str(result.fds_before),
        str(result.fds_idle),
        f"{result.rss_after_mib:.1f}",
        str(result.fds_after),
        ratio,
    ]


def report(results: Sequence[IdleResult]) -> str:
    """One table, a line per proxy, with what the columns mean under it."""
    by_target = {result.target: result for result in results if not result.reason}
    lines = []
    for result in results:
        l7lb = by_target.get("l7lb-tls" if is_tls(result.target) else "l7lb")
        lines.append(_cells(result, l7lb))
    count = results[0].connections if results else 0
    out = [
        f"idle connections: {count} keep-alive clients per proxy, each sent one "
        f"GET / and then stays open, silent; each proxy keeps idle clients for "
        f"{IDLE_KEEPALIVE} s in this run",
        tables.render(COLUMNS, lines),
    ]
    for result in results:
        if result.reason:
            continue
        if result.failures:
            out.append(
                f"  warning: {result.target}: {result.failures} client(s) failed, "
                f"first {result.first_failure}"
            )
        if result.still_open < result.opened:
            out.append(
                f"  warning: {result.target} closed "
                f"{result.opened - result.still_open} idle client(s) before the "
                "reading: its figures are for fewer connections"
            )
        if result.note:
            out.append(f"  {result.target}: {result.note}")
    out += [
        "",
        "open = clients still connected when measured / asked for; open s = time "
        "to connect them all and get each its answer; RSS (MiB, VmRSS summed over "
        "the proxy's process tree) and fds (entries of /proc/PID/fd, summed) "
        "before the clients, with all of them idle, and after they closed; "
        "KiB/conn = (RSS idle - RSS before) / clients; peak RSS = VmHWM summed, "
        "over the proxy's life; l7lb/this KiB = l7lb's KiB/conn divided by the "
        "row's (l7lb-tls's in -tls rows).",
    ]
    return "\n".join(out)
