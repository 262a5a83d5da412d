"""Time buckets and which rollup answers which stretch of time, in Unix seconds (UTC).

Buckets lie on the UTC grid of their width (a ``1d`` bucket is a UTC day); the first and last
bucket of a query are cut to its range. A stretch of time is read from the coarsest rollups
that fit inside it: whole days from the day rollup, the hours around them from the hour rollup,
the minutes at the edges from the minute rollup, so a 30-day query reads about 30 rows per
group, whatever the traffic.
"""

from __future__ import annotations

from typing import NamedTuple

MINUTE = 60
HOUR = 3600
DAY = 86400
ROLLUP_WIDTHS = (DAY, HOUR, MINUTE)  # coarsest first


class Piece(NamedTuple):
    width: int  # the rollup's: DAY, HOUR or MINUTE
    start: int
    end: int


def floor_to(t: int, width: int) -> int:
    return t - t % width


def ceil_to(t: int, width: int) -> int:
    return -(-t // width) * width


def page_buckets(start: int, end: int, width: int, limit: int
                 ) -> tuple[list[tuple[int, int]], int | None]:
    """Up to ``limit`` buckets from ``start``, and where the next page starts (None: no more)."""
    buckets: list[tuple[int, int]] = []
    at = start
    while at < end and len(buckets) < limit:
        bucket_end = min(floor_to(at, width) + width, end)
        buckets.append((at, bucket_end))
        at = bucket_end
    return buckets, (at if at < end else None)


def cover(start: int, end: int, width: int) -> list[Piece]:
    """``[start, end)``, minute-aligned, as pieces of the coarsest rollups that fit, none wider
    than the bucket ``width`` (a day row cannot be split into hours)."""
    return _cover(start, end, tuple(w for w in ROLLUP_WIDTHS if w <= width))


def _cover(start: int, end: int, widths: tuple[int, ...]) -> list[Piece]:
    if start >= end:
        return []
    width, finer = widths[0], widths[1:]
    if not finer:
        return [Piece(width, start, end)]
    inner_start, inner_end = ceil_to(start, width), floor_to(end, width)
    if inner_start >= inner_end:
        return _cover(start, end, finer)
    return [*_cover(start, inner_start, finer), Piece(width, inner_start, inner_end),
            *_cover(inner_end, end, finer)]
