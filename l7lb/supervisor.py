# -*- test-case-name: tests.test_workers -*-
"""
C{[lb] workers = N}: the supervisor, in the twistd process, and its N
worker processes (L{l7lb.worker}).

The supervisor opens every listening socket itself and hands the same
sockets to every worker (their descriptors, inherited at spawn), so the
workers accept from one queue per listener: a worker that stops or dies
leaves the connections waiting there to the others. It starts the workers,
starts another in place of one that exits unexpectedly (at once, then with
a growing delay while they keep dying young), validates the file before it
passes SIGHUP on, and at SIGTERM passes it on and waits for the workers to
drain. When a reload changes the listeners or the number of workers, a new
generation of workers starts on the new set of sockets, and the old one is
told to stop (and drains) once every new worker serves.

It serves the C{[admin]} API itself (L{l7lb.fleetadmin.FleetAdmin}), from the
workers' private ones: each worker's is on a unix socket in a directory
that only the supervisor's user may enter (no token there). The runtime
state is validated and saved once, by the supervisor, then sent to every
worker; a worker started later reads the supervisor's copy.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
from collections import Counter
from io import BytesIO
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import ProcessProtocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.server import Site
from zope.interface import implementer

import l7lb
from l7lb.config import Config, ConfigError, read_text
from l7lb.fleetadmin import FleetAdmin
from l7lb.health import quiet_pool
from l7lb.service import ListenerService, ListenFailed, _within, listen_endpoint
from l7lb.state import RuntimeState, save_state
from l7lb.worker import FIRST_LISTENER_FD, READY_FD

log = Logger()

# A worker that ran this long before it exited was not crash-looping.
STABLE_AFTER = 10.0
# Beyond drain_timeout, what a stopping worker gets to close and flush
# before it is killed.
STOP_MARGIN = 5.0
# How long the supervisor waits for a worker's private admin API.
ASK_TIMEOUT = 5.0
# Workers that die this many times in every place before any has ever
# served mean l7lb cannot start (a log file it may not open, say).
START_ATTEMPTS = 3


def restart_delay(quick_exits: int) -> float:
    """
    How long to wait before starting a worker again, after C{quick_exits}
    exits in a row of workers in its place that died young: none for the
    first, then 0.5 s doubling up to 30 s, so a crash loop costs little.
    """
    if quick_exits <= 1:
        return 0.0
    return float(min(30.0, 0.5 * 2 ** (quick_exits - 2)))


def listener_keys(config: Config) -> tuple[tuple[str, str], ...]:
    """
    The listening sockets a configuration asks for: (kind, listen string).
    """
    return tuple(("http", d) for d in config.lb.listen) + tuple(
        ("tls", d) for d in config.lb.tls_listen
    )


def _worker_environment() -> dict[str, str]:
    """
    The supervisor's environment, plus the directory this l7lb was imported
    from when a worker would not find it there (a checkout found through the
    working directory), so that every worker runs the very code the
    supervisor runs, and never a checkout that happens to be where it runs.
    """
    environment = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(l7lb.__file__)))
    # A worker runs with -P: its path is this one without the first entry
    # (the script's directory, or the working directory for python -m).
    if root not in {os.path.abspath(p) for p in sys.path[1:] if p}:
        environment["PYTHONPATH"] = os.pathsep.join(
            p for p in (root, environment.get("PYTHONPATH")) if p
        )
    return environment


class _NoConnections(ServerFactory):
    """
    The factory of the supervisor's own listening ports, which never accept
    (the workers do).
    """

    noisy = False

    def buildProtocol(self, addr: Any) -> None:
        return None


@implementer(IAgentEndpointFactory)
class _UNIXEndpoints:
    def __init__(self, reactor: Any, path: str) -> None:
        self.reactor = reactor
        self.path = path

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(self.reactor, self.path, timeout=ASK_TIMEOUT)


class WorkerProcess(ProcessProtocol):
    """
    One worker process as the supervisor sees it. C{worker} is its number
    (C{"1"} to C{"N"}), which a worker started in its place takes over;
    C{generation} counts the sets of listeners the supervisor has served.
    """

    def __init__(
        self,
        supervisor: Supervisor,
        worker: str,
        serial: int,
        generation: int,
        admin_path: str,
    ) -> None:
        self.supervisor = supervisor
        self.worker = worker
        self.serial = serial
        self.generation = generation
        self.admin_path = admin_path
        self.pid: int | None = None
        self.started = supervisor.reactor.seconds()
        self.ready = False
        # Told to stop: its exit is expected.
        self.retiring = False
        self.state_version = supervisor.state_version
        self.config_version = supervisor.config_version
        self.ended = False
        self._waiting: list[Deferred[None]] = []
        self._announced = b""
        self._agent = Agent.usingEndpointFactory(
            supervisor.reactor,
            _UNIXEndpoints(supervisor.reactor, admin_path),
            quiet_pool(supervisor.reactor, persistent=False),
        )

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != READY_FD or self.ready:
            return
        self._announced += data
        if b"ready\n" in self._announced:
            self.ready = True
            self.supervisor.worker_ready(self)

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        self.supervisor.worker_exited(self, reason)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def when_ended(self) -> Deferred[None]:
        """
        Fires when the process has ended (a Deferred of its own, which the
        caller may cancel).
        """
        if self.ended:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def signal(self, name: str) -> None:
        if self.ended or self.transport is None:
            return
        with contextlib.suppress(ProcessExitedAlready, OSError):
            self.transport.signalProcess(name)

    def ask(
        self, method: bytes, path: str, body: bytes | None = None
    ) -> Deferred[tuple[int, bytes]]:
        """
        A request to this worker's private admin API: its status and body,
        or status 0 and why there is none.
        """
        producer = None if body is None else FileBodyProducer(BytesIO(body))
        d = self._agent.request(
            method, b"http://worker" + path.encode(), Headers(), producer
        )

        def read(response: Any) -> Deferred[tuple[int, bytes]]:
            code: int = response.code
            return readBody(response).addCallback(lambda raw: (code, raw))

        def failed(failure: Failure) -> tuple[int, bytes]:
            return 0, f"no answer: {failure.getErrorMessage()}".encode()

        answer: Deferred[tuple[int, bytes]] = d.addCallback(read)
        answer.addTimeout(ASK_TIMEOUT, self.supervisor.reactor)
        return answer.addErrback(failed)


class Supervisor(MultiService):
    """
    The twistd service of C{[lb] workers = N} (see the module's docstring).
    Its children are the admin API's listener, when C{[admin]} asks for one.
    """

    exit_on_listen_failure = False

    def __init__(
        self,
        reactor: Any,
        config: Config,
        state: RuntimeState | None = None,
        executable: str = sys.executable,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        # Absolute: the workers must find it whatever their directory.
        self.config_path = os.path.abspath(config.source)
        self.state = state or RuntimeState()
        self.executable = executable
        self.sockets: dict[tuple[str, str], IListeningPort] = {}
        self.processes: list[WorkerProcess] = []
        self.generation = 0
        self.restarts = 0
        self.state_version = 0
        self.config_version = 0
        # The configuration's text as last accepted (None: not read yet).
        self.text: str | None = None
        # Whether a worker has served yet: until one has, workers that keep
        # failing mean l7lb cannot start at all.
        self.served = False
        self.directory: str | None = None
        self.admin: ListenerService | None = None
        self.stopping = False
        self._wanted: tuple[tuple[str, str], ...] = ()
        self._count = max(1, config.lb.workers)
        self._serials = itertools.count(1)
        self._quick_exits: Counter[str] = Counter()
        self._pending: dict[str, IDelayedCall] = {}
        self._environment = _worker_environment()

    # Starting.

    def startService(self) -> None:
        try:
            # What the workers will run: this text, validated, whatever the
            # file says later until a reload accepts it.
            self.text = read_text(self.config_path)
            self.config = self.state.config(self.config_path, self.text)
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"l7lb: cannot read {self.config_path}: {e}") from None
        except ConfigError as e:
            raise SystemExit("\n".join(e.problems)) from None
        self.directory = tempfile.mkdtemp(
            prefix="l7lb-workers-", dir=os.environ.get("RUNTIME_DIRECTORY") or None
        )
        self._write_private_state()
        self._write_private("secret", os.urandom(32).hex().encode())
        self._write_private("config.ini", self.text.encode("utf-8"))
        problems = [p for key in listener_keys(self.config) if (p := self._open(key))]
        if not problems:
            self._sync_admin()
            try:
                super().startService()
            except ListenFailed as e:
                problems.append(str(e))
        if problems:
            self._close_sockets(set(self.sockets))
            self._remove_directory()
            if self.exit_on_listen_failure:
                # twistd prints this line and exits 1, without a traceback.
                raise SystemExit(f"l7lb: {problems[0]}")
            raise ListenFailed(problems[0])
        self._wanted = listener_keys(self.config)
        self.generation = 1
        log.info(
            "starting {count} worker processes (python -m l7lb.worker)",
            count=self._count,
        )
        # Processes are spawned once the reactor runs (and reaps children).
        self.reactor.callWhenRunning(self._spawn_all)

    def _path(self, name: str) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, name)

    def _write_private_state(self) -> None:
        save_state(self._path("state.json"), self.state)

    def _write_private(self, name: str, content: bytes) -> None:
        """
        Replace a file of the private directory at once (write, rename):
        readable by l7lb's user only.
        """
        path = self._path(name)
        fd = os.open(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(path + ".new", path)

    def _open(self, key: tuple[str, str]) -> str | None:
        """
        Open a listening socket for the workers; a problem when it cannot
        be opened. Its backlog, interface and the like are the endpoint
        string's, as when one process serves.
        """
        description = key[1]
        ports: list[IListeningPort] = []
        failures: list[Failure] = []
        d = listen_endpoint(self.reactor, description).listen(_NoConnections())
        d.addCallbacks(ports.append, failures.append)
        if failures:
            problem = f"cannot listen on {description}: {failures[0].getErrorMessage()}"
            log.error("{problem}", problem=problem)
            return problem
        (port,) = ports
        # The workers accept; the supervisor only holds the socket open.
        port.stopReading()  # type: ignore[attr-defined]
        self.sockets[key] = port
        log.info(
            "listening on {description} ({address}) for the workers",
            description=description,
            address=port.getHost(),
        )
        return None

    def _close_sockets(self, keys: set[tuple[str, str]]) -> list[Deferred[None]]:
        closing = []
        for key in keys:
            port = self.sockets.pop(key)
            d = port.stopListening()
            if d is not None:
                closing.append(d)
        return closing

    def _sync_admin(self) -> None:
        """
        Serve the admin API where the configuration says; a new address is
        opened before the old one closes, so a failure keeps the old one.
        """
        admin = self.config.admin
        listen = admin.listen if admin is not None else None
        old = self.admin
        if old is not None and old.description == listen:
            return
        if listen is not None:
            site = Site(FleetAdmin(self))
            site.noisy = False
            site.displayTracebacks = False
            endpoint = listen_endpoint(self.reactor, listen)
            listener = ListenerService(endpoint, site, listen)
            try:
                listener.setServiceParent(self)
            except ListenFailed:
                self.removeService(listener)
                raise
            self.admin = listener
        else:
            self.admin = None
        if old is not None:
            old.disownServiceParent()
            log.info("stopped listening on {description}", description=old.description)

    def _spawn_all(self) -> None:
        for number in range(1, self._count + 1):
            self._spawn(str(number))

    def _spawn(self, worker: str) -> None:
        self._pending.pop(worker, None)
        if self.stopping:
            return
        serial = next(self._serials)
        admin_path = self._path(f"worker-{serial}.sock")
        process = WorkerProcess(self, worker, serial, self.generation, admin_path)
        fds: dict[int, int | str] = {0: "w", 1: 1, 2: 2, READY_FD: "r"}
        args = [
            self.executable,
            "-P",  # not the working directory: see _worker_environment
            "-m",
            "l7lb.worker",
            "--config",
            self.config_path,
            "--config-text",
            self._path("config.ini"),
            "--state",
            self._path("state.json"),
            "--secret-file",
            self._path("secret"),
            "--admin",
            "unix:{}:mode=600".format(admin_path.replace(":", "\\:")),
            "--worker",
            worker,
            "--workers",
            str(self._count),
        ]
        child = FIRST_LISTENER_FD
        for key in self._wanted:
            port = self.sockets.get(key)
            if port is None:
                continue
            fds[child] = port.fileno()  # type: ignore[attr-defined]
            args += ["--listener", f"{child}:{key[1]}"]
            child += 1
        self.processes.append(process)
        self.reactor.spawnProcess(
            process, self.executable, args, env=self._environment, childFDs=fds
        )

    # Workers coming and going.

    def worker_ready(self, process: WorkerProcess) -> None:
        self.served = True
        log.info(
            "worker {worker} (pid {pid}) serves, {seconds:.3f}s after it was started",
            worker=process.worker,
            pid=process.pid,
            seconds=self.reactor.seconds() - process.started,
        )
        if process.retiring:
            process.signal("TERM")
            return
        if process.state_version != self.state_version:
            self._send_state([process])
        if process.config_version != self.config_version:
            process.config_version = self.config_version
            process.signal("HUP")
        self._maybe_retire_older()

    def _maybe_retire_older(self) -> None:
        """
        Once every worker of the newest generation serves, the older ones
        stop (and drain), and the sockets only they used close.
        """
        newest = [
            p
            for p in self.processes
            if p.generation == self.generation and not p.retiring
        ]
        if sum(1 for p in newest if p.ready) < self._count:
            return
        older = [
            p
            for p in self.processes
            if p.generation < self.generation and not p.retiring
        ]
        for process in older:
            process.retiring = True
            process.signal("TERM")
        if older:
            log.info(
                "the workers of generation {generation} serve; "
                "the {count} older ones are stopping",
                generation=self.generation,
                count=len(older),
            )
        gone = {key for key in self.sockets if key not in self._wanted}
        for key in gone:
            log.info("stopped listening on {description}", description=key[1])
        self._close_sockets(gone)

    def worker_exited(self, process: WorkerProcess, reason: Failure) -> None:
        if process in self.processes:
            self.processes.remove(process)
        # A worker killed outright leaves its private socket behind.
        for leftover in (process.admin_path, process.admin_path + ".lock"):
            with contextlib.suppress(OSError):
                os.unlink(leftover)
        how = _how_it_ended(reason)
        if process.retiring or self.stopping:
            log.info(
                "worker {worker} (pid {pid}) {how}",
                worker=process.worker,
                pid=process.pid,
                how=how,
            )
            return
        if process.generation < self.generation:
            # Its place is the newer generation's already.
            log.warn(
                "worker {worker} (pid {pid}) of an older generation {how}",
                worker=process.worker,
                pid=process.pid,
                how=how,
            )
            return
        lived = self.reactor.seconds() - process.started
        worker = process.worker
        if lived < STABLE_AFTER:
            self._quick_exits[worker] += 1
        else:
            self._quick_exits[worker] = 1
        if not self.served and all(
            self._quick_exits[str(n)] >= START_ATTEMPTS
            for n in range(1, self._count + 1)
        ):
            self._cannot_start(process, how)
            return
        delay = restart_delay(self._quick_exits[worker])
        self.restarts += 1
        log.error(
            "worker {worker} (pid {pid}) {how} after {lived:.1f}s; "
            "starting another in {delay}s",
            worker=worker,
            pid=process.pid,
            how=how,
            lived=lived,
            delay=delay,
        )
        if delay:
            self._pending[worker] = self.reactor.callLater(delay, self._spawn, worker)
        else:
            self._spawn(worker)

    def _cannot_start(self, process: WorkerProcess, how: str) -> None:
        """
        No worker has ever served and every one keeps failing: stop, and
        exit with status 1 so that systemd (or whoever started l7lb) sees it.
        """
        log.critical(
            "no worker could start ({count} attempts each; the last {how}): "
            "l7lb stops, exit status 1",
            count=START_ATTEMPTS,
            how=how,
        )

        def exit_with_failure() -> None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

        self.reactor.addSystemEventTrigger("after", "shutdown", exit_with_failure)
        self.reactor.stop()

    # What the admin API and the signals ask for.

    def serving(self) -> dict[str, WorkerProcess]:
        """
        The worker that serves in each place: the newest ready one.
        """
        serving: dict[str, WorkerProcess] = {}
        for process in sorted(self.processes, key=lambda p: p.generation):
            if process.ready and not process.retiring and not process.ended:
                serving[process.worker] = process
        return dict(sorted(serving.items(), key=lambda item: int(item[0])))

    def worker_pids(self) -> dict[str, int]:
        return {
            worker: process.pid
            for worker, process in self.serving().items()
            if process.pid is not None
        }

    def ask(
        self, method: bytes, path: str, body: bytes | None = None, one: bool = False
    ) -> Deferred[dict[str, tuple[int, bytes]]]:
        serving = list(self.serving().items())
        if one:
            serving = serving[:1]
        asked = [process.ask(method, path, body) for _, process in serving]

        def collect(results: list[tuple[bool, Any]]) -> dict[str, tuple[int, bytes]]:
            return {
                worker: result
                for (worker, _), (_, result) in zip(serving, results, strict=True)
            }

        return DeferredList(asked).addCallback(collect)

    def _send_state(self, processes: list[WorkerProcess]) -> Deferred[dict[str, str]]:
        version = self.state_version
        body = json.dumps(
            {
                "version": version,
                "sections": self.state.sections,
                "removed": list(self.state.removed),
            }
        ).encode()
        return self._everywhere(
            processes, b"PUT", "/state", body, "state_version", version
        )

    def _everywhere(
        self,
        processes: list[WorkerProcess],
        method: bytes,
        path: str,
        body: bytes | None,
        version_name: str,
        version: int,
    ) -> Deferred[dict[str, str]]:
        """
        Ask each of C{processes} to apply something; each one's outcome
        (C{"applied"} or why not), and the version it then runs.
        """

        def outcome(
            reply: tuple[int, bytes], process: WorkerProcess
        ) -> tuple[str, str]:
            status, raw = reply
            if status == 200:
                # Replies may come back out of order: keep the newest.
                newest = max(getattr(process, version_name), version)
                setattr(process, version_name, newest)
                return process.worker, "applied"
            try:
                detail = "; ".join(json.loads(raw).get("errors", [])) or str(status)
            except (ValueError, AttributeError):
                detail = raw.decode("utf-8", "replace")
            log.error(
                "worker {worker} (pid {pid}) failed to apply a change: {detail}",
                worker=process.worker,
                pid=process.pid,
                detail=detail,
            )
            return process.worker, f"failed: {detail}"

        asked = [
            process.ask(method, path, body).addCallback(outcome, process)
            for process in processes
        ]
        return DeferredList(asked).addCallback(
            lambda results: dict(result for _, result in results)
        )

    def _live(self) -> list[WorkerProcess]:
        """
        Every worker that serves or will: old generations until they stop.
        """
        return [p for p in self.processes if p.ready and not p.retiring]

    def change(self, state: RuntimeState) -> Deferred[tuple[list[str], dict[str, str]]]:
        """
        Runtime changes from the admin API: validated, saved to C{state_file}
        once (here, never by a worker), then applied in every worker; a
        worker not serving yet gets them when it does.
        """
        try:
            config = state.config(self.config_path, self.text)
        except ConfigError as e:
            return succeed((e.problems, {}))
        admin = config.admin
        if admin is not None and admin.state_file is not None:
            save_state(admin.state_file, state)
        self.state = state
        self.config = config
        self.state_version += 1
        self._write_private_state()
        return self._send_state(self._live()).addCallback(lambda done: ([], done))

    def reload(self) -> list[str]:
        """
        SIGHUP: validate the file (runtime changes on top); with problems,
        log each and change nothing; else pass the reload on to the workers,
        or start a new generation when the listeners or the number of
        workers changed.
        """
        problems, _ = self._reload(signal_workers=True)
        return problems

    def reload_workers(self) -> Deferred[tuple[list[str], dict[str, str]]]:
        """
        C{POST /reload}: as L{reload}, each worker's outcome as answered by
        its private API.
        """
        problems, d = self._reload(signal_workers=False)
        if problems and d is None:
            return succeed((problems, {}))
        assert d is not None
        return d.addCallback(lambda done: (problems, done))

    def _reload(
        self, signal_workers: bool
    ) -> tuple[list[str], Deferred[dict[str, str]] | None]:
        try:
            text = read_text(self.config_path)
            config = self.state.config(self.config_path, text)
        except (OSError, UnicodeDecodeError) as e:
            problem = f"{self.config_path}: cannot read the file: {e}"
            log.error("reload refused: {problem}", problem=problem)
            return [problem], None
        except ConfigError as e:
            for problem in e.problems:
                log.error("reload refused: {problem}", problem=problem)
            return e.problems, None
        count = max(1, config.lb.workers)
        new_listeners = listener_keys(config) != self._wanted or count != self._count
        if new_listeners:
            refused = self._open_listeners(config)
            if refused:
                # Nothing else changes: the workers keep serving as they do.
                for problem in refused:
                    log.error("reload refused: {problem}", problem=problem)
                return refused, None
        old = self.config
        self.config, self.text = config, text
        self._write_private("config.ini", text.encode("utf-8"))
        problems: list[str] = []
        try:
            self._sync_admin()
        except ListenFailed as e:
            log.error("{problem}", problem=str(e))
            problems.append(str(e))
        if config.lb.workers != old.lb.workers and config.lb.workers == 1:
            log.info("workers = 1: one worker process from now on (until a restart)")
        self.config_version += 1
        if new_listeners:
            self._new_generation(config, count)
            done: Deferred[dict[str, str]] = succeed(
                {worker: "applied" for worker in self.serving()}
            )
        elif signal_workers:
            for process in self._live():
                process.config_version = self.config_version
                process.signal("HUP")
            done = succeed({})
        else:
            done = self._everywhere(
                self._live(),
                b"POST",
                "/reload",
                b"",
                "config_version",
                self.config_version,
            )
        log.info("configuration reloaded from {path}", path=self.config_path)
        return problems, done

    def _open_listeners(self, config: Config) -> list[str]:
        """
        Open the sockets C{config} adds; if any cannot be opened, close the
        ones just opened and return the problems (the reload is refused, so
        no listener is ever lost to one that could not replace it: a listen
        string whose options change for an address already open counts as
        new, and takes a restart).
        """
        opened, problems = [], []
        for key in listener_keys(config):
            if key in self.sockets:
                continue
            problem = self._open(key)
            if problem is None:
                opened.append(key)
            else:
                problems.append(problem)
        if problems:
            self._close_sockets(set(opened))
        return problems

    def _new_generation(self, config: Config, count: int) -> None:
        """
        Start a whole new set of workers for new listeners (or a new number
        of workers), their sockets open already; the old ones stop once the
        new ones serve.
        """
        wanted = listener_keys(config)
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        self._quick_exits.clear()
        self._wanted = wanted
        self._count = count
        self.generation += 1
        log.info(
            "starting {count} new worker processes (generation {generation}) "
            "for the new listeners or number of workers",
            count=count,
            generation=self.generation,
        )
        self._spawn_all()

    # Stopping.

    @inlineCallbacks
    def stopService(self) -> Any:
        """
        Pass SIGTERM on and wait for the workers to drain and exit (up to
        C{drain_timeout} and a margin, then SIGKILL), then stop serving the
        admin API.
        """
        Service.stopService(self)
        self.stopping = True
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        processes = list(self.processes)
        for process in processes:
            process.retiring = True
            process.signal("TERM")
        # The workers hold their own copies; closing ours means the sockets
        # close once the last worker stops listening.
        closing = self._close_sockets(set(self.sockets))
        timeout = self.config.lb.drain_timeout + STOP_MARGIN
        exits = [p.when_ended() for p in processes if not p.ended]
        if exits:
            log.info(
                "waiting for {count} workers to drain (up to {timeout}s)",
                count=len(exits),
                timeout=timeout,
            )
            ended = yield _within(
                DeferredList(exits, consumeErrors=True), timeout, self.reactor
            )
            if not ended:
                left = [p for p in processes if not p.ended]
                log.warn(
                    "killing {count} workers still running after {timeout}s",
                    count=len(left),
                    timeout=timeout,
                )
                for process in left:
                    process.signal("KILL")
                yield _within(
                    DeferredList([p.when_ended() for p in left], consumeErrors=True),
                    5.0,
                    self.reactor,
                )
        yield DeferredList(closing)
        for child in list(self):
            if child.running:
                yield child.stopService()
        self._remove_directory()

    def _remove_directory(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def _how_it_ended(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            try:
                name = signal.Signals(value.signal).name
            except ValueError:
                name = str(value.signal)
            return f"was killed by {name}"
        return f"exited with status {value.exitCode}"
    return "exited with status 0"


__all__ = ["Supervisor", "WorkerProcess", "restart_delay"]
