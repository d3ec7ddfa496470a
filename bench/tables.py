"""Plain-text tables for the reports."""

from __future__ import annotations

from collections.abc import Collection, Sequence


def render(
    header: Sequence[str],
    lines: Sequence[Sequence[str]],
    left: Collection[int] = (0,),
) -> str:
    """Aligned columns: those numbered in ``left`` to the left, the others right.

    A line shorter than the header (a name and why it has no figures) is
    written as is after its first cell, across the other columns.
    """
    full = [line for line in lines if len(line) == len(header)]
    widths = [
        max([len(name)] + [len(line[i]) for line in full])
        for i, name in enumerate(header)
    ]
    widths[0] = max([widths[0]] + [len(line[0]) for line in lines])

    def row(line: Sequence[str]) -> str:
        if len(line) != len(header):
            return "  ".join([f"{line[0]:<{widths[0]}}", *line[1:]])
        return "  ".join(
            f"{cell:<{width}}" if i in left else f"{cell:>{width}}"
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([row(header), rule, *(row(line) for line in lines)])
