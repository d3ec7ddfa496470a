"""The load generators: wrk for HTTP/1.1, h2load for HTTP/2.

Both run as children pinned to the load cores, for a whole number of
seconds, and come back as the same ``LoadResult``: requests completed, the
time they took, latency percentiles, errors by kind and the CPU the
generator itself used.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from processes import Child, Children, UnavailableError, reap

BENCH_DIR = Path(__file__).resolve().parent
WRK_SCRIPT = BENCH_DIR / "wrk_report.lua"
# What a generator may take beyond its duration to start, connect and report.
FINISH_GRACE = 60.0


@dataclasses.dataclass(frozen=True)
class Load:
    """How to drive a target.

    ``streams`` 0 means wrk (HTTP/1.1, one request at a time per
    connection); otherwise h2load with ``connections`` clients, each with up
    to ``streams`` concurrent streams, ALPN ``h2`` only.
    """

    url: str
    connections: int
    cpus: str
    streams: int = 0
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def tool(self) -> str:
        """``wrk`` or ``h2load``."""
        return "h2load" if self.streams else "wrk"

    @property
    def label(self) -> str:
        """``c=50`` for wrk, ``c=10 m=10`` for h2load."""
        return f"c={self.connections}" + (f" m={self.streams}" if self.streams else "")


@dataclasses.dataclass
class LoadResult:
    """What one run of a load generator reported."""

    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]
    cpu_s: float
    protocol: str = "http/1.1"

    @property
    def rps(self) -> float:
        """Completed requests per second of measured time."""
        return self.requests / self.seconds if self.seconds else 0.0


@dataclasses.dataclass
class Started:
    """A load generator running; ``finish_load`` waits for its result."""

    load: Load
    seconds: float
    child: Child
    log_file: Path | None = None


def start_load(children: Children, load: Load, seconds: float) -> Started:
    """Start wrk or h2load for ``seconds`` (whole seconds) without waiting."""
    if shutil.which(load.tool) is None:
        raise UnavailableError(f"{load.tool} is not installed")
    if load.streams:
        return _start_h2load(children, load, seconds)
    argv = [
        "wrk",
        "-t1",
        f"-c{load.connections}",
        f"-d{seconds:g}s",
        "--latency",
        "-s",
        str(WRK_SCRIPT),
    ]
    for name, value in load.headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(load.url)
    child = children.start(f"wrk-c{load.connections}", argv, load.cpus)
    return Started(load, seconds, child)


def _start_h2load(children: Children, load: Load, seconds: float) -> Started:
    name = f"h2load-c{load.connections}-m{load.streams}"
    fd, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".tsv", dir=children.workdir)
    os.close(fd)
    log_file = Path(path)
    argv = ["h2load", "-t1", f"-c{load.connections}", f"-m{load.streams}"]
    argv += ["-D", f"{seconds:g}", "--npn-list=h2", f"--log-file={log_file}"]
    for header, value in load.headers.items():
        argv += ["-H", f"{header}: {value}"]
    argv.append(load.url)
    return Started(load, seconds, children.start(name, argv, load.cpus), log_file)


def finish_load(children: Children, started: Started) -> LoadResult:
    """Wait for the generator and read its report."""
    child = started.child
    try:
        status, cpu_s = reap(child, started.seconds + FINISH_GRACE)
    except subprocess.TimeoutExpired:
        raise UnavailableError(f"{started.load.tool} did not finish in time") from None
    finally:
        children.stop(child)
    output = child.log.read_text(errors="replace")
    if started.log_file is not None:
        try:
            return _h2load_result(output, status, cpu_s, started.log_file)
        finally:
            started.log_file.unlink(missing_ok=True)
    return _wrk_result(output, status, cpu_s, child)


def run_load(children: Children, load: Load, seconds: float) -> LoadResult:
    """Run a load generator to completion."""
    return finish_load(children, start_load(children, load, seconds))


def _wrk_result(output: str, status: int, cpu_s: float, child: Child) -> LoadResult:
    """The JSON line wrk_report.lua's ``done()`` hook prints."""
    match = re.search(r"^BENCH_JSON (.*)$", output, re.MULTILINE)
    if status != 0 or not match:
        raise UnavailableError(f"wrk failed (status {status}): {child.last_line()}")
    raw = json.loads(match.group(1))
    return LoadResult(
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        errors={
            key: raw[key] for key in ("connect", "read", "write", "timeout", "status")
        },
        cpu_s=cpu_s,
    )


H2LOAD_FINISHED = re.compile(r"^finished in ([\d.]+)(m?s),", re.MULTILINE)
H2LOAD_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
    r"(\d+) failed, (\d+) errored, (\d+) timeout",
    re.MULTILINE,
)
H2LOAD_PROTOCOL = re.compile(r"^Application protocol: (\S+)", re.MULTILINE)


def _h2load_result(output: str, status: int, cpu_s: float, log: Path) -> LoadResult:
    """h2load's summary for the counts; its per-request log for the percentiles.

    h2load prints only min/mean/max latency; ``--log-file`` has one line per
    completed request (start time, status, microseconds to the end of the
    response). In its counts, ``failed`` holds ``errored`` (network-level
    failures, timeouts included) and answers that were not 2xx or 3xx.
    """
    finished = H2LOAD_FINISHED.search(output)
    counts = H2LOAD_REQUESTS.search(output)
    protocol = H2LOAD_PROTOCOL.search(output)
    if status != 0 or not finished or not counts:
        said = [line for line in output.splitlines() if line.strip()]
        raise UnavailableError(
            f"h2load failed (status {status}): {said[-1] if said else 'no output'}"
        )
    if protocol is None or protocol.group(1) != "h2":
        raise UnavailableError(
            "h2load did not get h2 by ALPN "
            f"({protocol.group(1) if protocol else 'no protocol negotiated'})"
        )
    seconds = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    done, failed, errored = (int(counts.group(i)) for i in (3, 5, 6))
    micros = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines())
    return LoadResult(
        requests=done,
        seconds=seconds,
        p50_ms=percentile(micros, 50) / 1000,
        p90_ms=percentile(micros, 90) / 1000,
        p99_ms=percentile(micros, 99) / 1000,
        max_ms=(micros[-1] if micros else 0) / 1000,
        errors={"errored": errored, "status": failed - errored},
        cpu_s=cpu_s,
        protocol="h2",
    )


def percentile(ordered: list[int], percent: float) -> float:
    """Nearest-rank percentile of an ascending list; 0 for an empty one."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return float(ordered[rank - 1])
