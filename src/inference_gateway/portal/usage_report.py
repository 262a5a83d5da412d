"""``inference-gateway usage``: an organization's usage from the audit table, as a text table.

Times are UTC. The range is half-open, ``[from, to)``; by default the last seven days.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal

import asyncpg

from inference_gateway.portal.tables import text_table

Grouping = Literal["hour", "day", "model"]

_GROUP_BY: dict[Grouping, tuple[str, str]] = {
    "hour": ("hour (UTC)", "to_char(date_trunc('hour', completed_at, 'UTC') AT TIME ZONE 'UTC', "
                           "'YYYY-MM-DD HH24:00')"),
    "day": ("day (UTC)", "to_char(date_trunc('day', completed_at, 'UTC') AT TIME ZONE 'UTC', "
                         "'YYYY-MM-DD')"),
    "model": ("model", "model"),
}
_COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")


def parse_time(value: str) -> datetime:
    """An ISO 8601 date or time; without an offset it is taken as UTC."""
    ts = datetime.fromisoformat(value)
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts


def default_range(now: datetime | None = None) -> tuple[datetime, datetime]:
    now = now or datetime.now(UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=6), now


async def usage(
    conn: asyncpg.Connection, org: str, start: datetime, end: datetime, by: Grouping
) -> list[tuple[str, int, int, int]]:
    """``(group, requests, prompt_tokens, completion_tokens)`` rows, in group order."""
    _, group = _GROUP_BY[by]
    rows = await conn.fetch(
        f"SELECT {group} AS grp, count(*) AS requests, "
        "coalesce(sum(prompt_tokens), 0)::bigint AS prompt, "
        "coalesce(sum(completion_tokens), 0)::bigint AS completion "
        "FROM inference.requests "
        "WHERE organization_id = $1 AND completed_at >= $2 AND completed_at < $3 "
        "GROUP BY 1 ORDER BY 1",
        org, start, end,
    )
    return [(r["grp"], r["requests"], r["prompt"], r["completion"]) for r in rows]


def render(rows: Sequence[tuple[str, int, int, int]], by: Grouping) -> str:
    """A plain text table, numbers right-aligned, with a total line."""
    counts = [(req, p, c, p + c) for _, req, p, c in rows]
    totals = [sum(column) for column in zip(*counts, strict=True)] if counts else [0] * 4
    lines = text_table(
        [_GROUP_BY[by][0], *_COLUMNS],
        [[group, *(f"{n:,}" for n in numbers)]
         for (group, *_), numbers in zip(rows, counts, strict=True)],
        right=range(1, 5), footer=["total", *(f"{n:,}" for n in totals)])
    return "\n".join(lines)
