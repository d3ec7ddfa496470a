# -*- test-case-name: tests.test_tap -*-
"""
C{twistd l7lb}: command-line options and the service they make.
"""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from l7lb.config import Config, ConfigError, describe, load
from l7lb.service import BalancerService, build, read_runtime_state
from l7lb.state import RuntimeState

if TYPE_CHECKING:
    from l7lb.supervisor import Supervisor

log = Logger()


class Options(usage.Options):
    """
    C{--config FILE} names the configuration; C{--check} validates it,
    prints a summary and exits (0 when valid, 1 with every problem).
    """

    optParameters = [
        ["config", "c", None, "Path to the configuration file (INI)."],
    ]
    optFlags = [
        ["check", None, "Validate the configuration, print a summary and exit."],
    ]

    config: Config
    state: RuntimeState

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        try:
            config = load(self["config"])
            # Runtime changes made through the admin API, kept in its
            # state file, apply on top of the file.
            self.state = read_runtime_state(config)
            self.config = (
                self.state.config(self["config"])
                if self.state.sections or self.state.removed
                else config
            )
        except ConfigError as e:
            for problem in e.problems:
                print(problem, file=sys.stderr)
            raise SystemExit(1) from None
        if self["check"]:
            for line in describe(self.config):
                print(line)
            raise SystemExit(0)
        install_reactor()


def install_reactor() -> None:
    """
    Run on l7lb's reactor (L{l7lb.reactor}) unless one is installed already,
    as C{twistd --reactor NAME} does.
    """
    if "twisted.internet.reactor" in sys.modules:
        return
    try:
        from l7lb import reactor
    except ImportError:  # no epoll on this platform: Twisted's default
        return
    reactor.install()


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    config = options.config
    for notice in config.notices:
        log.warn("configuration: {notice}", notice=notice)
    if config.lb.workers > 1:
        # This process supervises; worker processes serve.
        from l7lb.supervisor import Supervisor

        supervisor = Supervisor(reactor, config, options.state)
        supervisor.exit_on_listen_failure = True
        reactor.callWhenRunning(_reload_on_hangup, reactor, supervisor)
        return supervisor
    try:
        service = build(config, reactor, state=options.state)
    except (ValueError, OSError) as e:
        # A certificate or log file changed between validation and start.
        raise SystemExit(f"l7lb: {e}") from None
    service.exit_on_listen_failure = True
    reactor.callWhenRunning(_reload_on_hangup, reactor, service)
    return service


def _reload_on_hangup(reactor: Any, service: BalancerService | Supervisor) -> None:
    """
    SIGHUP reloads the configuration (C{systemctl reload}, C{kill -HUP}).
    SIGTERM and SIGINT stop gracefully (see L{BalancerService.stopService},
    L{Supervisor.stopService}) and exit 0, where twistd would re-raise the
    signal and exit with it.
    """

    def hangup(signum: int, frame: object) -> None:
        reactor.callFromThread(service.reload)

    def stop(signum: int, frame: object) -> None:
        log.info("received signal {signal}: stopping", signal=signum)
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGHUP, hangup)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
