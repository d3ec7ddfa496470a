"""
Makes ``twistd l7lb`` available, and l7lb's reactor as ``--reactor l7lb``
(for twistd and trial); imports nothing of l7lb until it is used.
"""

from twisted.application.reactors import Reactor
from twisted.application.service import ServiceMaker

l7lb = ServiceMaker(
    "l7lb",
    "l7lb.tap",
    "A Layer 7 (HTTP) load balancer and reverse proxy.",
    "l7lb",
)

l7lb_reactor = Reactor(
    "l7lb",
    "l7lb.reactor",
    "Twisted's epoll reactor without a logging context per I/O event "
    "(the default of twistd l7lb).",
)
