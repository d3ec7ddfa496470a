# -*- test-case-name: tests.test_headers -*-
"""
The header fields of one HTTP message, as they arrived: in order, names
spelled as the sender spelled them, and an index by lower-cased name for
the lookups the balancer makes (Host, Connection, X-Request-Id, cookies,
routing headers).

This replaces twisted.web's C{Headers} on the hot path: building one costs
a list append and a dictionary update per field, and forwarding keeps the
sender's order and spelling, as a byte-exact proxy should.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

# RFC 9110 section 5.6.2: the characters of a token (field names, methods).
TOKEN_BYTES = (
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
# What a field value may hold (RFC 9110 section 5.5): visible characters,
# space, tab and obs-text; anything else (NUL, CR, LF, other controls) is not.
VALUE_BYTES = bytes([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])
# The control characters a message head may not hold anywhere (CR and LF
# only as the CRLF that ends a line, checked apart).
_CONTROLS = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])


class FieldError(ValueError):
    """
    A message head that is not well-formed.
    """


def check_head(head: bytes) -> None:
    """
    L{FieldError} if C{head} (its lines joined by CRLF) holds a control
    character, or a CR or LF that is not part of a CRLF: checked once for
    the whole head, so each field needs no check of its own.
    """
    if len(head.translate(None, _CONTROLS)) != len(head):
        raise FieldError("control character in the message head")
    crlf = head.count(b"\r\n")
    if head.count(b"\r") != crlf or head.count(b"\n") != crlf:
        raise FieldError("bare CR or LF in the message head")


def is_token(name: bytes) -> bool:
    """
    Whether C{name} is a token (RFC 9110 section 5.6.2): a field name, a
    method.
    """
    if name.replace(b"-", b"").isalnum():  # the common case, quickly
        return True
    return bool(name) and not name.translate(None, TOKEN_BYTES)


def parse_field_lines(lines: list[bytes]) -> Fields:
    """
    Header field lines, strictly: C{token ":" OWS value OWS}; no obs-fold
    (a line that starts with a space is not a field). The head they come
    from must have passed L{check_head}.
    """
    fields = Fields()
    items, index = fields.items, fields.index
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not is_token(name):
            raise FieldError("malformed header field")
        value = value.strip(b" \t")
        items.append((name, value))
        lowered = name.lower()
        values = index.get(lowered)
        if values is None:
            index[lowered] = [value]
        else:
            values.append(value)
    return fields


class Fields:
    """
    Header fields: C{items} in arrival order, C{index} by lower-cased name.
    Lookups are case-insensitive. C{raw} holds the field lines exactly as
    received (each ending in CRLF) while they are unchanged, so that they
    can be forwarded without being serialised again.
    """

    __slots__ = ("index", "items", "raw")

    def __init__(self) -> None:
        self.items: list[tuple[bytes, bytes]] = []
        self.index: dict[bytes, list[bytes]] = {}
        self.raw: bytes | None = None

    @classmethod
    def of(cls, pairs: Iterable[tuple[bytes, bytes]]) -> Fields:
        fields = cls()
        for name, value in pairs:
            fields.add(name, value)
        return fields

    @classmethod
    def from_dict(cls, mapping: dict[bytes, list[bytes]]) -> Fields:
        """
        Fields from C{{name: [values]}}, as twisted.web's C{Headers} holds them.
        """
        return cls.of(
            (name, value) for name, values in mapping.items() for value in values
        )

    def add(self, name: bytes, value: bytes) -> None:
        self.raw = None
        self.items.append((name, value))
        lowered = name.lower()
        values = self.index.get(lowered)
        if values is None:
            self.index[lowered] = [value]
        else:
            values.append(value)

    def get(self, name: bytes) -> list[bytes] | None:
        """
        Every value of the field C{name}, in order, or L{None}.
        """
        return self.index.get(name.lower())

    def first(self, name: bytes) -> bytes | None:
        values = self.index.get(name.lower())
        return values[0] if values else None

    def replace(self, name: bytes, value: bytes) -> None:
        """
        Make C{value} the field's only value, where the field first was.
        """
        lowered = name.lower()
        self.raw = None
        if lowered not in self.index:
            self.add(name, value)
            return
        items, placed = [], False
        for item in self.items:
            if item[0].lower() != lowered:
                items.append(item)
            elif not placed:
                items.append((item[0], value))
                placed = True
        self.items = items
        self.index[lowered] = [value]

    def __contains__(self, name: bytes) -> bool:
        return name.lower() in self.index

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"Fields({self.items!r})"
