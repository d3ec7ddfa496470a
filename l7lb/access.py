# -*- test-case-name: tests.test_policy -*-
"""
Per-route access control by client address: C{allow} and C{deny} lists of
addresses and CIDR blocks, IPv4 and IPv6.
"""

from __future__ import annotations

import ipaddress

from l7lb.config import AccessRule


class AccessList:
    """
    Judges client addresses against a route's rule: with C{allow} set only
    those addresses are admitted, C{deny} refuses addresses even so, and
    C{deny = all} refuses everyone. Verdicts are remembered per address.
    """

    _MAX_REMEMBERED = 10_000

    def __init__(self, rule: AccessRule) -> None:
        self.rule = rule
        self._verdicts: dict[str, bool] = {}

    def admits(self, client: str) -> bool:
        if self.rule.deny_all:
            return False
        verdict = self._verdicts.get(client)
        if verdict is None:
            verdict = self._judge(client)
            if len(self._verdicts) >= self._MAX_REMEMBERED:
                self._verdicts.clear()
            self._verdicts[client] = verdict
        return verdict

    def _judge(self, client: str) -> bool:
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            # Not an address (a UNIX socket peer, a garbled forwarded hop):
            # only a route with no list at all admits it.
            return not self.rule.allow and not self.rule.deny
        mapped = getattr(address, "ipv4_mapped", None)
        candidates = [address] if mapped is None else [address, mapped]

        def listed(
            networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
        ) -> bool:
            return any(a in n for a in candidates for n in networks)

        if self.rule.allow and not listed(self.rule.allow):
            return False
        return not listed(self.rule.deny)
