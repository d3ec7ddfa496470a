# -*- test-case-name: tests.test_site -*-
"""
The answers l7lb gives itself: short plain-text bodies naming the status,
never a traceback or an internal address.
"""

from __future__ import annotations

from twisted.python.failure import Failure
from twisted.web.http import RESPONSES

CONTENT_TYPE = b"text/plain; charset=utf-8"


# RFC 9110's names where Twisted's table is older or silent.
_REASONS = {
    413: b"Content Too Large",
    414: b"URI Too Long",
    408: b"Request Timeout",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    504: b"Gateway Timeout",
}


def reason(status: int) -> bytes:
    return _REASONS.get(status) or RESPONSES.get(status, b"Error")


def body(status: int) -> bytes:
    """
    The body of an error answer: C{503 Service Unavailable} and a newline.
    """
    return b"%d %s\n" % (status, reason(status))


def raw_response(status: int, headers: dict[bytes, bytes] | None = None) -> bytes:
    """
    A whole HTTP/1.1 response that closes the connection, for refusals made
    while the request is still being read (a malformed or oversized head, a
    request refused before its body).
    """
    content = body(status)
    extra = b"".join(b"%s: %s\r\n" % item for item in (headers or {}).items())
    return (
        b"HTTP/1.1 %d %s\r\n"
        b"Content-Type: %s\r\n"
        b"Content-Length: %d\r\n"
        b"%s"
        b"Connection: close\r\n"
        b"\r\n%s" % (status, reason(status), CONTENT_TYPE, len(content), extra, content)
    )


def describe_failure(failure: Failure | BaseException) -> str:
    """
    A short reason for logs, looking inside Twisted's wrapped client errors
    (C{ResponseNeverReceived([ConnectionLost])} and the like).
    """
    if isinstance(failure, BaseException):
        failure = Failure(failure)
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return "; ".join(describe_failure(reason) for reason in reasons)
    name = failure.type.__name__ if failure.type is not None else "error"
    message = failure.getErrorMessage()
    return f"{name}: {message}" if message and message != name else name
