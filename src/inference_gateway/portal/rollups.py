"""Keeps the usage rollups up to date: the read model the usage API and the dashboard query.

It lives with the read side because the rollups exist for it alone: metering owns the audit
table and only ever appends to it; this job reads that table and writes nothing else.

* A pass adds the rows ingested since the watermark (``inference.usage_rollup_state``) to the
  minute, hour and day rollups (``inference.roll_up_usage``, see migration 0021) and moves the
  watermark, in one transaction: after a crash both happened or neither did.
* Rows are chosen by ``ingested_at``, the time Postgres stored them, so a late row (a spool
  replayed after an outage) is added to its old buckets when it arrives, and never twice.
* The pass's cutoff is a little in the past, and never later than the start of a transaction
  that is still writing: a row is rolled up only once the transaction that inserted it has
  committed, the same rule as the billing reporter's.
* A backlog (the first pass over an existing table, or a long outage of the job) is taken in
  passes of at most ``MAX_ROWS_PER_PASS`` rows, so no transaction grows without bound.
* One process of the fleet does it: the one holding its lock (see ``db.leader``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from inference_gateway.db import leader, locks
from inference_gateway.settings import Settings

log = logging.getLogger(__name__)

SETTLE_MARGIN = timedelta(seconds=2)
MAX_ROWS_PER_PASS = 250_000
STANDBY_SEC = 10.0

# The newest ingestion time every row before which has committed (see the module's note).
_CUTOFF = """
SELECT least(clock_timestamp() - $1::interval,
             (SELECT min(xact_start) FROM pg_stat_activity
               WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()
                 AND datname = current_database()))
"""
# Where a pass of at most $3 rows ends: the ingestion time of the row after them.
_PASS_END = """
SELECT ingested_at FROM inference.requests
 WHERE ingested_at >= coalesce($1::timestamptz, '-infinity') AND ingested_at < $2
 ORDER BY ingested_at OFFSET $3 LIMIT 1
"""


@dataclass(frozen=True, slots=True)
class RollupPass:
    ingested_from: datetime | None  # None: from the oldest row
    ingested_until: datetime
    rows: int  # audit rows added to the rollups
    caught_up: bool


async def roll_up(conn: asyncpg.Connection, margin: timedelta = SETTLE_MARGIN,
                  max_rows: int = MAX_ROWS_PER_PASS) -> RollupPass:
    """One pass. Call it with the rollup lock held (or alone), outside a transaction: the
    cutoff must see the other sessions' transactions as they are."""
    cutoff: datetime = await conn.fetchval(_CUTOFF, margin)
    async with conn.transaction():
        since: datetime | None = await conn.fetchval(
            "SELECT ingested_until FROM inference.usage_rollup_state FOR UPDATE")
        if since is not None:
            cutoff = max(cutoff, since)  # the watermark never goes back, even with the clock
        end: datetime | None = await conn.fetchval(_PASS_END, since, cutoff, max_rows)
        until = end if end is not None and (since is None or end > since) else cutoff
        rows: int = await conn.fetchval("SELECT inference.roll_up_usage($1, $2)", since, until)
        await conn.execute(
            "UPDATE inference.usage_rollup_state SET ingested_until = $1, last_run_at = now()",
            until)
    return RollupPass(since, until, rows, caught_up=until >= cutoff)


async def catch_up(conn: asyncpg.Connection, margin: timedelta = SETTLE_MARGIN) -> list[RollupPass]:
    """Passes until the rollups hold every row committed before the cutoff."""
    passes = []
    while True:
        done = await roll_up(conn, margin)
        passes.append(done)
        if done.caught_up:
            return passes


def rollup_job(settings: Settings) -> leader.LeaderJob:
    """A pass every ``USAGE_ROLLUP_INTERVAL_SEC``, at once again while a backlog remains."""

    async def step(conn: asyncpg.Connection) -> float:
        done = await roll_up(conn)
        if not done.caught_up:
            log.info("usage rollups: %d rows up to %s; catching up", done.rows,
                     f"{done.ingested_until:%Y-%m-%d %H:%M:%S}")
            return 0.0
        return settings.usage_rollup_interval_sec

    return leader.LeaderJob("usage rollups", locks.USAGE_ROLLUPS, step,
                            standby_sec=min(settings.usage_rollup_interval_sec * 2, STANDBY_SEC))
