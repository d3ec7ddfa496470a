# -*- test-case-name: tests.test_headers -*-
"""
Which peers are trusted proxies, whose forwarding headers l7lb believes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from l7lb.config import IPNetwork


class TrustedProxies:
    """
    Membership of C{trusted_proxies}, remembered per address: a client
    connection asks once per request, and clients are few next to requests.
    """

    _MAX_REMEMBERED = 10_000

    def __init__(self, networks: Sequence[IPNetwork]) -> None:
        self._networks = tuple(networks)
        self._known: dict[str, bool] = {}

    def contains(self, ip: str) -> bool:
        if not self._networks:
            return False
        known = self._known.get(ip)
        if known is None:
            try:
                address = ipaddress.ip_address(ip)
            except ValueError:
                known = False
            else:
                mapped = getattr(address, "ipv4_mapped", None)
                known = any(
                    address in network or (mapped is not None and mapped in network)
                    for network in self._networks
                )
            if len(self._known) >= self._MAX_REMEMBERED:
                self._known.clear()
            self._known[ip] = known
        return known
