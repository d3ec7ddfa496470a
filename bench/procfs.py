"""What /proc says about the processes and cores under test: CPU, memory, fds.

Every figure about a proxy is summed over its whole process tree (an NGINX
master and its workers, an l7lb supervisor and its workers), found again at
each reading, so that workers started or replaced along the way count too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces).

    Index ``i`` is field ``i + 3`` of proc(5): 1 is the parent, 11 and 12
    utime and stime, 13 and 14 the children's (cutime, cstime).
    """
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
    """CPU time of every process in the tree, in clock ticks.

    Each process counts its own utime + stime and what its reaped children
    used (cutime + cstime), so that a worker which exits between two
    snapshots still counts: its time moves into its parent's figure.
    """
    ticks = {}
    for pid in process_tree(root):
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        ticks[pid] = sum(int(field) for field in fields[11:15])
    return ticks


def cpu_seconds_between(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU time a process tree used between two ``cpu_ticks`` snapshots.

    The difference of the totals: a process started in between counts whole,
    one that ended was already moved into its parent's children's time.
    """
    return (sum(after.values()) - sum(before.values())) / CLOCK_TICKS


def _status_kib(pids: Iterable[int], field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM), summed over ``pids``."""
    pattern = re.compile(rf"^{field}:\s+(\d+) kB", re.MULTILINE)
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = pattern.search(status)
        if match:
            total += int(match.group(1))
    return total


def peak_rss_mib(root: int) -> float:
    """Sum of VmHWM (each process's own peak resident size) over the tree."""
    return _status_kib(process_tree(root), "VmHWM") / 1024


def rss_mib(root: int) -> float:
    """Sum of VmRSS (resident size now) over the tree.

    Pages that forked workers share with their parent count once per
    process, as in ``ps``; the sum is what the tree would need unshared.
    """
    return _status_kib(process_tree(root), "VmRSS") / 1024


def open_fds(root: int) -> int:
    """File descriptors open in the tree now (entries of /proc/<pid>/fd)."""
    total = 0
    for pid in process_tree(root):
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return total


class Sockets(NamedTuple):
    """A process tree's TCP connections, by the port at either end."""

    clients: int
    backends: int


def tcp_sockets(root: int, listen_port: int, backend_ports: Iterable[int]) -> Sockets:
    """Connections open in the tree: accepted on ``listen_port``, or to a backend.

    Descriptors name sockets by inode (``socket:[1234]``); /proc/net/tcp
    gives each inode's ports (hexadecimal). Listening sockets are left out.
    """
    backends = set(backend_ports)
    ends: dict[str, tuple[int, int]] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{root}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                continue
            local, remote = (int(f.rpartition(":")[2], 16) for f in fields[1:3])
            ends[fields[9]] = (local, remote)
    clients = to_backends = 0
    for pid in process_tree(root):
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if not target.startswith("socket:["):
                continue
            local, remote = ends.get(target[len("socket:[") : -1], (0, 0))
            clients += local == listen_port
            to_backends += remote in backends
    return Sockets(clients, to_backends)


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


def cpu_list(cpus: Iterable[int]) -> str:
    """The taskset spelling of a set of CPUs: ``0,1``."""
    return ",".join(str(cpu) for cpu in sorted(set(cpus)))
