"""Usage sums read from the rollups, in one statement: the read side never scans the audit table.

A range is read as whole days from ``usage_day``, the hours beside them from ``usage_hour`` and
the minutes at its edges from ``usage_minute`` (see ``timegrid.cover``), each an index range
scan. A query that groups and filters by nothing but the model, or nothing but the
organization (an operator's views of the fleet), reads the ``usage_model_*`` or ``usage_org_*``
rollups instead: a row per bucket and model or organization, however many instances and keys.

The rows ingested since the rollup job's watermark are added from ``inference.requests``
itself, so a request shows up within a second or two: that tail is found through the index on
``ingested_at`` and never reaches back more than ``USAGE_FRESH_TAIL_SEC``, so a stalled job
makes answers late, never slow. One statement is one snapshot: the watermark, the rollups and
the tail agree, and no row is counted twice or missed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg

from inference_gateway.portal.params import Family
from inference_gateway.portal.timegrid import DAY, HOUR, MINUTE, cover

METRICS = ("input_tokens", "output_tokens", "input_cached_tokens", "num_model_requests")
_UNITS = {DAY: "day", HOUR: "hour", MINUTE: "minute"}


@dataclass(frozen=True, slots=True)
class _Rollups:
    """A set of rollups by minute, hour and day, and the columns it keeps."""

    prefix: str
    keys: frozenset[str]  # what it can group and filter by
    rolled: str  # its columns
    raw: str  # the same, from inference.requests

    def table(self, width: int) -> str:
        return f"inference.{self.prefix}{_UNITS[width]}"


_RAW_METRICS = "prompt_tokens, completion_tokens, cached_tokens, 1"
# The smallest first.
_ROLLUPS = (
    _Rollups("usage_model_", frozenset({"model"}), "model, " + ", ".join(METRICS),
             "model, " + _RAW_METRICS),
    _Rollups("usage_org_", frozenset({"organization_id"}),
             "organization_id, " + ", ".join(METRICS), "organization_id, " + _RAW_METRICS),
    _Rollups("usage_", frozenset({"organization_id", "instance_id", "model", "api_key_id"}),
             "organization_id, instance_id, model, api_key_id, " + ", ".join(METRICS),
             "organization_id, instance_id, model, coalesce(api_key_id, 0), " + _RAW_METRICS),
)
_TAIL = ("ingested_at >= (SELECT coalesce(ingested_until, '-infinity') "
         "FROM inference.usage_rollup_state) AND ingested_at > now() - {age}::interval")


@dataclass(frozen=True, slots=True)
class Selection:
    """What to sum: a family (None: both), ``[start, end)`` in whole minutes, in buckets of
    ``width`` seconds (None: one sum over the range), grouped and filtered by rollup columns."""

    family: Family | None
    start: int
    end: int
    width: int | None
    group_by: tuple[str, ...] = ()
    filters: dict[str, tuple[str, ...]] = field(default_factory=dict)
    rank: int | None = None  # keep the groups with the most tokens, this many


class _Args:
    """Numbered query parameters, collected as the statement is written."""

    def __init__(self) -> None:
        self.values: list[object] = []

    def __call__(self, value: object) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def _when(t: int) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def _conditions(sel: Selection, arg: _Args, family: str) -> str:
    parts = [family]
    for column, values in sel.filters.items():
        if column == "api_key_id":  # named by prefix, as `keys list` shows them
            parts.append(f"api_key_id IN (SELECT id FROM inference.api_keys "
                         f"WHERE prefix = ANY({arg(list(values))}::text[]))")
        else:
            parts.append(f"{column} = ANY({arg(list(values))}::text[])")
    return " AND ".join(p for p in parts if p)


def usage_sql(sel: Selection, tail: timedelta) -> tuple[str, list[object]]:
    """The statement and its parameters."""
    arg = _Args()
    fam = arg(sel.family) if sel.family else None
    assert sel.width or sel.group_by, "a selection sums by bucket, by group or both"
    rollups = next(r for r in _ROLLUPS if {*sel.group_by, *sel.filters} <= r.keys)
    where = _conditions(sel, arg, f"family = {fam}" if fam else "")
    branches = []
    for piece in cover(sel.start, sel.end, sel.width or DAY):
        branches.append(
            f"SELECT bucket_start AS at, {rollups.rolled} FROM {rollups.table(piece.width)} "
            f"WHERE bucket_start >= {arg(_when(piece.start))} "
            f"AND bucket_start < {arg(_when(piece.end))}" + (f" AND {where}" if where else ""))
    if tail > timedelta(0):
        family = f"inference.usage_family(endpoint) = {fam}" if fam else \
            "inference.usage_family(endpoint) IS NOT NULL"
        branches.append(
            f"SELECT completed_at AS at, {rollups.raw} FROM inference.requests "
            f"WHERE {_TAIL.format(age=arg(tail))} AND completed_at >= {arg(_when(sel.start))} "
            f"AND completed_at < {arg(_when(sel.end))} AND {_conditions(sel, arg, family)}")
    keys = list(sel.group_by)
    if sel.width:
        keys.insert(0, f"extract(epoch FROM date_trunc('{_UNITS[sel.width]}', at, 'UTC'))"
                       "::bigint AS bucket")
    sums = ", ".join(f"sum({m})::bigint AS {m}" for m in METRICS)
    grouped = (f"SELECT {', '.join([*keys, sums])} FROM ({' UNION ALL '.join(branches)}) AS u "
               f"GROUP BY {', '.join(str(i + 1) for i in range(len(keys)))}")
    names = [("bucket" if sel.width else ""), *sel.group_by]
    outer = [f"k.prefix AS {n}" if n == "api_key_id" else f"g.{n}" for n in names if n]
    order = ", ".join(f"g.{n}" for n in names if n)
    if sel.rank is not None:
        order = f"g.input_tokens + g.output_tokens DESC, {order} LIMIT {arg(sel.rank)}"
    sql = (f"SELECT {', '.join([*outer, *(f'g.{m}' for m in METRICS)])} FROM ({grouped}) AS g "
           + ("LEFT JOIN inference.api_keys AS k ON k.id = g.api_key_id "
              if "api_key_id" in sel.group_by else "")
           + f"ORDER BY {order}")
    return sql, arg.values


async def fetch_usage(conn: asyncpg.Connection, sel: Selection, tail: timedelta
                      ) -> list[asyncpg.Record]:
    sql, args = usage_sql(sel, tail)
    return list(await conn.fetch(sql, *args))
