"""The usage reporter: what each organization, instance and model used, hour by hour, for billing.

* Hours go by ``completed_at`` (UTC). An hour is reported once it has been over for
  ``BILLING_GRACE_SEC``: one event per organization, instance and model, keyed
  ``<instance>-<model>-<YYYYMMDDHH>``, with the fields the original server sent.
* Whether a row has been counted goes by ``ingested_at``, the time it reached Postgres. Each pass
  takes an ingestion cutoff and counts only rows ingested before it; the watermark remembers the
  cutoff, so the next pass picks up exactly the rows ingested since. A row whose hour was already
  reported (a spool replayed after an outage) goes into a *correction* event for that hour, keyed
  ``<instance>-<model>-<YYYYMMDDHH>-r<N>`` (N counts the hour's corrections). Corrections add to
  the hour; they never restate it. Every row is billed exactly once.
* The cutoff is a little in the past, and never later than the start of a transaction that is
  still writing: a row is only counted once the transaction that inserted it has committed.
* Events go to ``billing.outbox``, at most 1,000 per message, in the transaction that advances
  ``billing.watermark``: a crash leaves both as they were, and the next pass does the work again.
  Sinks other than the outbox deliver from there (see ``billing_sinks``), at least once, in order.
* One reporter runs at a time per database: the one holding its lock (see ``db.leader``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import groupby

import asyncpg
import orjson

from inference_gateway.billing.sinks import OutboxMessage, Sink
from inference_gateway.db import leader, locks
from inference_gateway.settings import Settings

log = logging.getLogger(__name__)

HOUR = timedelta(hours=1)
MAX_EVENTS_PER_MESSAGE = 1000
MAX_HOURS_PER_PASS = 24  # a long backlog is reported in several transactions
SETTLE_MARGIN = timedelta(seconds=2)
DELIVER_BATCH = 100
STANDBY_SEC = 60.0  # how soon another process takes over from a reporter that went away

_CLOCK = """
SELECT least(clock_timestamp() - $1::interval,
             (SELECT min(xact_start) FROM pg_stat_activity
               WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()
                 AND datname = current_database())) AS cutoff,
       date_trunc('hour', clock_timestamp() - $2::interval, 'UTC') AS hour_end
"""
_USAGE = """
SELECT date_trunc('hour', completed_at, 'UTC') AS period_start,
       organization_id, instance_id, model,
       max(completed_at) AS completed_at,
       sum(prompt_tokens)::bigint AS prompt_tokens,
       sum(completion_tokens)::bigint AS completion_tokens,
       sum(cached_tokens)::bigint AS cached_tokens
  FROM inference.requests
 WHERE {where}
 GROUP BY 1, 2, 3, 4
 ORDER BY 1, 2, 3, 4
"""
_REGULAR = _USAGE.format(where="completed_at >= $1 AND completed_at < $2 AND ingested_at < $3")
_LATE = _USAGE.format(where="ingested_at >= $1 AND ingested_at < $2 AND completed_at < $3")
_NEXT_REVISIONS = """
INSERT INTO billing.corrections AS c (instance_id, model, period_start, revision)
SELECT instance_id, model, period_start, 1
  FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS t(instance_id, model, period_start)
ON CONFLICT (instance_id, model, period_start) DO UPDATE SET revision = c.revision + 1
RETURNING instance_id, model, period_start, revision
"""


@dataclass(frozen=True, slots=True)
class HourlyUsage:
    period_start: datetime
    organization_id: str
    instance_id: str
    model: str
    completed_at: datetime  # the last request's
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # of prompt_tokens, read from the prefix cache: priced apart


@dataclass(frozen=True, slots=True)
class PassReport:
    reported_from: datetime
    reported_until: datetime
    ingested_until: datetime
    events: int
    corrections: int
    messages: int
    caught_up: bool


def original_time(ts: datetime) -> str:
    """A UTC time as the original server printed it: ``2024-05-10 12:59:59.123456 UTC``."""
    ts = ts.astimezone(UTC)
    micro = ts.microsecond
    if micro == 0:
        fraction = ""
    elif micro % 1000 == 0:
        fraction = f".{micro // 1000:03d}"
    else:
        fraction = f".{micro:06d}"
    return f"{ts:%Y-%m-%d %H:%M:%S}{fraction} UTC"


def idempotency_key(usage: HourlyUsage, revision: int = 0) -> str:
    key = f"{usage.instance_id}-{usage.model}-{usage.period_start.astimezone(UTC):%Y%m%d%H}"
    return f"{key}-r{revision}" if revision else key


def event(usage: HourlyUsage, revision: int = 0) -> dict[str, object]:
    """One event, in the original's shape (token counts are strings there).

    ``cached_tokens`` is ours: the part of ``prompt_tokens`` vLLM read from its prefix cache.
    """
    return {
        "idempotency_key": idempotency_key(usage, revision),
        "organization_id": usage.organization_id,
        "instance_id": usage.instance_id,
        "payload": {
            "completed_at": original_time(usage.completed_at),
            "model": usage.model,
            "prompt_tokens": str(usage.prompt_tokens),
            "completion_tokens": str(usage.completion_tokens),
            "cached_tokens": str(usage.cached_tokens),
        },
    }


def messages(
    events: list[tuple[datetime, dict[str, object]]], correction: bool
) -> list[tuple[uuid.UUID, datetime, bool, str]]:
    """Outbox rows ``(message_id, hour, correction, body)``: one hour per message, 1,000 events
    at most, each body ``{"id": ..., "message": [events]}`` as the original sent."""
    rows = []
    for hour, group in groupby(events, key=lambda item: item[0]):
        batch = [e for _, e in group]
        for start in range(0, len(batch), MAX_EVENTS_PER_MESSAGE):
            message_id = uuid.uuid4()
            body = {"id": str(message_id), "message": batch[start:start + MAX_EVENTS_PER_MESSAGE]}
            rows.append((message_id, hour, correction, orjson.dumps(body).decode()))
    return rows


async def _usage(conn: asyncpg.Connection, query: str, *args: object) -> list[HourlyUsage]:
    return [HourlyUsage(**dict(row)) for row in await conn.fetch(query, *args)]


async def _revisions(
    conn: asyncpg.Connection, late: list[HourlyUsage]
) -> dict[tuple[str, str, datetime], int]:
    """Take the next correction number of every (instance, model, hour) with late usage."""
    groups = sorted({(u.instance_id, u.model, u.period_start) for u in late})
    if not groups:
        return {}
    rows = await conn.fetch(
        _NEXT_REVISIONS, [g[0] for g in groups], [g[1] for g in groups], [g[2] for g in groups]
    )
    return {(r["instance_id"], r["model"], r["period_start"]): r["revision"] for r in rows}


async def write_outbox(
    conn: asyncpg.Connection, rows: list[tuple[uuid.UUID, datetime, bool, str]]
) -> None:
    await conn.executemany(
        "INSERT INTO billing.outbox (message_id, period_start, correction, body) "
        "VALUES ($1, $2, $3, $4::jsonb)",
        rows,
    )


async def advance_watermark(
    conn: asyncpg.Connection, reported_until: datetime, ingested_until: datetime
) -> None:
    await conn.execute(
        "INSERT INTO billing.watermark (id, reported_until, ingested_until, last_run_at) "
        "VALUES (true, $1, $2, now()) ON CONFLICT (id) DO UPDATE SET "
        "reported_until = EXCLUDED.reported_until, ingested_until = EXCLUDED.ingested_until, "
        "last_run_at = EXCLUDED.last_run_at",
        reported_until,
        ingested_until,
    )


async def report_pass(
    conn: asyncpg.Connection, grace: timedelta, margin: timedelta = SETTLE_MARGIN
) -> PassReport:
    """Report the hours that are over and the late rows since the last pass, in one transaction.

    The first pass ever starts with the last hour that is over. Call it with the reporter lock
    held (or alone), outside a transaction: the cutoff must see the other sessions as they are.
    """
    clock = await conn.fetchrow(_CLOCK, margin, grace)
    cutoff: datetime = clock["cutoff"]
    hour_end: datetime = clock["hour_end"]
    async with conn.transaction():
        state = await conn.fetchrow(
            "SELECT reported_until, ingested_until FROM billing.watermark FOR UPDATE"
        )
        reported = state["reported_until"] if state else None
        ingested = state["ingested_until"] if state else None
        if reported is None or ingested is None:
            reported, ingested = hour_end - HOUR, cutoff
        cutoff = max(cutoff, ingested)  # never count a row twice, even if the clock goes back
        until = max(reported, min(hour_end, reported + MAX_HOURS_PER_PASS * HOUR))

        regular = await _usage(conn, _REGULAR, reported, until, cutoff)
        late = await _usage(conn, _LATE, ingested, cutoff, reported)
        revisions = await _revisions(conn, late)
        rows = messages([(u.period_start, event(u)) for u in regular], correction=False)
        rows += messages(
            [
                (u.period_start,
                 event(u, revisions[(u.instance_id, u.model, u.period_start)]))
                for u in late
            ],
            correction=True,
        )
        await write_outbox(conn, rows)
        await advance_watermark(conn, until, cutoff)
    return PassReport(
        reported_from=reported,
        reported_until=until,
        ingested_until=cutoff,
        events=len(regular),
        corrections=len(late),
        messages=len(rows),
        caught_up=until >= hour_end,
    )


async def report(
    conn: asyncpg.Connection, grace: timedelta, margin: timedelta = SETTLE_MARGIN
) -> list[PassReport]:
    """Passes until every hour that is over has been reported."""
    passes = []
    while True:
        done = await report_pass(conn, grace, margin)
        passes.append(done)
        if done.events or done.corrections:
            log.info(
                "billing: reported %s to %s: %d events, %d corrections, %d messages",
                f"{done.reported_from:%Y-%m-%d %H:%M}", f"{done.reported_until:%H:%M} UTC",
                done.events, done.corrections, done.messages,
            )
        if done.caught_up:
            return passes


async def deliver(conn: asyncpg.Connection, sink: Sink) -> int:
    """Send the undelivered outbox messages in order; stops at the first failure.

    Returns how many were sent. A message is marked delivered only after the sink accepted it,
    so a crash in between sends it again (consumers deduplicate by idempotency key).
    """
    sent = 0
    while True:
        rows = await conn.fetch(
            "SELECT id, message_id, period_start, correction, body::text AS body, created_at "
            "FROM billing.outbox WHERE delivered_at IS NULL ORDER BY id LIMIT $1",
            DELIVER_BATCH,
        )
        if not rows:
            return sent
        for row in rows:
            message = OutboxMessage(**dict(row))
            try:
                await sink.send(message)
            except Exception as exc:
                await conn.execute(
                    "UPDATE billing.outbox SET attempts = attempts + 1, last_error = $2 "
                    "WHERE id = $1",
                    message.id, str(exc)[:1000] or type(exc).__name__,
                )
                raise
            await conn.execute(
                "UPDATE billing.outbox SET attempts = attempts + 1, last_error = NULL, "
                "delivered_at = now() WHERE id = $1",
                message.id,
            )
            sent += 1


async def run_once(settings: Settings, sink: Sink | None) -> list[PassReport] | None:
    """One report and delivery, for the command line; None if another reporter is active."""
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        if not await leader.take_lead(conn, locks.BILLING_REPORTER):
            return None
        passes = await report(conn, timedelta(seconds=settings.billing_grace_sec))
        if sink is not None:
            try:
                await deliver(conn, sink)
            except Exception as exc:  # reported all the same: the outbox keeps the rest
                log.warning("billing: delivery stopped (%s); the next run retries", exc)
        return passes
    finally:
        await conn.close()


def billing_job(settings: Settings, sink: Sink | None) -> leader.LeaderJob:
    """Report and deliver every ``BILLING_PERIOD_SEC``, in one process of the fleet."""
    grace = timedelta(seconds=settings.billing_grace_sec)

    async def step(conn: asyncpg.Connection) -> float:
        await report(conn, grace)
        if sink is not None:
            await deliver(conn, sink)
        return settings.billing_period_sec

    return leader.LeaderJob("billing reporter", locks.BILLING_REPORTER, step,
                            standby_sec=min(settings.billing_period_sec, STANDBY_SEC))


async def run_reporter(settings: Settings, sink: Sink | None,
                       stop: asyncio.Event | None = None) -> None:
    """The reporter until stopped or cancelled; closes the sink at the end."""
    try:
        await leader.run(settings.database_url, billing_job(settings, sink), stop)
    finally:
        if sink is not None:
            with contextlib.suppress(Exception):
                await sink.close()
