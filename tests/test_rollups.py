"""The usage rollups against a real Postgres: every row once, late rows, rows still being
committed, a backlog in passes, and the fleet-wide job."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import asyncpg
import pytest

from inference_gateway.db import leader, locks
from inference_gateway.portal import rollups
from inference_gateway.settings import Settings

from usage_support import GENERATION, POOLING, Row, drop_database, fresh_database, insert

NO_MARGIN = timedelta(0)
DAY = 86400


@pytest.fixture
async def conn(admin_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to an empty database of this test's own: the rollups cover every row."""
    name = f"gateway_rollups_{uuid.uuid4().hex[:8]}"
    url = await fresh_database(admin_url, name)
    connection = await asyncpg.connect(url)
    try:
        yield connection
    finally:
        await connection.close()
        await drop_database(admin_url, name)


async def rolled(conn: asyncpg.Connection, table: str) -> dict[tuple[object, ...], list[int]]:
    """A rollup's rows: its keys (times as Unix seconds), then its four sums."""
    out: dict[tuple[object, ...], list[int]] = {}
    for row in await conn.fetch(f"SELECT * FROM inference.{table}"):
        values = [int(v.timestamp()) if isinstance(v, datetime) else v for v in row.values()]
        out[tuple(values[:-4])] = values[-4:]
    return out


def summed(rows: list[Row], width: int, by: str = ""
           ) -> dict[tuple[object, ...], list[int]]:
    """What a rollup of ``width`` seconds must hold for these rows: by organization, family,
    bucket, instance, model and key, or by family, bucket and ``by`` (model or org) alone."""
    out: dict[tuple[object, ...], list[int]] = {}
    for r in rows:
        if r.family is None:
            continue
        bucket = r.at - r.at % width
        key = (r.family, bucket, getattr(r, by)) if by else \
            (r.org, r.family, bucket, r.instance, r.model, r.key_id or 0)
        sums = out.setdefault(key, [0, 0, 0, 0])
        for i, n in enumerate((r.prompt, r.completion, r.cached, 1)):
            sums[i] += n
    return out


async def check(conn: asyncpg.Connection, rows: list[Row]) -> None:
    for unit, width in (("minute", 60), ("hour", 3600), ("day", DAY)):
        assert await rolled(conn, f"usage_{unit}") == summed(rows, width), unit
        assert await rolled(conn, f"usage_model_{unit}") == summed(rows, width, "model"), unit
        assert await rolled(conn, f"usage_org_{unit}") == summed(rows, width, "org"), unit


def sample(now: int, count: int, spread: int = 3 * DAY) -> list[Row]:
    endpoints = (*GENERATION, *POOLING, "/v1/messages/count_tokens", "/v1/responses/{id}")
    return [Row(f"org-{i % 3}", f"inst-{i % 2}", f"model-{i % 4}", endpoints[i % len(endpoints)],
                now - (i * 7919) % spread, prompt=10 + i % 13, completion=i % 7, cached=i % 5,
                key_id=(i % 3) or None)
            for i in range(count)]


async def test_every_row_is_rolled_up_once(conn: asyncpg.Connection) -> None:
    now = int(time.time())
    rows = sample(now, 500)
    await insert(conn, rows)
    first = await rollups.catch_up(conn, NO_MARGIN)
    assert sum(p.rows for p in first) == sum(1 for r in rows if r.family)
    await check(conn, rows)
    # Nothing new: a pass adds nothing, however often it runs.
    again = await rollups.catch_up(conn, NO_MARGIN)
    assert sum(p.rows for p in again) == 0
    await check(conn, rows)
    more = sample(now, 40, spread=600)
    await insert(conn, more)
    await rollups.catch_up(conn, NO_MARGIN)
    await check(conn, rows + more)


async def test_late_rows_join_their_old_buckets(conn: asyncpg.Connection) -> None:
    now = int(time.time())
    rows = sample(now, 200)
    await insert(conn, rows)
    await rollups.catch_up(conn, NO_MARGIN)
    day_before = (now - 3 * DAY) - (now - 3 * DAY) % DAY
    # A spool replayed after an outage: rows of three days ago reach Postgres now.
    late = [Row("org-1", "inst-0", "model-1", "/v1/chat/completions", day_before + 3600 + i,
                prompt=100, completion=50, cached=25) for i in range(30)]
    await insert(conn, late)
    [done] = await rollups.catch_up(conn, NO_MARGIN)
    assert done.rows == 30
    await check(conn, rows + late)
    day = await rolled(conn, "usage_day")
    assert day[("org-1", "completions", day_before, "inst-0", "model-1", 0)] == \
        [3000, 1500, 750, 30]


async def test_rows_still_being_committed_wait_for_the_commit(
        conn: asyncpg.Connection, admin_url: str) -> None:
    """A row is rolled up once the transaction that wrote it has committed, never before and
    never skipped, even when rows written after it committed first."""
    url = f"{admin_url.rpartition('/')[0]}/{await conn.fetchval('SELECT current_database()')}"
    writer = await asyncpg.connect(url)
    now = int(time.time())
    slow = Row("org-slow", "i", "m", "/v1/completions", now, prompt=7)
    fast = Row("org-fast", "i", "m", "/v1/completions", now, prompt=11)
    try:
        transaction = writer.transaction()
        await transaction.start()
        await insert(writer, [slow])
        await insert(conn, [fast])  # committed, and ingested after the open transaction began
        held = await rollups.catch_up(conn, NO_MARGIN)
        assert sum(p.rows for p in held) == 0, "the cutoff must wait for the open transaction"
        await transaction.commit()
    finally:
        await writer.close()
    await rollups.catch_up(conn, NO_MARGIN)
    await check(conn, [slow, fast])


async def test_a_backlog_is_taken_in_bounded_passes(conn: asyncpg.Connection) -> None:
    now = int(time.time())
    rows = sample(now, 1000)
    await insert(conn, rows)
    # Rows stored in one statement with one ingestion time, more of them than a pass takes.
    same = [Row("org-same", "i", "m", "/v1/embeddings", now - 60, prompt=3) for _ in range(250)]
    await insert(conn, same)
    await conn.execute("UPDATE inference.requests SET ingested_at = now() "
                       "WHERE organization_id = 'org-same'")
    passes = []
    while not passes or not passes[-1].caught_up:
        passes.append(await rollups.roll_up(conn, NO_MARGIN, max_rows=100))
    assert len(passes) >= 10
    assert max(p.rows for p in passes[:-1]) <= 100
    assert passes[-1].rows == 250  # the rows of one instant go together
    await check(conn, rows + same)


async def test_the_job_runs_in_one_process_of_the_fleet(conn: asyncpg.Connection,
                                                        admin_url: str) -> None:
    url = f"{admin_url.rpartition('/')[0]}/{await conn.fetchval('SELECT current_database()')}"
    settings = Settings(database_url=url, usage_rollup_interval_sec=0.1)
    stop = asyncio.Event()
    jobs = [asyncio.create_task(leader.run(url, rollups.rollup_job(settings), stop))
            for _ in range(2)]
    try:
        rows = sample(int(time.time()), 100)
        await insert(conn, rows)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if await rolled(conn, "usage_day") == summed(rows, DAY):
                break
            await asyncio.sleep(0.1)
        await check(conn, rows)
        holders = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1 AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            locks.USAGE_ROLLUPS)
        assert holders == 1
    finally:
        stop.set()
        await asyncio.gather(*jobs)
