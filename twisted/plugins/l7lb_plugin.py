"""Makes ``twistd l7lb`` available; imports nothing of l7lb until it is used."""

from twisted.application.service import ServiceMaker

l7lb = ServiceMaker(
    "l7lb",
    "l7lb.tap",
    "A Layer 7 (HTTP) load balancer and reverse proxy.",
    "l7lb",
)
