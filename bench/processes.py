"""Child processes of the benchmark: starting, pinning, waiting for and stopping them.

Standard library only, like the rest of bench/: the harness runs with the
system ``python3``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

LOCALHOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0


class UnavailableError(Exception):
    """A target cannot be measured; the message becomes its row in the table."""


def progress(message: str) -> None:
    """Progress goes to stderr so stdout holds only the report."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Child:
    """A started process and the file that holds its stdout and stderr."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        """The process id (taskset execs its command, so it is the target's)."""
        return self.proc.pid

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
        self.workdir = workdir
        self._running: list[Child] = []
        self._counter = 0

    def start(self, name: str, argv: Sequence[str], cpus: str | None) -> Child:
        """Start ``argv`` pinned to ``cpus`` (a taskset list) with output to a file."""
        self._counter += 1
        log = self.workdir / f"{self._counter:02d}-{name}.log"
        if cpus is not None:
            argv = ["taskset", "-c", cpus, *argv]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
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


def reap(child: Child, timeout: float) -> tuple[int, float]:
    """Wait for ``child`` to exit; its exit status and the CPU seconds it used.

    ``os.wait4`` gives the one child's own resource usage, whatever else
    ends meanwhile. Raises ``subprocess.TimeoutExpired`` if it runs on.
    """
    deadline = time.monotonic() + timeout
    while exit_status(child.proc) is None:
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(child.name, timeout)
        time.sleep(0.02)
    if child.proc.returncode is not None:
        return child.proc.returncode, 0.0
    _, status, usage = os.wait4(child.proc.pid, 0)
    child.proc.returncode = os.waitstatus_to_exitcode(status)
    return child.proc.returncode, usage.ru_utime + usage.ru_stime


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


def raise_open_files_limit(needed: int) -> int:
    """Make RLIMIT_NOFILE at least ``needed``, for us and the children we start.

    Children inherit the limit, so raising it here before starting a proxy
    raises it for the proxy too. The soft limit goes up to the hard one; the
    hard one only if we may (root). Returns the soft limit now in force, which
    can be lower than ``needed``: the caller decides whether that is enough.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return needed
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target
