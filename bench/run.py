"""Benchmark l7lb against a direct backend, Twisted's stock proxy, NGINX and HAProxy.

One run starts two fast local backends, then each target in turn, and drives
each with ``wrk -t1`` at every requested connection count. Proxies run pinned
to their own cores (one per worker), wrk and the backends to another, so that
the numbers say how much a core of proxy buys. The ``-tls`` targets are
l7lb, NGINX and HAProxy terminating TLS (a self-signed certificate made for
the run) in front of the same plain-HTTP backends; the ``-h2`` targets are
the same three driven over HTTP/2 by ``h2load``. The policy targets
(``l7lb-ratelimit``, ``l7lb-sticky``, ``l7lb-sticky-pinned``, ``l7lb-hash``)
are l7lb with one traffic-policy feature switched on, compared with the
plain ``l7lb`` row. Standard library only: it runs with the system
``python3`` and uses the venv only to start l7lb and the Twisted baseline.

    python3 bench/run.py [--duration 10] [--connections 50,200]
                         [--only l7lb,direct,...] [--no-tls] [--no-h2]
                         [--no-policy] [--workers N]
    python3 bench/run.py --idle-connections [N]   # memory and fds of N idle clients
    python3 bench/run.py --soak [SECONDS]         # RSS and fds under long load

See bench/README.md for how to read the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import idle
import soak
import tables
from backend import BODY
from load import Load, LoadResult, run_load
from processes import UnavailableError, progress, raise_open_files_limit
from procfs import (
    Jiffies,
    core_percent,
    core_times,
    cpu_list,
    cpu_seconds_between,
    cpu_ticks,
    parse_cpu_list,
    peak_rss_mib,
    process_tree,
)
from targets import (
    H2_SUMMARY,
    POLICIES,
    TARGETS,
    TLS12_CIPHERS,
    TLS_SUFFIX,
    TLS_SUMMARY,
    Context,
    Running,
    default_cpus,
    is_h2,
    is_policy,
    is_tls,
    proxy_of,
    running,
    session,
    tool_version,
    venv_versions,
)

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
NEAR_DIRECT = 0.85
LOAD_SATURATED = 90.0
OTHER_LOAD_WARNING = 10.0


# --------------------------------------------------------------------------
# Measuring


@dataclasses.dataclass
class Row:
    """One target under one load; ``reason`` set when not measured.

    ``connections`` is wrk's ``-c``, or h2load's ``-c`` when ``streams``
    (h2load's ``-m``) is set. ``wrk_cpu_s_per_1k`` is the load generator's
    CPU, h2load's in an h2 row.
    """

    target: str
    connections: int
    reason: str = ""
    note: str = ""
    streams: int | None = None
    rps: float | None = None
    requests: int | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    proxy_cpu_s_per_1k: float | None = None
    proxy_peak_rss_mib: float | None = None
    proxy_processes: int | None = None
    backend_cpu_s_per_1k: float | None = None
    wrk_cpu_s_per_1k: float | None = None
    proxy_cores_busy_pct: float | None = None
    load_cores_busy_pct: float | None = None
    proxy_cores_other_pct: float | None = None
    load_cores_other_pct: float | None = None
    l7lb_rps_ratio: float | None = None
    l7lb_cpu_ratio: float | None = None
    tls_cpu_ratio: float | None = None
    h2_plain_cpu_ratio: float | None = None
    h2_tls_cpu_ratio: float | None = None
    policy_rps_ratio: float | None = None
    policy_cpu_ratio: float | None = None

    @property
    def error_total(self) -> int:
        """All errors of the row, whatever their kind."""
        return sum(self.errors.values())

    @property
    def shape(self) -> tuple[int, int | None]:
        """The load the row was measured under: rows compare within one shape."""
        return self.connections, self.streams


@dataclasses.dataclass
class Usage:
    """CPU counters taken just before and just after a measured run."""

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


def measure(ctx: Context, target: str, run: Running, load: Load) -> Row:
    """Warm up, then one measured run with CPU accounting around it."""
    args = ctx.args
    assert ctx.backend is not None
    progress(f"{target} {load.label}: warm-up {args.warmup:g}s")
    run_load(ctx.children, load, args.warmup)
    progress(f"{target} {load.label}: measuring {args.duration:g}s")
    proxy_pid = run.child.pid if run.child else None
    backend_pid = ctx.backend.child.pid
    before = Usage.now(proxy_pid, backend_pid)
    result = run_load(ctx.children, load, args.duration)
    after = Usage.now(proxy_pid, backend_pid)
    row = row_from(target, load, run, result, before, after, args)
    if proxy_pid:
        row.proxy_peak_rss_mib = peak_rss_mib(proxy_pid)
        row.proxy_processes = len(process_tree(proxy_pid))
        if args.workers != 1:
            row.note = f"{row.note}, {row.proxy_processes} process(es)".lstrip(", ")
    progress(
        f"{target} {load.label}: {result.rps:,.0f} req/s, "
        f"p99 {result.p99_ms:.2f} ms, {row.error_total} errors"
    )
    return row


def row_from(
    target: str,
    load: Load,
    run: Running,
    result: LoadResult,
    before: Usage,
    after: Usage,
    args: argparse.Namespace,
) -> Row:
    """Turn the load generator's totals and the CPU counters into per-request figures.

    The ``*_other_pct`` fields are the share of each core set used by
    processes that are not ours: other work on the machine, which makes a
    row less trustworthy. When the proxy shares cores with the load (more
    workers than spare cores), both are that share over all the cores used.
    """
    per_1k = 1000 / result.requests if result.requests else 0.0
    wall = after.clock - before.clock
    proxy_cpus = parse_cpu_list(args.proxy_cpus)
    load_cpus = parse_cpu_list(args.load_cpus)
    proxy_s = cpu_seconds_between(before.proxy, after.proxy)
    backend_s = cpu_seconds_between(before.backend, after.backend)

    def other(cpus: Sequence[int], ours: float) -> float:
        tasks = core_percent(before.cores, after.cores, cpus, True)
        return max(0.0, tasks - 100 * ours / (wall * len(cpus)))

    load_s = backend_s + result.cpu_s
    if set(proxy_cpus) & set(load_cpus):
        shared = other(sorted(set(proxy_cpus) | set(load_cpus)), proxy_s + load_s)
        proxy_other, load_other = shared, shared
    else:
        proxy_other, load_other = other(proxy_cpus, proxy_s), other(load_cpus, load_s)
    return Row(
        target=target,
        connections=load.connections,
        note=run.note,
        streams=load.streams or None,
        rps=result.rps,
        requests=result.requests,
        p50_ms=result.p50_ms,
        p90_ms=result.p90_ms,
        p99_ms=result.p99_ms,
        max_ms=result.max_ms,
        errors=result.errors,
        proxy_cpu_s_per_1k=proxy_s * per_1k if run.child else None,
        backend_cpu_s_per_1k=backend_s * per_1k,
        wrk_cpu_s_per_1k=result.cpu_s * per_1k,
        proxy_cores_busy_pct=core_percent(before.cores, after.cores, proxy_cpus),
        load_cores_busy_pct=core_percent(before.cores, after.cores, load_cpus),
        proxy_cores_other_pct=proxy_other if run.child else None,
        load_cores_other_pct=load_other,
    )


def loads_for(target: str, args: argparse.Namespace) -> list[tuple[int, int]]:
    """``(connections, streams)`` for each row of a target; streams 0 is wrk."""
    if is_h2(target):
        return [(args.h2_clients, args.h2_streams)]
    return [(count, 0) for count in args.connections]


def benchmark_target(ctx: Context, target: str, rows: list[Row]) -> None:
    """Append one row per load; a failure becomes rows, not a crash.

    Rows go into the caller's list as they are measured, so an interrupted
    run still reports what it finished.
    """
    shapes = loads_for(target, ctx.args)
    measured = 0
    progress(f"{target}: starting")
    try:
        with running(ctx, target) as run:
            for connections, streams in shapes:
                load = run.load(connections, ctx.args.load_cpus, streams)
                rows.append(measure(ctx, target, run, load))
                measured += 1
    except UnavailableError as e:
        progress(f"{target}: not available: {e}")
        rows += [
            Row(target, connections, reason=str(e), streams=streams or None)
            for connections, streams in shapes[measured:]
        ]


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator`` when both are there and non-zero."""
    return numerator / denominator if numerator and denominator else None


def _cpu(row: Row | None) -> float | None:
    """A row's CPU per request, if there is such a row and it has one."""
    return row.proxy_cpu_s_per_1k if row is not None else None


def h1_reference_count(rows: Sequence[Row]) -> int | None:
    """The wrk connection count the h2 rows are compared with.

    The one closest to h2load's concurrent streams (clients x streams), the
    lower on a tie: 50 for ``-c10 -m10`` against wrk's 50 and 200.
    """
    counts = sorted({row.connections for row in rows if row.streams is None})
    h2 = next((row for row in rows if row.streams is not None), None)
    if not counts or h2 is None or h2.streams is None:
        return None
    concurrency = h2.connections * h2.streams
    return min(counts, key=lambda count: abs(count - concurrency))


def add_ratios(rows: list[Row]) -> None:
    """Ratios between rows measured under the same load.

    ``l7lb_*_ratio``: l7lb's req/s and CPU per request divided by the row's;
    a ``-tls`` row is compared with ``l7lb-tls``, an ``-h2`` row with
    ``l7lb-h2``, the others with plain l7lb (but not the policy rows, which
    get the inverse below).
    ``tls_cpu_ratio``: a ``-tls`` row's CPU per request divided by that of
    the same proxy in plain HTTP, what terminating TLS costs it.
    ``h2_plain_cpu_ratio``, ``h2_tls_cpu_ratio``: an ``-h2`` row's CPU per
    request divided by that of the same proxy in plain HTTP/1.1 and in
    HTTP/1.1 over TLS, at the wrk connection count ``h1_reference_count``.
    ``policy_*_ratio``: a policy row's req/s and CPU per request divided by
    plain l7lb's, what the feature costs.
    """
    measured = {(row.target, row.shape): row for row in rows if not row.reason}
    reference = h1_reference_count(rows)
    for (target, shape), row in measured.items():
        family = "l7lb-h2" if is_h2(target) else "l7lb-tls" if is_tls(target) else ""
        l7lb = measured.get((family or "l7lb", shape))
        if l7lb is not None and is_policy(target):
            row.policy_rps_ratio = _ratio(row.rps, l7lb.rps)
            row.policy_cpu_ratio = _ratio(_cpu(row), _cpu(l7lb))
        elif l7lb is not None:
            row.l7lb_rps_ratio = _ratio(l7lb.rps, row.rps)
            row.l7lb_cpu_ratio = _ratio(_cpu(l7lb), _cpu(row))
        proxy = proxy_of(target)
        if is_tls(target):
            row.tls_cpu_ratio = _ratio(_cpu(row), _cpu(measured.get((proxy, shape))))
        if is_h2(target) and reference is not None:
            h1 = (reference, None)
            plain, tls = (
                measured.get((proxy, h1)),
                measured.get((proxy + TLS_SUFFIX, h1)),
            )
            row.h2_plain_cpu_ratio = _ratio(_cpu(row), _cpu(plain))
            row.h2_tls_cpu_ratio = _ratio(_cpu(row), _cpu(tls))


# --------------------------------------------------------------------------
# Reporting


COLUMNS = (
    "target",
    "req/s",
    "p50 ms",
    "p99 ms",
    "errors",
    "CPU s/1k req",
    "peak RSS MiB",
    "proxy core %",
    "load core %",
    "l7lb/this req/s",
    "l7lb/this CPU",
    "TLS/plain CPU",
    "h2/plain CPU",
    "h2/tls CPU",
    "policy/l7lb req/s",
    "policy/l7lb CPU",
)
# Left out of a table in which no row has a figure for them.
OPTIONAL_COLUMNS = {
    "TLS/plain CPU",
    "h2/plain CPU",
    "h2/tls CPU",
    "policy/l7lb req/s",
    "policy/l7lb CPU",
}


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
        _num(row.h2_plain_cpu_ratio, ".2f"),
        _num(row.h2_tls_cpu_ratio, ".2f"),
        _num(row.policy_rps_ratio, ".2f"),
        _num(row.policy_cpu_ratio, ".2f"),
    ]


def format_table(rows: Sequence[Row]) -> str:
    """Plain aligned text; an unavailable row spans the columns after its name.

    A ratio column that only some rows have (``TLS/plain CPU``, the ``h2/``
    and ``policy/l7lb`` pairs) is left out when no row of the table has it.
    """
    cells = [table_cells(row) for row in rows]
    full = [line for line in cells if len(line) == len(COLUMNS)]
    keep = [
        i
        for i, name in enumerate(COLUMNS)
        if name not in OPTIONAL_COLUMNS or any(line[i] != "-" for line in full)
    ]
    header = [COLUMNS[i] for i in keep]
    cells = [
        [line[i] for i in keep] if len(line) == len(COLUMNS) else line for line in cells
    ]
    return tables.render(header, cells)


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
                "busy: the load generator and backend were near their limit, so "
                "this req/s may be a lower bound (CPU s/1k req still holds)"
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
    """Name rows during which processes other than ours took a real share of a core.

    When proxy and load share cores, the share is over all of them: one note.
    """
    proxy, load = parse_cpu_list(meta["proxy_cpus"]), parse_cpu_list(meta["load_cpus"])
    notes = []
    for row in rows:
        if set(proxy) & set(load):
            shares = [(cpu_list([*proxy, *load]), row.load_cores_other_pct)]
        else:
            shares = [
                (meta["proxy_cpus"], row.proxy_cores_other_pct),
                (meta["load_cpus"], row.load_cores_other_pct),
            ]
        for cpus, other in shares:
            if other is not None and other >= OTHER_LOAD_WARNING:
                notes.append(
                    f"{row.target}: other processes used ~{other:.0f}% of CPU {cpus} "
                    "during this run; repeat it on a quiet machine"
                )
    return notes


def layout_line(meta: dict[str, Any]) -> str:
    """Where the proxy and the load ran, and what they shared."""
    proxy, load = meta["proxy_cpus"], meta["load_cpus"]
    line = (
        f"wrk/h2load and backends on CPU {load}, each proxy on CPU {proxy} "
        f"({meta['workers']} worker(s))"
    )
    shared = set(parse_cpu_list(proxy)) & set(parse_cpu_list(load))
    if shared:
        line += (
            f"; CPU {cpu_list(shared)} is shared by proxy and load (more workers "
            "than spare cores)"
        )
    return line


def report_header(meta: dict[str, Any]) -> list[str]:
    """The facts every mode's report starts with."""
    versions = meta["versions"]
    return [
        f"backend: {meta['backend']}",
        layout_line(meta),
        f"l7lb {versions.get('l7lb', '?')} from {versions.get('l7lb_code', '?')}",
        f"before start: CPU {meta['proxy_cpus']} {meta['idle_check'][0]:.0f}% busy, "
        f"CPU {meta['load_cpus']} {meta['idle_check'][1]:.0f}% busy "
        "(other load on the machine skews the numbers)",
    ]


def table_section(title: str, rows: list[Row], meta: dict[str, Any]) -> list[str]:
    """One table with the notes and warnings about its rows."""
    out = ["", title, format_table(rows)]
    notes = [row for row in rows if row.note and not row.reason]
    out += [f"  {row.target}: {row.note}" for row in notes]
    out += [f"  {note}" for note in policy_notes(rows)]
    out += [f"  note: {note}" for note in limit_notes(rows)]
    out += [f"  warning: {note}" for note in noise_notes(rows, meta)]
    return out


def report(meta: dict[str, Any], rows: list[Row]) -> str:
    """All tables, one per load, with the facts needed to read them."""
    direct = [row for row in rows if row.target == "direct" and row.rps]
    rates = ", ".join(f"c={row.connections} {row.rps:,.0f} req/s" for row in direct)
    out = report_header(meta)
    out += [
        f"backend direct: {rates or 'not measured'}",
        f"wrk -t1, keep-alive, GET / with a {len(BODY)}-byte body; "
        f"warm-up {meta['warmup_s']:g}s, measured {meta['duration_s']:g}s",
    ]
    if any(is_tls(row.target) for row in rows):
        out.append(f"-tls rows: wrk over https; {TLS_SUMMARY}")
    for count in meta["connections"]:
        same = [row for row in rows if row.shape == (count, None)]
        if same:
            out += table_section(f"c={count}", same, meta)
    h2 = [row for row in rows if row.streams is not None]
    if h2:
        clients, streams = meta["h2"]["clients"], meta["h2"]["streams"]
        title = (
            f"h2: h2load -t1 -c{clients} -m{streams} ({clients * streams} "
            f"concurrent streams); {H2_SUMMARY}"
        )
        out += table_section(title, h2, meta)
        reference = h1_reference_count(rows)
        if reference is not None:
            out.append(
                f"  h2/plain and h2/tls CPU compare with the c={reference} rows "
                "of the same proxy (plain HTTP/1.1 and HTTP/1.1 over TLS)"
            )
    out += [
        "",
        "CPU s/1k req = proxy process tree utime+stime per 1,000 requests; "
        "errors = wrk connect/read/write/timeout + http (status >= 400), "
        "h2load errored (network) + http (neither 2xx nor 3xx); "
        "l7lb/this > 1 means l7lb has more req/s (or uses more CPU) than that row "
        "(l7lb-tls for -tls rows, l7lb-h2 for -h2 rows); TLS/plain CPU = a -tls "
        "row's CPU s/1k req divided by the same proxy's in plain HTTP; "
        "h2/plain CPU and h2/tls CPU = an -h2 row's divided by the same proxy's "
        "in plain HTTP/1.1 and in HTTP/1.1 over TLS; policy/l7lb = an "
        "l7lb-<policy> row's req/s and CPU s/1k req divided by plain l7lb's "
        "(CPU > 1 is what the feature costs).",
    ]
    return "\n".join(out)


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


def write_json(data: dict[str, Any]) -> Path:
    """Keep the full results, more than the report shows, for later comparison."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{data['started'].replace(':', '')}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


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
        default=argparse.SUPPRESS,  # all, less what --no-tls/--no-h2/--no-policy drop
        help=f"comma-separated targets to run, of {', '.join(TARGETS)} "
        "(default: all of them, less those --no-tls, --no-h2 and --no-policy "
        "leave out; with --idle-connections, the proxies in plain HTTP and "
        "TLS; with --soak, l7lb)",
    )
    parser.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include the -tls and -h2 rows (l7lb, NGINX and HAProxy terminating TLS)",
    )
    parser.add_argument(
        "--h2",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include the -h2 rows (h2load over TLS with ALPN h2)",
    )
    parser.add_argument("--h2-clients", type=int, default=10, help="h2load -c")
    parser.add_argument(
        "--h2-streams",
        type=int,
        default=10,
        help="h2load -m: concurrent streams per connection",
    )
    parser.add_argument(
        "--policy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include the l7lb policy rows "
        f"({', '.join(POLICIES)}): rate limit, sticky cookie, hash",
    )
    parser.add_argument(
        "--idle-connections",
        type=int,
        nargs="?",
        const=idle.DEFAULT_CONNECTIONS,
        default=argparse.SUPPRESS,  # 0: not run
        metavar="N",
        help="instead of the tables, hold N idle keep-alive clients on each "
        f"proxy and report its memory and fds (N defaults to "
        f"{idle.DEFAULT_CONNECTIONS})",
    )
    parser.add_argument(
        "--soak",
        type=int,
        nargs="?",
        const=soak.DEFAULT_SECONDS,
        default=argparse.SUPPRESS,  # 0: not run
        metavar="SECONDS",
        help="instead of the tables, load l7lb (or the --only targets) for "
        f"SECONDS (defaults to {soak.DEFAULT_SECONDS}) at the largest "
        "--connections, sampling RSS, fds and req/s",
    )
    parser.add_argument(
        "--soak-interval", type=int, default=10, help="seconds between soak samples"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="proxy processes/threads: nginx worker_processes, haproxy nbthread, "
        "l7lb 'workers' in [lb] (written only when not 1); each proxy gets "
        "one CPU per worker unless --proxy-cpus says otherwise",
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
    parser.add_argument(
        "--proxy-cpus",
        default=argparse.SUPPRESS,  # from --workers, see targets.default_cpus
        help="taskset list (default: one CPU per worker from CPU 0, or all CPUs)",
    )
    parser.add_argument(
        "--load-cpus",
        default=argparse.SUPPRESS,
        help="taskset list for wrk/h2load and the backends (default: the CPU "
        "after the proxy's, or the last CPU when the proxy has them all)",
    )
    args = parser.parse_args(argv)
    # Children run in temporary directories: the venv must not be relative.
    args.venv = str(Path(args.venv).resolve())
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
    for option in ("workers", "h2_clients", "h2_streams", "soak_interval"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    args.idle_connections = getattr(args, "idle_connections", 0)
    args.soak = getattr(args, "soak", 0)
    if args.idle_connections < 0 or args.soak < 0:
        parser.error("--idle-connections and --soak take positive numbers")
    choose_targets(parser, args)
    allowed = os.sched_getaffinity(0)
    proxy, load = default_cpus(args.workers, allowed)
    args.proxy_cpus = getattr(args, "proxy_cpus", proxy)
    args.load_cpus = getattr(args, "load_cpus", load)
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


def choose_targets(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill in ``args.only``, ``args.idle_targets`` and ``args.soak_targets``.

    Without ``--only``: every target the ``--no-*`` options leave in for the
    tables, the proxies in plain HTTP and TLS for the idle run, l7lb alone
    for the soak. With it, every mode runs what it names, and what it
    contradicts is refused.
    """
    if "only" not in args:
        args.only = [
            t
            for t in TARGETS
            if (args.tls or not (is_tls(t) or is_h2(t)))
            and (args.h2 or not is_h2(t))
            and (args.policy or not is_policy(t))
        ]
        args.idle_targets = [t for t in idle.IDLE_TARGETS if args.tls or not is_tls(t)]
        args.soak_targets = ["l7lb"]
        return
    args.idle_targets = args.soak_targets = args.only
    if not args.tls and any(is_tls(t) or is_h2(t) for t in args.only):
        parser.error("--no-tls contradicts the -tls and -h2 targets named in --only")
    if not args.h2 and any(is_h2(t) for t in args.only):
        parser.error("--no-h2 contradicts the -h2 targets named in --only")
    if not args.policy and any(is_policy(t) for t in args.only):
        parser.error("--no-policy contradicts the policy targets named in --only")
    if args.idle_connections:
        others = [t for t in args.only if t not in idle.IDLE_TARGETS]
        if others:
            parser.error(
                f"--idle-connections measures {', '.join(idle.IDLE_TARGETS)}, "
                f"not {', '.join(others)}"
            )
    if args.soak and "direct" in args.only:
        parser.error("--soak measures a proxy; direct has none")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM and SIGHUP into the Ctrl-C path, which stops every child."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_metadata(
    args: argparse.Namespace, argv: Sequence[str] | None
) -> dict[str, Any]:
    """What a results file records besides the results."""
    if args.idle_connections or args.soak:
        names = [*args.idle_targets, *args.soak_targets]
    else:
        names = args.only
    tls = any(is_tls(t) or is_h2(t) for t in names)
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": [sys.argv[0], *(sys.argv[1:] if argv is None else argv)],
        "connections": args.connections,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "h2": {"clients": args.h2_clients, "streams": args.h2_streams},
        "workers": args.workers,
        "proxy_cpus": args.proxy_cpus,
        "load_cpus": args.load_cpus,
        "tls": TLS_SUMMARY if tls else None,
        "tls12_ciphers": TLS12_CIPHERS,
        "machine": machine(),
        "versions": {
            "wrk": tool_version("wrk"),
            "h2load": tool_version("h2load"),
            "nginx": tool_version("nginx"),
            "haproxy": tool_version("haproxy"),
            "openssl": tool_version("openssl"),
            **venv_versions(args.venv),
        },
        "idle_check": idle_check(args),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tables (or the idle/soak modes), print them, write the JSON.

    Exits 130 if interrupted, after reporting what was finished.
    """
    args = parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    if args.idle_connections:
        needed = idle.open_files_needed(args.idle_connections)
        if raise_open_files_limit(needed) < needed:
            raise SystemExit(
                f"--idle-connections {args.idle_connections} needs {needed} open "
                "files; the hard limit is lower (ulimit -Hn)"
            )
    meta = run_metadata(args, argv)
    rows: list[Row] = []
    idles: list[idle.IdleResult] = []
    soaks: list[soak.SoakResult] = []
    interrupted = False
    try:
        with session(args, args.idle_connections) as ctx:
            assert ctx.backend is not None
            meta["backend"] = ctx.backend.description
            meta["backend_kind"] = ctx.backend.kind
            for target in args.idle_targets if args.idle_connections else []:
                idles.append(idle.measure(ctx, target, args.idle_connections))
            for target in args.soak_targets if args.soak else []:
                soak.measure(ctx, target, args.soak, args.soak_interval, soaks)
            if not (args.idle_connections or args.soak):
                for target in args.only:
                    benchmark_target(ctx, target, rows)
    except KeyboardInterrupt:
        interrupted = True
        progress("interrupted; stopping every child process")
    meta["interrupted"] = interrupted
    if not (rows or idles or soaks):
        return 130 if interrupted else 1
    sections = []
    if rows:
        add_ratios(rows)
        sections.append(report(meta, rows))
        meta["results"] = [dataclasses.asdict(row) for row in rows]
    if idles or soaks:
        sections.append("\n".join(report_header(meta)))
    if idles:
        sections.append(idle.report(idles))
        meta["idle"] = [dataclasses.asdict(result) for result in idles]
    if soaks:
        sections += [soak.report(result) for result in soaks]
        meta["soak"] = [dataclasses.asdict(result) for result in soaks]
    print("\n\n".join(sections))
    print(f"\nJSON: {write_json(meta)}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
