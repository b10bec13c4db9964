"""Markdown tables for the command line's reports (``check``, ``aot``)."""

from __future__ import annotations


def markdown_table(header: list[str], lines: list[list], right: set[int] = frozenset()) -> str:
    """A markdown table with padded columns; the columns in ``right`` are right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)] if lines else [len(h) for h in header]

    def fmt(line):
        return "| " + " | ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                                 for i, (c, w) in enumerate(zip(line, widths))) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(header), sep] + [fmt(line) for line in lines])
