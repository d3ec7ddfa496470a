# -*- test-case-name: tests.test_tap -*-
"""
C{twistd l7lb}: command-line options and the service they make.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from l7lb.config import Config, ConfigError, describe, load
from l7lb.service import build

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

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        try:
            self.config = load(self["config"])
        except ConfigError as e:
            for problem in e.problems:
                print(problem, file=sys.stderr)
            raise SystemExit(1) from None
        if self["check"]:
            for line in describe(self.config):
                print(line)
            raise SystemExit(0)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    config = options.config
    for notice in config.notices:
        log.warn("configuration: {notice}", notice=notice)
    try:
        service = build(config, reactor)
    except ValueError as e:
        # A certificate changed between validation and start.
        raise SystemExit(f"l7lb: {e}") from None
    service.exit_on_listen_failure = True
    reactor.callWhenRunning(_ignore_hangup, reactor)
    return service


def _ignore_hangup(reactor: Any) -> None:
    """
    SIGHUP would end the process by default; until configuration reload
    exists it is logged and otherwise ignored, so C{systemctl reload} is safe.
    """

    def hangup(signum: int, frame: object) -> None:
        reactor.callFromThread(
            log.warn, "SIGHUP received: reload is not supported yet; running on"
        )

    signal.signal(signal.SIGHUP, hangup)
