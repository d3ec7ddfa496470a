"""A soak: one proxy under full load for minutes, watched for growth.

    python3 bench/run.py --soak [SECONDS] [--only l7lb] [--soak-interval 10]

After the usual warm-up, one wrk (h2load for an ``-h2`` target) runs for the
whole soak at the largest ``--connections`` value. Every interval the
proxy's RSS and open file descriptors are read from /proc (summed over its
process tree) and the backends' request counter gives the rate over the
interval; wrk itself reports only at the end, and its connections stay
open throughout, so per-connection state that grows would show. One reading
before the load and one after it (its connections closed) tell whether
descriptors come back.
"""

from __future__ import annotations

import dataclasses
import time

import tables
from load import LoadResult, finish_load, run_load, start_load
from processes import Child, UnavailableError, exit_status, progress
from procfs import (
    cpu_seconds_between,
    cpu_ticks,
    open_fds,
    peak_rss_mib,
    rss_mib,
    tcp_sockets,
)
from targets import Context, Running, backend_requests, is_h2, running

DEFAULT_SECONDS = 300
# Growth is counted from the reading at the end of the first minute, when
# caches and pools have filled; a soak shorter than two minutes counts it
# from its first reading.
REFERENCE_AT = 60.0
# Resident memory that moves less than this counts as no growth.
RSS_TOLERANCE_MIB = 1.0
# Seconds for the proxy to finish with closed connections before a reading.
SETTLE = 1.0


@dataclasses.dataclass
class Sample:
    """One reading: seconds since the load started (``None``: without load).

    ``clients`` and ``backends`` are the TCP connections among ``fds``:
    accepted from clients, and open to the backends (the proxy's pool).
    """

    at_s: float | None
    rss_mib: float
    fds: int
    clients: int
    backends: int
    rps: float | None = None


def reading(ctx: Context, run: Running, at_s: float | None = None) -> Sample:
    """RSS, descriptors and connections of the target's process tree now."""
    assert run.child is not None and ctx.backend is not None
    pid = run.child.pid
    sockets = tcp_sockets(pid, run.port, ctx.backend.ports)
    return Sample(at_s, rss_mib(pid), open_fds(pid), *sockets)


@dataclasses.dataclass
class SoakResult:
    """A soak's readings, and the load generator's totals once it has ended."""

    target: str
    seconds: int
    interval: int
    load: str
    reason: str = ""
    before: Sample | None = None
    samples: list[Sample] = dataclasses.field(default_factory=list)
    after: Sample | None = None
    totals: LoadResult | None = None
    cpu_s_per_1k: float | None = None
    peak_rss_mib: float | None = None
    interrupted: bool = False


def measure(
    ctx: Context, target: str, seconds: int, interval: int, into: list[SoakResult]
) -> None:
    """Soak ``target``; the result goes into ``into`` first and fills as it runs.

    So an interrupted soak still reports the readings it took.
    """
    args = ctx.args
    assert ctx.backend is not None
    connections, streams = (
        (args.h2_clients, args.h2_streams)
        if is_h2(target)
        else (max(args.connections), 0)
    )
    result = SoakResult(target, seconds, interval, "")
    into.append(result)
    try:
        with running(ctx, target) as run:
            assert run.child is not None
            pid = run.child.pid
            load = run.load(connections, args.load_cpus, streams)
            result.load = f"{load.tool} {load.label}"
            progress(f"{target}: soak, warm-up {args.warmup:g}s")
            run_load(ctx.children, load, args.warmup)
            time.sleep(SETTLE)
            result.before = reading(ctx, run)
            progress(f"{target}: soak for {seconds}s under {result.load}")
            cpu_before = cpu_ticks(pid)
            # One second more than the soak, so that the last reading is under load.
            started = start_load(ctx.children, load, seconds + 1)
            _sample_while_loaded(ctx, result, run, started.child)
            result.totals = finish_load(ctx.children, started)
            used = cpu_seconds_between(cpu_before, cpu_ticks(pid))
            if result.totals.requests:
                result.cpu_s_per_1k = used * 1000 / result.totals.requests
            time.sleep(SETTLE)
            result.after = reading(ctx, run)
            result.peak_rss_mib = peak_rss_mib(pid)
    except UnavailableError as e:
        result.reason = str(e)
        progress(f"{target}: not available: {e}")
    except KeyboardInterrupt:
        result.interrupted = True
        raise


def _sample_while_loaded(
    ctx: Context, result: SoakResult, run: Running, generator: Child
) -> None:
    """A reading every ``result.interval`` seconds until the soak's end."""
    assert ctx.backend is not None
    start = time.monotonic()
    last_count, last_at = backend_requests(ctx.backend), start
    tick = 1
    while tick * result.interval <= result.seconds:
        time.sleep(max(0.0, start + tick * result.interval - time.monotonic()))
        if exit_status(generator.proc) is not None:
            return  # the generator failed early; finish_load says why
        count, now = backend_requests(ctx.backend), time.monotonic()
        sample = reading(ctx, run, now - start)
        sample.rps = (count - last_count) / (now - last_at)
        result.samples.append(sample)
        progress(
            f"{result.target}: {sample.at_s:.0f}s RSS {sample.rss_mib:.1f} MiB, "
            f"{sample.fds} fds, {sample.rps:,.0f} req/s"
        )
        last_count, last_at = count, now
        tick += 1


# --------------------------------------------------------------------------
# Reporting


def reference(result: SoakResult) -> Sample | None:
    """The reading growth is counted from (see ``REFERENCE_AT``)."""
    samples = result.samples
    if len(samples) < 2:
        return None
    if result.seconds < 2 * REFERENCE_AT:
        return samples[0]
    early = [s for s in samples if s.at_s is not None and s.at_s <= REFERENCE_AT + 1]
    return early[-1] if early else samples[0]


def verdict(result: SoakResult) -> str:
    """One line: did RSS grow from the first minute to the end, did fds leak.

    Descriptors leak when, with the load gone, client connections are still
    open or descriptors other than connections are more than before. The
    backend connections kept for reuse may differ: reported, not judged.
    """
    first, last = reference(result), result.samples[-1] if result.samples else None
    if first is None or last is None or first is last:
        return "verdict: too short to tell (fewer than two readings under load)"
    assert first.at_s is not None and last.at_s is not None
    growth = last.rss_mib - first.rss_mib
    span = f"from {first.at_s:.0f} s to {last.at_s:.0f} s"
    if growth <= RSS_TOLERANCE_MIB:
        head = "no growth"
        details = [f"RSS {growth:+.1f} MiB {span}"]
    else:
        per_minute = growth * 60 / (last.at_s - first.at_s)
        head = f"grew by {growth:.1f} MiB"
        details = [
            f"{100 * growth / first.rss_mib:+.0f}%, {per_minute:.2f} MiB/min {span}"
        ]
    details.append(f"fds under load {first.fds} -> {last.fds}")
    before, after = result.before, result.after
    if before is not None and after is not None:
        details.append(
            f"without load {before.fds} -> {after.fds}, of which backend "
            f"connections {before.backends} -> {after.backends}"
        )
        others = (after.fds - after.clients - after.backends) - (
            before.fds - before.clients - before.backends
        )
        if after.clients:
            head += f", {after.clients} client connection(s) left open"
        if others > 0:
            head += f", {others} more fd(s) that are not connections"
    return f"verdict: {head} ({'; '.join(details)})"


def _cells(label: str, sample: Sample) -> list[str]:
    rps = "-" if sample.rps is None else f"{sample.rps:,.0f}"
    counts = (sample.fds, sample.clients, sample.backends)
    return [label, f"{sample.rss_mib:.1f}", *map(str, counts), rps]


def report(result: SoakResult) -> str:
    """The readings as a table, the load's totals and the verdict."""
    title = f"soak: {result.target}, {result.seconds} s under {result.load or '?'}"
    if result.reason:
        return f"{title}\n  not available: {result.reason}"
    lines = []
    if result.before is not None:
        lines.append(_cells("before", result.before))
    lines += [_cells(f"{s.at_s:.0f}", s) for s in result.samples]
    if result.after is not None:
        lines.append(_cells("after", result.after))
    out = [
        f"{title}, a reading every {result.interval} s",
        tables.render(
            ("time s", "RSS MiB", "fds", "clients", "backends", "req/s"), lines
        ),
    ]
    totals = result.totals
    if totals is not None:
        errors = " ".join(f"{k}={n}" for k, n in totals.errors.items() if n) or "0"
        cpu = "-" if result.cpu_s_per_1k is None else f"{result.cpu_s_per_1k:.3f}"
        peak = "-" if result.peak_rss_mib is None else f"{result.peak_rss_mib:.1f}"
        out.append(
            f"  whole soak: {totals.rps:,.0f} req/s, p50 {totals.p50_ms:.2f} ms, "
            f"p99 {totals.p99_ms:.2f} ms, errors {errors}, CPU s/1k req {cpu}, "
            f"peak RSS {peak} MiB"
        )
    if result.interrupted:
        out.append("  interrupted: the readings stop where the soak was stopped")
    out += [
        f"  {verdict(result)}",
        "",
        "before = after the warm-up, without load; after = the load stopped and "
        "its connections closed; RSS = VmRSS summed over the proxy's process "
        "tree; fds = entries of /proc/PID/fd, summed; clients, backends = the "
        "TCP connections among them from clients and to the backends; req/s = "
        "requests the backends answered in the interval before the reading. "
        "Growth counts "
        "from the reading at the end of the first minute (the first reading in "
        f"a soak under {2 * REFERENCE_AT:.0f} s); under "
        f"{RSS_TOLERANCE_MIB:.0f} MiB is no growth.",
    ]
    return "\n".join(out)
