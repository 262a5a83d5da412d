"""Plain text tables for the command line: columns padded to their widest cell."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def text_table(headers: Sequence[str], rows: Iterable[Sequence[object]], *,
               right: Collection[int] = (), footer: Sequence[object] | None = None) -> list[str]:
    """The table's lines: a header, the rows, and with ``footer`` rules around the rows.

    Columns are two spaces apart; those in ``right`` (numbers) are right-aligned; None shows
    as ``-``.
    """
    body = [[_cell(value) for value in row] for row in rows]
    tail = [_cell(value) for value in footer] if footer is not None else None
    widths = [len(h) for h in headers]
    for line in [*body, *([tail] if tail else [])]:
        widths = [max(w, len(c)) for w, c in zip(widths, line, strict=True)]

    def fmt(line: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(line, widths, strict=True))).rstrip()

    lines = [fmt(headers)]
    if tail is None:
        return lines + [fmt(line) for line in body]
    rule = "  ".join("-" * w for w in widths)
    return [*lines, rule, *(fmt(line) for line in body), rule, fmt(tail)]
