# -*- test-case-name: tests.test_wire -*-
"""
Writing to a TCP connection at once.

Twisted's TCP transport never writes in C{write()}: it queues the bytes,
asks the reactor to watch the socket for writability (a system call), and
sends on the next turn of the loop, then stops watching (another one). A
proxy writes twice per request, so that costs four system calls and two
loop turns a request. L{write_now} sends straight away when nothing is
queued ahead of the bytes, as asyncio's transports do, and hands whatever
the socket would not take to the transport as usual, so order, flow
control and error handling stay Twisted's.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

_PLAIN_TCP = frozenset({tcp.Server, tcp.Client})


def write_now(transport: Any, data: bytes) -> None:
    """
    Write C{data} to C{transport}, sending what the socket takes at once
    when that keeps the order (a plain TCP connection with nothing queued).
    """
    if (
        type(transport) in _PLAIN_TCP
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.connected
        and not transport.TLS
        and not transport._writeDisconnected
        and not transport._aborting
    ):
        sent = transport.writeSomeData(data)
        if type(sent) is int:
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)
