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


class Fields:
    """
    Header fields: C{items} in arrival order, C{index} by lower-cased name.
    Lookups are case-insensitive.
    """

    __slots__ = ("index", "items")

    def __init__(self) -> None:
        self.items: list[tuple[bytes, bytes]] = []
        self.index: dict[bytes, list[bytes]] = {}

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
