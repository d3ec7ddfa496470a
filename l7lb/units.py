# -*- test-case-name: tests.test_units -*-
"""
The value syntaxes of the configuration file: durations, sizes, rates,
booleans and lists.

Each parser takes the text as written and returns a plain value, or raises
L{ValueError} whose message says what was expected, so the configuration
loader can report it next to the file, section and key.
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d|w|y)")
_DURATION_FACTORS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 7 * 86400.0,
    "y": 365 * 86400.0,
}

_SIZE = re.compile(r"([0-9]+)(B|KiB|MiB|GiB)?")
_SIZE_FACTORS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}

_RATE = re.compile(r"([0-9]+(?:\.[0-9]+)?)/(s|m|h)")
_RATE_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}

_TRUE = frozenset({"on", "yes", "true"})
_FALSE = frozenset({"off", "no", "false"})


def parse_duration(text: str) -> float:
    """
    A duration such as C{250ms}, C{10s}, C{2m}, C{1h}, C{30d}, C{2w} or
    C{1y} (365 days), in seconds.

    A bare number is refused: C{30} could mean seconds or milliseconds, and
    both readings exist in other balancers' configuration files.
    """
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected a duration like 250ms, 10s or 2m, got {text!r}")
    return float(match.group(1)) * _DURATION_FACTORS[match.group(2)]


def parse_size(text: str) -> int:
    """
    A size in bytes: C{512}, C{512B}, C{16KiB}, C{10MiB} or C{1GiB}.
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected a size like 16KiB or 10MiB, got {text!r}")
    return int(match.group(1)) * _SIZE_FACTORS[match.group(2)]


def parse_rate(text: str) -> float:
    """
    A rate such as C{100/s}, C{6000/m} or C{10/h}, in events per second.
    """
    count, period = parse_rate_as_written(text)
    return count / period


def parse_rate_as_written(text: str) -> tuple[float, float]:
    """
    A rate as its count and period in seconds: C{6000/m} is (6000, 60).
    """
    match = _RATE.fullmatch(text.strip())
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"expected a rate like 100/s or 6000/m, got {text!r}")
    return float(match.group(1)), _RATE_PERIODS[match.group(2)]


def parse_bool(text: str) -> bool:
    """
    C{on}/C{off}, C{yes}/C{no} or C{true}/C{false}, in any case.
    """
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"expected on or off, got {text!r}")


def parse_int(text: str, minimum: int, maximum: int | None = None) -> int:
    """
    A whole number within bounds.
    """
    word = text.strip()
    if not (word.isascii() and word.isdigit()):
        raise ValueError(f"expected a whole number, got {text!r}")
    value = int(word)
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"from {minimum} to {maximum}" if maximum else f"of at least {minimum}"
        raise ValueError(f"expected a number {bounds}, got {value}")
    return value


def parse_list(text: str) -> list[str]:
    """
    Items given one per line or separated by spaces.
    """
    return text.split()


def format_duration(seconds: float) -> str:
    """
    The shortest way to write a duration back in the file's own syntax.
    """
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    if seconds >= 1 or seconds == 0:
        return f"{seconds:g}s"
    return f"{seconds * 1000:g}ms"
