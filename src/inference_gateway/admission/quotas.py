"""Quotas come back right after Redis lost them: Postgres holds the truth, Redis the fast path.

One process of the fleet (see ``db.leader``), every ``RECONCILE_SEC``, reads what each quota's
subject used in the current day or month from the usage rollups and raises the Redis counter
to it if it is lower, as it is after Redis restarted empty. It never lowers a counter: Redis
also holds reservations of requests under way and usage not yet in Postgres.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import asyncpg

from inference_gateway.admission.checks import checks_for
from inference_gateway.admission.limits import Limit, list_limits
from inference_gateway.admission.redis_counters import KEEP_QUOTA_MS, RedisCounters
from inference_gateway.db import leader, locks

log = logging.getLogger(__name__)

RECONCILE_SEC = 30.0
_USED = """
SELECT coalesce(sum(input_tokens), 0)::bigint AS prompt,
       coalesce(sum(output_tokens), 0)::bigint AS completion
  FROM inference.usage_day
 WHERE organization_id = $1 AND bucket_start >= $2 AND bucket_start < $3
   AND ($4::text IS NULL OR instance_id = $4)
   AND ($5::bigint IS NULL OR api_key_id = $5)
   AND ($6::text IS NULL OR model = $6)
"""


async def used(conn: asyncpg.Connection, limit: Limit, start: datetime, end: datetime) -> int:
    row = await conn.fetchrow(_USED, limit.organization_id, start, end, limit.instance_id,
                              limit.api_key_id, limit.model)
    return limit.weighted(row["prompt"], row["completion"])


def _period(now: datetime, name: str) -> tuple[datetime, datetime]:
    if name.startswith("d"):
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, datetime.fromtimestamp(start.timestamp() + 86_400, UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    following = (start.replace(year=start.year + 1, month=1) if start.month == 12
                 else start.replace(month=start.month + 1))
    return start, following


async def reconcile(conn: asyncpg.Connection, counters: RedisCounters,
                    now: datetime | None = None) -> int:
    """Raise every quota counter to what Postgres says was used; returns how many it raised."""
    now = now or datetime.now(UTC)
    raised = 0
    for limit in await list_limits(conn, None):
        for check in checks_for((limit,), 0, 0, now=now):
            if check.kind != "quota":
                continue
            start, end = _period(now, check.key.rsplit(":", 1)[1])
            spent = await used(conn, limit, start, end)
            current = await counters.raise_to(check.key, spent, check.span_ms + KEEP_QUOTA_MS)
            if current == spent and spent:
                raised += 1
    return raised


def quota_job(counters: RedisCounters) -> leader.LeaderJob:
    async def step(conn: asyncpg.Connection) -> float:
        raised = await reconcile(conn, counters)
        if raised:
            log.info("quotas: %d counters brought up to the usage Postgres holds", raised)
        return RECONCILE_SEC

    return leader.LeaderJob("quota reconciler", locks.QUOTA_RECONCILER, step,
                            standby_sec=RECONCILE_SEC)


async def run_reconciler(redis_url: str, database_url: str, redis_timeout: float) -> None:
    """The reconciler until cancelled, with a Redis connection of its own."""
    counters = RedisCounters(redis_url, redis_timeout)
    try:
        await leader.run(database_url, quota_job(counters))
    finally:
        await counters.close()
