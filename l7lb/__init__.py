"""
l7lb: a Layer 7 (HTTP) load balancer and reverse proxy on Twisted.
"""

__version__ = "0.1.0"
