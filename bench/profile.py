"""Where l7lb spends its time under load: py-spy samples, summed per function.

Starts the backends and one target the way bench/run.py does (pinned,
generated configuration), warms it up, puts it under wrk (h2load for
``l7lb-h2``) and records it with ``py-spy record --format raw`` for
``--duration`` seconds at ``--rate`` samples a second. Then it prints the
functions with the most samples of their own (self time) and the most
samples anywhere on the stack (inclusive time), and with ``--svg`` writes a
flame graph.

    python3 bench/profile.py [--target l7lb] [--duration 10] [--rate 100]
                             [--connections 50] [--svg FILE] [--raw FILE]

py-spy is looked for in bench/.venv, then in the l7lb venv, then on PATH:
``python3 -m venv bench/.venv && bench/.venv/bin/pip install -r
bench/requirements.txt``. To profile a working tree rather than the copy
installed in the venv, run with ``PYTHONPATH=/path/to/tree``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import html
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType

import tables
from load import finish_load, run_load, start_load
from processes import UnavailableError, progress, reap
from procfs import cpu_seconds_between, cpu_ticks, parse_cpu_list, process_tree
from targets import (
    POLICIES,
    default_cpus,
    is_h2,
    running,
    session,
    venv_versions,
)

BENCH_DIR = Path(__file__).resolve().parent
PYTHON_TARGETS = ("l7lb", *POLICIES, "l7lb-tls", "l7lb-h2", "twisted-proxy")
# The load runs this much longer than the recording, which starts this much
# after the load does: py-spy only ever sees the target under full load.
LOAD_LEAD = 1.0
LOAD_TAIL = 2.0

Stacks = dict[tuple[str, ...], int]


# --------------------------------------------------------------------------
# Recording


def find_py_spy(args: argparse.Namespace) -> str:
    """``--py-spy``, else bench/.venv's, else the l7lb venv's, else PATH's."""
    if args.py_spy:
        return str(args.py_spy)
    for venv in (BENCH_DIR / ".venv", Path(args.venv)):
        candidate = venv / "bin" / "py-spy"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("py-spy")
    if found is None:
        raise SystemExit(
            "py-spy not found: python3 -m venv bench/.venv && "
            "bench/.venv/bin/pip install -r bench/requirements.txt "
            "(or pass --py-spy PATH)"
        )
    return found


def record(args: argparse.Namespace, py_spy: str) -> tuple[list[str], Stacks]:
    """Run the target under load with py-spy attached: facts for the report, stacks.

    py-spy's raw output is written in the run's directory, or to ``--raw``.
    """
    with session(args) as ctx, running(ctx, args.target) as run:
        assert run.child is not None
        pid = run.child.pid
        streams = args.h2_streams if is_h2(args.target) else 0
        connections = args.h2_clients if streams else args.connections
        load = run.load(connections, args.load_cpus, streams)
        progress(f"{args.target}: warm-up {args.warmup}s under {load.tool}")
        run_load(ctx.children, load, args.warmup)
        started = start_load(ctx.children, load, args.duration + LOAD_LEAD + LOAD_TAIL)
        time.sleep(LOAD_LEAD)
        processes = len(process_tree(pid))
        raw = args.raw or ctx.workdir / "py-spy.txt"
        argv = [py_spy, "record", "--pid", str(pid), "--format", "raw"]
        argv += ["--output", str(raw), "--duration", str(args.duration)]
        argv += ["--rate", str(args.rate)]
        argv += [] if args.lines else ["--function"]
        argv += ["--subprocesses"] if processes > 1 else []
        argv += ["--nonblocking"] if args.nonblocking else []
        progress(f"{args.target}: recording {args.duration}s at {args.rate} Hz")
        cpu_before, clock = cpu_ticks(pid), time.monotonic()
        spy = ctx.children.start("py-spy", argv, args.load_cpus)
        try:
            status, _ = reap(spy, args.duration + 60)
        except subprocess.TimeoutExpired:
            raise UnavailableError("py-spy did not finish in time") from None
        used = cpu_seconds_between(cpu_before, cpu_ticks(pid))
        wall = time.monotonic() - clock
        result = finish_load(ctx.children, started)
        if status != 0 or not raw.exists():
            raise UnavailableError(
                f"py-spy failed (status {status}): {spy.last_line()}"
            )
        stacks = read_stacks(raw)
    facts = [
        f"target: {args.target} ({run.note or 'default configuration'}), "
        f"{processes} process(es) on CPU {args.proxy_cpus}",
        f"load: {load.tool} {load.label} on CPU {args.load_cpus}: "
        f"{result.rps:,.0f} req/s, p99 {result.p99_ms:.2f} ms over the whole load "
        "run (sampling slows the target a little)",
        f"{args.target} used {100 * used / wall:.0f}% of a core while recorded",
    ]
    return facts, stacks


# --------------------------------------------------------------------------
# Reading py-spy's raw output


def read_stacks(raw: Path) -> Stacks:
    """``frame;frame;...;frame count`` lines, outermost frame first.

    With ``--subprocesses`` py-spy puts a ``process ...`` frame at the root
    of each stack; it is dropped, so that workers add up per function.
    """
    stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = tuple(stack.split(";"))
        if frames[0].startswith("process "):
            frames = frames[1:]
        if frames:
            stacks[frames] += int(count)
    return dict(stacks)


def self_and_inclusive(
    stacks: Stacks,
) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Samples per function: on top of the stack, and anywhere on it (once)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for frames, count in stacks.items():
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return own, inclusive


def package(frame: str) -> str:
    """``twisted`` for ``doRead (twisted/internet/tcp.py:243)``; the file if bare."""
    where = frame.rpartition(" (")[2].rstrip(")")
    path = where.rpartition(":")[0] or where
    return path.split("/", 1)[0] if "/" in path else path


def top_table(
    first: collections.Counter[str],
    second: collections.Counter[str],
    names: tuple[str, str],
    total: int,
    count: int,
) -> str:
    """The ``count`` functions with most ``first`` samples, with ``second`` beside."""
    lines = [
        [
            f"{100 * first[frame] / total:.1f}",
            f"{100 * second[frame] / total:.1f}",
            str(first[frame]),
            frame,
        ]
        for frame, _ in first.most_common(count)
    ]
    header = (f"{names[0]} %", f"{names[1]} %", "samples", "function (file:line)")
    return tables.render(header, lines, left=(3,))


def report(facts: Sequence[str], stacks: Stacks, args: argparse.Namespace) -> str:
    """The facts of the run, then the two top lists and a package summary."""
    total = sum(stacks.values())
    if not total:
        return "\n".join([*facts, "py-spy recorded no busy samples"])
    own, inclusive = self_and_inclusive(stacks)
    packages: collections.Counter[str] = collections.Counter()
    for frame, count in own.items():
        packages[package(frame)] += count
    expected = args.rate * args.duration
    # Frames on every stack (twistd's start-up, the reactor's loop) would head
    # the inclusive list at 100% and say nothing.
    trunk = [frame for frame, count in inclusive.items() if count == total]
    branches = collections.Counter(
        {frame: count for frame, count in inclusive.items() if count < total}
    )
    out = [
        *facts,
        f"py-spy {args.rate} Hz for {args.duration} s: {total} samples with the "
        f"target busy (of ~{expected} taken per process; idle ones are left out)",
        "",
        f"top {args.top} by self time (samples with the function on top of the stack)",
        top_table(own, inclusive, ("self", "incl"), total, args.top),
        "",
        f"top {args.top} by inclusive time (samples with the function anywhere "
        f"on the stack; the {len(trunk)} on every stack left out)",
        top_table(branches, own, ("incl", "self"), total, args.top),
        "",
        "self time by package",
        tables.render(
            ("package", "self %", "samples"),
            [
                [name, f"{100 * count / total:.1f}", str(count)]
                for name, count in packages.most_common(12)
            ],
        ),
        "",
        "% = share of the busy samples; line numbers are each function's first "
        "line" + (" (--lines: the line running)" if args.lines else "") + ".",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------
# Flame graph


FRAME_HEIGHT = 16
WIDTH = 1200
PAD = 10
TITLE_SPACE = 30
CHAR_WIDTH = 6.5  # of 11px Verdana, near enough to decide what label fits


class Node:
    """Samples at and under one frame of the merged stacks."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.samples = 0
        self.children: dict[str, Node] = {}

    @property
    def depth(self) -> int:
        """Frames in the deepest stack through here, this one included."""
        return 1 + max((child.depth for child in self.children.values()), default=0)


def merge(stacks: Stacks) -> Node:
    """One tree of frames, the root standing for all samples."""
    root = Node("all")
    for frames, count in stacks.items():
        root.samples += count
        node = root
        for frame in frames:
            node = node.children.setdefault(frame, Node(frame))
            node.samples += count
    return root


def _colour(name: str) -> str:
    """A warm colour that stays the same for a function across graphs."""
    digest = hashlib.blake2b(name.encode(), digest_size=3).digest()
    return f"rgb({205 + digest[0] % 50},{digest[1] % 230},{digest[2] % 55})"


def _rects(
    node: Node, x: float, level: int, scale: float, bottom: float
) -> Iterable[str]:
    """SVG for ``node`` and its children, children above their parent."""
    width = node.samples * scale
    if width < 0.3:
        return
    y = bottom - (level + 1) * FRAME_HEIGHT
    name = html.escape(node.name)
    share = 100 * width / (WIDTH - 2 * PAD)
    chars = int((width - 6) / CHAR_WIDTH)
    label = node.name if len(node.name) <= chars else node.name[: chars - 2] + ".."
    text = (
        f'<text x="{x + 3:.1f}" y="{y + 11.5:.1f}">{html.escape(label)}</text>'
        if chars >= 3
        else ""
    )
    yield (
        f"<g><title>{name} ({node.samples} samples, {share:.2f}%)</title>"
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" '
        f'height="{FRAME_HEIGHT - 1}" fill="{_colour(node.name)}" rx="2"/>'
        f"{text}</g>"
    )
    for child in sorted(node.children.values(), key=lambda child: child.name):
        yield from _rects(child, x, level + 1, scale, bottom)
        x += child.samples * scale


def flamegraph_svg(stacks: Stacks, title: str) -> str:
    """A static flame graph: width is samples, hover a frame for its figures."""
    root = merge(stacks)
    height = TITLE_SPACE + root.depth * FRAME_HEIGHT + 2 * PAD
    scale = (WIDTH - 2 * PAD) / root.samples if root.samples else 0.0
    body = "\n".join(_rects(root, PAD, 0, scale, height - PAD))
    return f"""<?xml version="1.0" standalone="no"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" \
viewBox="0 0 {WIDTH} {height}" font-family="Verdana, sans-serif" font-size="11">
<rect width="100%" height="100%" fill="#f8f8f0"/>
<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="15">\
{html.escape(title)}</text>
{body}
</svg>
"""


# --------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Options; the set-up ones mean what they mean for bench/run.py."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--target", choices=PYTHON_TARGETS, default="l7lb")
    parser.add_argument("--duration", type=int, default=10, help="seconds recorded")
    parser.add_argument("--rate", type=int, default=100, help="samples a second")
    parser.add_argument("--warmup", type=int, default=2, help="seconds")
    parser.add_argument("--connections", type=int, default=50, help="wrk -c")
    parser.add_argument("--h2-clients", type=int, default=10, help="h2load -c")
    parser.add_argument("--h2-streams", type=int, default=10, help="h2load -m")
    parser.add_argument("--top", type=int, default=25, help="functions listed")
    parser.add_argument("--svg", type=Path, help="write a flame graph here")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw output here")
    parser.add_argument(
        "--lines",
        action="store_true",
        help="count per line running, not per function",
    )
    parser.add_argument(
        "--nonblocking",
        action="store_true",
        help="do not pause the target for each sample (py-spy --nonblocking)",
    )
    parser.add_argument("--py-spy", help="the py-spy executable")
    parser.add_argument("--workers", type=int, default=1, help="l7lb workers")
    parser.add_argument(
        "--venv",
        default=str(BENCH_DIR.parent / ".venv"),
        help="venv with l7lb installed",
    )
    parser.add_argument(
        "--backend", choices=("auto", "nginx", "python"), default="auto"
    )
    parser.add_argument("--proxy-cpus", help="taskset list (as for bench/run.py)")
    parser.add_argument("--load-cpus", help="taskset list (wrk, backends, py-spy)")
    args = parser.parse_args(argv)
    # py-spy runs in the run's temporary directory: give it an absolute path.
    args.raw = args.raw and args.raw.resolve()
    args.venv = str(Path(args.venv).resolve())
    for option in ("duration", "rate", "warmup", "connections", "top", "workers"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1")
    allowed = os.sched_getaffinity(0)
    proxy, load = default_cpus(args.workers, allowed)
    args.proxy_cpus = args.proxy_cpus or proxy
    args.load_cpus = args.load_cpus or load
    for option in ("proxy_cpus", "load_cpus"):
        try:
            cpus = set(parse_cpu_list(getattr(args, option)))
        except ValueError:
            parser.error(f"--{option.replace('_', '-')}: not a CPU list")
        if not cpus <= allowed:
            parser.error(f"--{option.replace('_', '-')}: CPUs available: {allowed}")
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM and SIGHUP stop every child, as Ctrl-C does."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    """Record, print the top functions, write the flame graph if asked."""
    args = parse_args(argv)
    py_spy = find_py_spy(args)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    versions = venv_versions(args.venv)
    try:
        facts, stacks = record(args, py_spy)
    except UnavailableError as e:
        print(f"profile failed: {e}", file=sys.stderr)
        return 1
    facts.insert(
        0,
        f"l7lb {versions.get('l7lb', '?')} from {versions.get('l7lb_code', '?')}, "
        f"Python {versions.get('python', '?')}, Twisted {versions.get('twisted', '?')}",
    )
    print(report(facts, stacks, args))
    if args.raw:
        print(f"\nraw: {args.raw}")
    if args.svg:
        title = f"{args.target}: {sum(stacks.values())} samples at {args.rate} Hz"
        args.svg.write_text(flamegraph_svg(stacks, title))
        print(f"flame graph: {args.svg}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
