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

    def client_address(self, peer: str, forwarded_for: Sequence[bytes] | None) -> str:
        """
        Who the client is: the socket peer, or, when the peer is a trusted
        proxy, the right-most address of X-Forwarded-For that is not itself
        a trusted proxy (SPEC section 4).
        """
        if not forwarded_for or not self.contains(peer):
            return peer
        hops = [
            _address(hop.strip().decode("latin-1"))
            for value in forwarded_for
            for hop in value.split(b",")
            if hop.strip()
        ]
        for hop in reversed(hops):
            if not self.contains(hop):
                return hop
        return hops[0] if hops else peer


def _address(hop: str) -> str:
    """
    An X-Forwarded-For hop as a plain address: C{1.2.3.4:5678} and
    C{[2001:db8::1]:443} lose their ports, so lists and keys see the address.
    What is not an address stays as written (and access lists refuse it).
    """
    if hop.startswith("["):
        hop = hop[1:].partition("]")[0]
    elif hop.count(":") == 1:
        hop = hop.partition(":")[0]
    try:
        return str(ipaddress.ip_address(hop))
    except ValueError:
        return hop
