# -*- test-case-name: tests.test_workers -*-
"""
One worker process of C{[lb] workers = N}, started by the supervisor
(L{l7lb.supervisor}) as C{python -m l7lb.worker}:

    --config FILE          the configuration's name (messages, relative paths)
    --config-text FILE     its content as the supervisor last accepted it,
                           read again at every reload
    --state FILE           the runtime changes on top (the supervisor's copy)
    --secret-file FILE     the sticky-session key when the file names none
    --admin ENDPOINT       this worker's private admin API (a unix socket)
    --worker N             its number, 1 to N, for logs and metrics
    --workers N            how many share the listeners (rate limits divide)
    --listener FD:LISTEN   a listening socket inherited as descriptor FD for
                           the listen string LISTEN (repeated)

It is a whole balancer (routes, pools, health checks, rate limits, access
log) serving the supervisor's sockets, so every worker accepts from the same
queues. It writes C{ready} on descriptor 3 once it serves. SIGHUP reloads;
SIGTERM stops gracefully (SIGINT is left to the supervisor, which passes it
on), and so does the end of standard input (a pipe from the supervisor), so
a worker never outlives its supervisor.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import (
    IReadDescriptor,
    IStreamServerEndpoint,
)
from twisted.internet.main import CONNECTION_DONE
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    formatEventAsClassicLogText,
    formatTime,
    globalLogBeginner,
    timeFormatRFC3339,
)
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from l7lb.admin import admin_site
from l7lb.config import AdminConfig, Config, ConfigError, read_text
from l7lb.service import AdoptedEndpoint, BalancerService, ListenFailed, listen_endpoint
from l7lb.state import RuntimeState, read_state

log = Logger(namespace="l7lb.worker")

# The descriptor a worker announces on that it serves.
READY_FD = 3
# The first descriptor of inherited listening sockets.
FIRST_LISTENER_FD = 4


class WorkerOptions(usage.Options):
    optParameters = [
        ["config", None, None, "The configuration file's path."],
        [
            "config-text",
            None,
            None,
            "The configuration as the supervisor validated it.",
        ],
        ["state", None, None, "The runtime changes to apply on top (JSON)."],
        [
            "secret-file",
            None,
            None,
            "The sticky-session key if the file names none.",
        ],
        ["admin", None, None, "Endpoint of this worker's private admin API."],
        ["worker", None, "1", "This worker's number."],
        ["workers", None, "1", "How many workers share the listeners."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.listeners: dict[str, int] = {}

    def opt_listener(self, value: str) -> None:
        """
        FD:LISTEN, a listening socket inherited as descriptor FD, opened for
        the listen string LISTEN (repeat for each).
        """
        fd, _, description = value.partition(":")
        if not fd.isdigit() or not description:
            raise usage.UsageError(f"--listener expects FD:LISTEN, got {value!r}")
        self.listeners[description] = int(fd)

    def postOptions(self) -> None:
        for name in ("config", "config-text", "admin"):
            if not self[name]:
                raise usage.UsageError(f"--{name} is required")
        for name in ("worker", "workers"):
            if not str(self[name]).isdigit() or int(self[name]) < 1:
                raise usage.UsageError(f"--{name} expects a positive number")
        self["worker"] = int(self["worker"])
        self["workers"] = int(self["workers"])


class WorkerService(BalancerService):
    """
    A balancer that serves sockets inherited from the supervisor, answers
    its private admin API without a token, leaves the state file to the
    supervisor, and takes its share of every rate limit.
    """

    def __init__(
        self,
        reactor: Any,
        config_path: str,
        state: RuntimeState,
        listeners: dict[str, int],
        admin: str,
        workers: int,
        secret_file: str | None = None,
        config_text: str | None = None,
    ) -> None:
        super().__init__(reactor, config_path, state=state)
        # What the supervisor accepted (the file itself may have changed
        # since, unvalidated); None: the file.
        self.config_text = config_text
        self.runtime.share = workers
        self.inherited = listeners
        self.private_admin = admin
        self.workers = workers
        self.secret_file = secret_file
        self.endpoint_for = self._endpoint
        self.admin_factory = lambda service: admin_site(service, private=True)

    def _endpoint(self, description: str) -> IStreamServerEndpoint:
        fd = self.inherited.get(description)
        if fd is None:  # the private admin API
            return listen_endpoint(self.reactor, description)
        return AdoptedEndpoint(self.reactor, fd, description)

    def load(self, state: RuntimeState) -> Config:
        if self.config_text is None:
            config = super().load(state)
        else:
            config = state.config(self.config_path, read_text(self.config_text))
        inherited = self.inherited
        lb = dataclasses.replace(
            config.lb,
            # The supervisor decides what is listened on: a listener added to
            # the file since it started this worker is a new generation's.
            listen=tuple(d for d in config.lb.listen if d in inherited),
            tls_listen=tuple(d for d in config.lb.tls_listen if d in inherited),
            # Sticky-session tokens must be the same in every worker.
            secret_file=config.lb.secret_file or self.secret_file,
        )
        return dataclasses.replace(
            config, lb=lb, admin=AdminConfig(listen=self.private_admin)
        )


@implementer(IReadDescriptor)
class _SupervisorWatch:
    """
    Standard input, a pipe from the supervisor: its end means the
    supervisor is gone.
    """

    def __init__(self, gone: Callable[[], None]) -> None:
        self.gone = gone

    def fileno(self) -> int:
        return 0

    def logPrefix(self) -> str:
        return "supervisor"

    def doRead(self) -> Any:  # None, or why it ended (as Twisted expects)
        try:
            data = os.read(0, 512)
        except BlockingIOError:
            return None
        except OSError:
            return CONNECTION_DONE
        return None if data else CONNECTION_DONE

    def connectionLost(self, reason: Failure) -> None:
        self.gone()


class _Stdout:
    """
    Standard output for log text: each event in one C{write(2)} (the
    descriptor is shared with the supervisor and the other workers, so no
    line is split), whatever twistd did to C{sys.stdout}.
    """

    def write(self, text: str) -> None:
        data = text.encode("utf-8", "replace")
        while data:
            data = data[os.write(1, data) :]

    def flush(self) -> None:
        pass


def _observer(worker: int) -> ILogObserver:
    """
    Log events as twistd writes them, tagged with the worker's number.
    """

    def format(event: LogEvent) -> str | None:
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
        tagged = dict(event, log_system=f"{system} worker {worker}")
        return formatEventAsClassicLogText(
            tagged, formatTime=lambda t: formatTime(t, timeFormatRFC3339)
        )

    return FileLogObserver(_Stdout(), format)  # type: ignore[arg-type]


class _Worker:
    """
    Starts the service once the reactor runs, wires signals, says ready,
    and stops once.
    """

    def __init__(self, reactor: Any, service: WorkerService) -> None:
        self.reactor = reactor
        self.service = service
        self.status = 0
        self.stopping = False

    def start(self) -> None:
        try:
            self.service.startService()
        except ListenFailed as e:
            log.error("{problem}", problem=str(e))
            self.status = 1
            self.reactor.stop()
            return
        self.reactor.addSystemEventTrigger(
            "before", "shutdown", self.service.stopService
        )
        signal.signal(signal.SIGHUP, self._hangup)
        signal.signal(signal.SIGTERM, self._terminate)
        # Ctrl-C reaches the whole process group: the supervisor passes it
        # on as SIGTERM, once it knows the exit is expected.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.reactor.addReader(_SupervisorWatch(self._supervisor_gone))
        try:
            os.write(READY_FD, b"ready\n")
            os.close(READY_FD)
        except OSError:
            pass  # started by hand, without a supervisor

    def _hangup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.service.reload)

    def _terminate(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.stop, f"signal {signum}")

    def _supervisor_gone(self) -> None:
        self.stop("the supervisor is gone")

    def stop(self, why: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping ({why})", why=why)
        self.reactor.stop()


def main(argv: list[str] | None = None) -> int:
    options = WorkerOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        print(f"l7lb.worker: {e}", file=sys.stderr)
        return 2
    from l7lb.tap import install_reactor

    install_reactor()
    from twisted.internet import reactor

    globalLogBeginner.beginLoggingTo([_observer(options["worker"])])
    try:
        state = read_state(options["state"])
        service = WorkerService(
            reactor,
            options["config"],
            state,
            options.listeners,
            options["admin"],
            options["workers"],
            options["secret-file"],
            options["config-text"],
        )
        service.apply(service.load(state))
    except ConfigError as e:
        for problem in e.problems:
            log.error("cannot start: {problem}", problem=problem)
        return 1
    except (ValueError, OSError) as e:
        log.error("cannot start: {problem}", problem=str(e))
        return 1
    worker = _Worker(reactor, service)
    reactor.callWhenRunning(worker.start)
    reactor.run()
    return worker.status


if __name__ == "__main__":
    raise SystemExit(main())
