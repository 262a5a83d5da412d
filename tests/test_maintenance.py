"""Partition maintenance on a real Postgres with pg_partman, pg_cron and dblink.

Each test works in scratch databases named maint_test_* (migrated, settings applied) that are
dropped, together with their pg_cron jobs, at the end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import inspect
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from inference_gateway.cli import build_parser
from inference_gateway.db import leader
from inference_gateway.db.cron import CronSchedule
from inference_gateway.db.maintenance import apply_maintenance_settings, run_maintenance_now
from inference_gateway.db.migrate import migrate
from inference_gateway.db.schedule import maintenance_job
from inference_gateway.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
UTC = dt.UTC

MakeDb = Callable[..., Awaitable[str]]


def _with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def _settings(dsn: str, **overrides: Any) -> Settings:
    return load_settings(database_url=dsn, **overrides)


async def _until(check: Callable[[], object], what: str, timeout: float = 15.0,
                 every: float = 0.02) -> Any:
    """Poll ``check`` (a function or coroutine function) until it returns something true, and
    return that; fail after a generous deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(every)


def _round3(value: Decimal) -> Decimal:
    """Postgres's round(numeric, 3): halves away from zero."""
    return value.quantize(Decimal("0.001"), rounding=ROUND_HALF_UP)


@pytest.fixture(scope="module")
def base_dsn(admin_url: str) -> str:
    return admin_url


@pytest.fixture(scope="module")
async def cron_dsn(base_dsn: str) -> str:
    conn = await asyncpg.connect(base_dsn)
    try:
        name = await conn.fetchval("SELECT current_setting('cron.database_name', true)")
    finally:
        await conn.close()
    return _with_db(base_dsn, name or "postgres")


async def _drop_db(base_dsn: str, cron_dsn: str, name: str) -> None:
    dsn = _with_db(base_dsn, name)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.fetchval("SELECT inference.unschedule_maintenance()")
        finally:
            await conn.close()
    except (asyncpg.PostgresError, OSError):
        pass
    cron = await asyncpg.connect(cron_dsn)
    try:
        if await cron.fetchval("SELECT to_regclass('cron.job') IS NOT NULL"):
            await cron.execute(
                "SELECT cron.unschedule(jobid) FROM cron.job WHERE database = $1", name
            )
    finally:
        await cron.close()
    admin = await asyncpg.connect(base_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def make_db(base_dsn: str, cron_dsn: str) -> AsyncIterator[MakeDb]:
    """Create maint_test_* databases, migrated and with settings applied; drop them afterwards."""
    created: list[str] = []

    async def make(*, before_migrate: Callable[[str], Awaitable[None]] | None = None,
                   **overrides: Any) -> str:
        name = f"maint_test_{uuid.uuid4().hex[:10]}"
        admin = await asyncpg.connect(base_dsn)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        created.append(name)
        dsn = _with_db(base_dsn, name)
        if before_migrate is not None:
            await before_migrate(name)
        await migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            await apply_maintenance_settings(conn, _settings(dsn, **overrides))
        finally:
            await conn.close()
        return dsn

    yield make
    for name in created:
        await _drop_db(base_dsn, cron_dsn, name)


async def _partitions(conn: asyncpg.Connection, parent: str) -> dict[str, tuple[dt.datetime,
                                                                              dt.datetime]]:
    rows = await conn.fetch(
        r"""
        SELECT format('%I.%I', n.nspname, c.relname) AS name,
               (regexp_match(pg_get_expr(c.relpartbound, c.oid), $$FROM \('([^']+)'\)$$))[1]
                   ::timestamptz AS lo,
               (regexp_match(pg_get_expr(c.relpartbound, c.oid), $$TO \('([^']+)'\)$$))[1]
                   ::timestamptz AS hi
          FROM pg_inherits i
          JOIN pg_class c ON c.oid = i.inhrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE i.inhparent = $1::regclass
           AND pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT'
        """,
        parent,
    )
    return {r["name"]: (r["lo"], r["hi"]) for r in rows}


def _covered(parts: dict[str, tuple[dt.datetime, dt.datetime]], moment: dt.datetime) -> bool:
    return any(lo <= moment < hi for lo, hi in parts.values())


_INSERT_REQUESTS = """
INSERT INTO inference.requests (request_id, organization_id, instance_id, model, requested_model,
                                endpoint, status, duration_ms, started_at, completed_at)
SELECT gen_random_uuid(), 'org-1', 'inst-1', 'm', 'm', '/v1/chat/completions', 200, 5, t, t
  FROM unnest($1::timestamptz[]) AS t
"""


def _spread(start: dt.datetime, end: dt.datetime, count: int) -> list[dt.datetime]:
    step = (end - start) / (count - 1)
    return [start + step * i for i in range(count)]


async def _default_rows(conn: asyncpg.Connection, default: str) -> int:
    return int(await conn.fetchval(f"SELECT count(*) FROM ONLY {default}"))


# ---------------------------------------------------------------------------------------------


async def test_clock_moved_in_the_data(make_db: MakeDb) -> None:
    dsn = await make_db(requests_retention="13 months")
    conn = await asyncpg.connect(dsn)
    try:
        now = await conn.fetchval("SELECT now()")
        # Two years of records: 21 months back (beyond retention) to 3 months ahead, plus one
        # far in the future; most land in the default partition.
        times = _spread(now - dt.timedelta(days=640), now + dt.timedelta(days=90), 3000)
        times.append(now + dt.timedelta(days=270))
        await conn.execute(_INSERT_REQUESTS, times)
        keep_from = await conn.fetchval("SELECT now() - interval '13 months' + interval '7 days'")
        kept_before = await conn.fetchval(
            "SELECT count(*) FROM inference.requests WHERE completed_at >= $1", keep_from
        )
        before = await _partitions(conn, "inference.requests")
        in_default = await _default_rows(conn, "inference.requests_default")
        assert in_default == sum(1 for t in times if not _covered(before, t)) > 2000

        result = await conn.fetchrow("SELECT * FROM optimized_run_maintenance()")
        after = await _partitions(conn, "inference.requests")

        assert result["status"] == "done"
        assert result["partitions_created"] == len(after.keys() - before.keys()) > 0
        assert result["partitions_dropped"] == len(before.keys() - after.keys())
        assert result["rows_moved"] == in_default
        assert result["default_rows"] == 0
        assert await _default_rows(conn, "inference.requests_default") == 0

        logged = await conn.fetchrow(
            "SELECT * FROM inference.maintenance_log WHERE id = $1", result["log_id"]
        )
        assert logged["function_name"] == "optimized_run_maintenance"
        assert logged["status"] == "done"
        assert logged["partitions_created"] == result["partitions_created"]
        assert logged["partitions_dropped"] == result["partitions_dropped"]
        assert logged["rows_moved"] == in_default
        assert logged["default_rows"] == 0
        assert logged["duration_sec"] == Decimal(
            (logged["finished_at"] - logged["started_at"]) // dt.timedelta(microseconds=1)
        ) / 1_000_000
        # The function reads the clock once for its result and once more for the log: the two
        # are microseconds apart and may round to neighbouring milliseconds.
        assert abs(result["seconds"] - _round3(logged["duration_sec"])) <= Decimal("0.001")

        # Premade ahead of now (despite the partition far in the future), nothing older than the
        # retention window, and nothing inside the window lost.
        for week in range(9):
            assert _covered(after, now + dt.timedelta(weeks=week)), f"week +{week} missing"
        assert _covered(after, now + dt.timedelta(days=270))
        cutoff = await conn.fetchval("SELECT now() - interval '13 months'")
        assert all(hi >= cutoff for _, hi in after.values())
        assert min(lo for lo, _ in after.values()) < cutoff + dt.timedelta(weeks=1)
        kept_after = await conn.fetchval(
            "SELECT count(*) FROM inference.requests WHERE completed_at >= $1", keep_from
        )
        assert kept_after == kept_before

        again = await conn.fetchrow("SELECT * FROM inference.optimized_run_maintenance()")
        assert (again["status"], again["partitions_created"], again["partitions_dropped"],
                again["rows_moved"]) == ("done", 0, 0, 0)

        view = await conn.fetchrow(
            "SELECT * FROM maintenance_performance_analysis "
            "WHERE function_name = 'optimized_run_maintenance'"
        )
        durations = [r["duration_sec"] for r in await conn.fetch(
            "SELECT duration_sec FROM inference.maintenance_log "
            "WHERE function_name = 'optimized_run_maintenance'")]
        assert view["executions"] == len(durations) == 2
        assert view["partitions_created"] == result["partitions_created"]
        assert (view["max_seconds"], view["avg_seconds"], view["min_seconds"]) == (
            _round3(max(durations)), _round3(sum(durations) / 2), _round3(min(durations)))
    finally:
        await conn.close()


async def test_quiet_table_gets_partitions_and_detach_keeps_old_rows(make_db: MakeDb) -> None:
    dsn = await make_db(requests_retention="13 months", retention_keep_table=True)
    conn = await asyncpg.connect(dsn)
    try:
        now = await conn.fetchval("SELECT now()")
        # No traffic for weeks: drop every partition from last week on, as if maintenance had
        # not run since.
        for name, (lo, _) in (await _partitions(conn, "inference.requests")).items():
            if lo >= now - dt.timedelta(days=7):
                await conn.execute(f"DROP TABLE {name}")
        assert not _covered(await _partitions(conn, "inference.requests"), now)
        # And a few records from beyond the retention window, in the default partition.
        old = _spread(now - dt.timedelta(days=600), now - dt.timedelta(days=500), 40)
        await conn.execute(_INSERT_REQUESTS, old)

        result = await conn.fetchrow("SELECT * FROM optimized_run_maintenance()")
        assert result["status"] == "done"
        parts = await _partitions(conn, "inference.requests")
        for week in range(9):
            assert _covered(parts, now + dt.timedelta(weeks=week))
        # Detached, not dropped: the old records are in tables outside the partition set.
        detached = await conn.fetch(
            """
            SELECT format('%I.%I', n.nspname, c.relname) AS name
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'inference' AND c.relname LIKE 'requests\\_p%' AND c.relkind = 'r'
               AND NOT c.relispartition
            """
        )
        assert detached
        rows = 0
        for row in detached:
            rows += await conn.fetchval(f"SELECT count(*) FROM {row['name']}")
        assert rows == len(old)
        assert await conn.fetchval("SELECT count(*) FROM inference.requests") == 0

        # A late record for an interval already detached joins that table.
        await conn.execute(_INSERT_REQUESTS, [old[0]])
        result = await conn.fetchrow("SELECT * FROM optimized_run_maintenance()")
        assert (result["status"], result["rows_moved"], result["default_rows"]) == ("done", 1, 0)
        rows = 0
        for row in detached:
            rows += await conn.fetchval(f"SELECT count(*) FROM {row['name']}")
        assert rows == len(old) + 1
    finally:
        await conn.close()


_CREATE_SET = """
CREATE SCHEMA {schema};
CREATE TABLE {schema}.events (
    id      bigint      NOT NULL,
    at      timestamptz NOT NULL,
    payload text        NOT NULL
) PARTITION BY RANGE (at);
DO $$
BEGIN
    PERFORM partman.create_parent(
        p_parent_table => '{schema}.events', p_control => 'at',
        p_type => CASE WHEN split_part((SELECT extversion FROM pg_extension
                                         WHERE extname = 'pg_partman'), '.', 1)::int >= 5
                       THEN 'range' ELSE 'native' END,
        p_interval => '1 week', p_premake => 4);
END
$$;
"""


async def _fill_default(conn: asyncpg.Connection, schema: str, weeks_from: int,
                        weeks_to: int, per_week: int) -> int:
    """Rows weeks_from..weeks_to weeks in the past: all land in the default partition."""
    return int(await conn.fetchval(
        f"""
        WITH ins AS (
            INSERT INTO {schema}.events (id, at, payload)
            SELECT g, date_trunc('week', now()) - make_interval(weeks => w)
                          + interval '3 days' + make_interval(secs => g),
                   repeat('x', 100)
              FROM generate_series($1::int, $2::int) AS w, generate_series(1, $3::int) AS g
            RETURNING 1)
        SELECT count(*) FROM ins
        """,
        weeks_from, weeks_to, per_week,
    ))


def _overlap(a: tuple[dt.datetime, dt.datetime], b: tuple[dt.datetime, dt.datetime]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


async def test_parallel_two_schemas(make_db: MakeDb) -> None:
    dsn = await make_db()
    conn = await asyncpg.connect(dsn)
    try:
        for schema in ("tenant_a", "tenant_b"):
            await conn.execute(_CREATE_SET.format(schema=schema))
            await _fill_default(conn, schema, 6, 45, 800)

        async def run(jobs: int) -> list[asyncpg.Record]:
            first = await conn.fetchval(
                "SELECT coalesce(max(id), 0) FROM inference.maintenance_log")
            results = await conn.fetch(
                "SELECT * FROM parallel_run_maintenance(ARRAY['tenant_a', 'tenant_b'], $1)", jobs
            )
            assert [r["status"] for r in results] == ["done", "done"]
            return list(await conn.fetch(
                "SELECT * FROM inference.maintenance_log WHERE id > $1 ORDER BY id", first
            ))

        logged = await run(2)
        assert [r["parent_table"] for r in logged] == ["tenant_a.events", "tenant_b.events"]
        assert all(r["function_name"] == "parallel_run_maintenance" for r in logged)
        assert all(r["status"] == "done" and r["rows_moved"] == 40 * 800 for r in logged)
        assert all(r["partitions_created"] == 40 for r in logged)
        for schema in ("tenant_a", "tenant_b"):
            assert await _default_rows(conn, f"{schema}.events_default") == 0
            assert await conn.fetchval(f"SELECT count(*) FROM {schema}.events") == 40 * 800
        a, b = logged
        assert _overlap((a["started_at"], a["finished_at"]), (b["started_at"], b["finished_at"]))

        def concurrent(r: asyncpg.Record) -> tuple[dt.datetime, dt.datetime]:
            steps = json.loads(r["steps"])
            return (dt.datetime.fromisoformat(steps["concurrent_started_at"]),
                    dt.datetime.fromisoformat(steps["concurrent_finished_at"]))

        # The per-set work itself ran at the same time on two connections...
        assert _overlap(concurrent(a), concurrent(b))

        # ... and with one job it does not (so the check above is not trivially true).
        for schema in ("tenant_a", "tenant_b"):
            await _fill_default(conn, schema, 50, 89, 800)
        a1, b1 = await run(1)
        assert not _overlap(concurrent(a1), concurrent(b1))

        # The README's call: pg_partman's schema (every set) and a schema that does not exist.
        notices: list[str] = []
        conn.add_log_listener(lambda _c, m: notices.append(m.message))
        results = await conn.fetch(
            "SELECT (r).* FROM (SELECT parallel_run_maintenance("
            "ARRAY['partman', 'other_schema'], 2) AS r) s"
        )
        assert sorted(r["parent_table"] for r in results) == [
            "inference.requests", "tenant_a.events", "tenant_b.events"]
        assert any("other_schema" in n for n in notices)
    finally:
        await conn.close()


async def test_parallel_reports_a_failed_set_after_the_others(make_db: MakeDb) -> None:
    dsn = await make_db()
    conn = await asyncpg.connect(dsn)
    try:
        for schema in ("good", "bad"):
            await conn.execute(_CREATE_SET.format(schema=schema))
            await _fill_default(conn, schema, 6, 9, 50)
        await conn.execute(
            """
            CREATE FUNCTION bad.refuse() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN RAISE EXCEPTION 'rows may not leave this table'; END $$;
            CREATE TRIGGER refuse BEFORE DELETE ON bad.events_default
               FOR EACH ROW EXECUTE FUNCTION bad.refuse();
            """
        )
        with pytest.raises(asyncpg.PostgresError, match=r"bad\.events"):
            await conn.fetch("SELECT * FROM parallel_run_maintenance(ARRAY['bad', 'good'], 2)")
        logged = {
            r["parent_table"]: r
            for r in await conn.fetch(
                "SELECT * FROM inference.maintenance_log "
                "WHERE function_name = 'parallel_run_maintenance'"
            )
        }
        assert logged["good.events"]["status"] == "done"
        assert logged["good.events"]["rows_moved"] == 4 * 50
        assert logged["bad.events"]["status"] == "failed"
        assert "rows may not leave" in logged["bad.events"]["detail"]
        assert await _default_rows(conn, "good.events_default") == 0
        assert await _default_rows(conn, "bad.events_default") == 4 * 50
    finally:
        await conn.close()


async def test_concurrent_calls_do_not_wait(make_db: MakeDb) -> None:
    dsn = await make_db()
    first = await asyncpg.connect(dsn)
    second = await asyncpg.connect(dsn)
    notices: list[str] = []
    second.add_log_listener(lambda _c, m: notices.append(m.message))
    try:
        tx = first.transaction()
        await tx.start()
        default_mem = await first.fetchval("SHOW maintenance_work_mem")
        assert (await first.fetchrow("SELECT * FROM optimized_run_maintenance()"))["status"] == (
            "done")
        # Raised for this transaction only.
        assert await first.fetchval("SHOW maintenance_work_mem") == "256MB" != default_mem
        # The first run's transaction stays open until the end: a call that waited for it
        # would never return, and fail at the deadline.
        other = await asyncio.wait_for(
            second.fetchrow("SELECT * FROM optimized_run_maintenance()"), timeout=15
        )
        parallel = await asyncio.wait_for(
            second.fetch("SELECT * FROM parallel_run_maintenance(ARRAY['inference'], 2)"),
            timeout=15,
        )
        assert other["status"] == "skipped"
        assert [r["status"] for r in parallel] == ["skipped"]
        assert any("already running" in n for n in notices)
        await tx.rollback()
        assert await first.fetchval("SHOW maintenance_work_mem") == default_mem

        # pg_partman's own run_maintenance running elsewhere: its steps are reported skipped.
        tx = first.transaction()
        await tx.start()
        await first.execute("SELECT pg_advisory_xact_lock(hashtext('pg_partman run_maintenance'))")
        assert (await second.fetchrow("SELECT * FROM optimized_run_maintenance()"))["status"] == (
            "skipped")
        row = await second.fetchrow("SELECT * FROM parallel_run_maintenance(ARRAY['inference'])")
        assert row["status"] == "partial"
        steps = await second.fetchval(
            "SELECT steps FROM inference.maintenance_log WHERE id = $1", row["log_id"]
        )
        assert '"premake": "skipped"' in steps and '"move_default": "skipped"' in steps
        await tx.rollback()

        statuses = await second.fetch(
            "SELECT status, count(*) FROM inference.maintenance_log GROUP BY status"
        )
        assert {r["status"]: r["count"] for r in statuses} == {"skipped": 3, "partial": 1}
    finally:
        await first.close()
        await second.close()


async def test_slow_run_warns(make_db: MakeDb) -> None:
    dsn = await make_db(maintenance_warn_after_sec=0.000001)
    conn = await asyncpg.connect(dsn)
    warnings: list[str] = []
    conn.add_log_listener(
        lambda _c, m: warnings.append(m.message) if m.severity == "WARNING" else None
    )
    try:
        await conn.fetchrow("SELECT * FROM optimized_run_maintenance()")
        assert any("threshold" in w for w in warnings)
    finally:
        await conn.close()


async def test_without_dblink_the_parallel_run_is_serial(make_db: MakeDb) -> None:
    dsn = await make_db()
    conn = await asyncpg.connect(dsn)
    notices: list[str] = []
    conn.add_log_listener(lambda _c, m: notices.append(m.message))
    try:
        await conn.execute("DROP EXTENSION dblink")
        rows = await conn.fetch("SELECT * FROM parallel_run_maintenance(ARRAY['inference'], 2)")
        assert [r["status"] for r in rows] == ["done"]
        assert any("dblink is not installed" in n for n in notices)
        # Scheduling degrades to a notice (pg_cron lives in another database) instead of failing.
        detail = await conn.fetchval("SELECT inference.schedule_maintenance('0 3 * * *')")
        assert await conn.fetchval(  # as on the dev cluster: pg_cron lives elsewhere
            "SELECT coalesce(current_setting('cron.database_name', true), 'postgres') "
            "<> current_database()")
        assert "dblink is not installed here" in detail
        assert await conn.fetchval(
            "SELECT scheduler FROM inference.maintenance_settings") == "gateway"
    finally:
        await conn.close()


async def test_cron_job_once_and_really_runs(make_db: MakeDb, cron_dsn: str) -> None:
    cron = await asyncpg.connect(cron_dsn)
    try:
        await cron.execute("CREATE EXTENSION IF NOT EXISTS pg_cron")

        async def old_partman_job(name: str) -> None:
            await cron.execute(
                "SELECT cron.schedule_in_database('partman maintenance', '*/5 * * * *', "
                "'SELECT partman.run_maintenance()', $1)", name)

        dsn = await make_db(before_migrate=old_partman_job)
        name = urlsplit(dsn).path.lstrip("/")
        settings = _settings(dsn)
        # Migrating (and applying the settings) a second time changes nothing.
        await migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            await apply_maintenance_settings(conn, settings)
            jobs = await cron.fetch("SELECT * FROM cron.job WHERE database = $1", name)
            assert len(jobs) == 1
            job = jobs[0]
            assert job["jobname"] == f"partition maintenance: {name}"
            assert job["schedule"] == "0 2 * * *"
            assert job["command"] == "SELECT inference.optimized_run_maintenance()"

            # Force a run: every minute, then wait for pg_cron's record of it.
            since = await cron.fetchval("SELECT now()")
            await apply_maintenance_settings(conn, _settings(dsn, maintenance_schedule="* * * * *"))
            assert await cron.fetchval(
                "SELECT jobid FROM cron.job WHERE database = $1", name) == job["jobid"]
            run = await _until(lambda: cron.fetchrow(
                "SELECT * FROM cron.job_run_details WHERE jobid = $1 AND start_time >= $2 "
                "AND status IN ('succeeded', 'failed') ORDER BY runid LIMIT 1",
                job["jobid"], since,
            ), "pg_cron ran the job", timeout=75, every=0.2)
            assert run["status"] == "succeeded", run["return_message"]
            await apply_maintenance_settings(conn, settings)  # back to 2 AM: no second run
            assert await conn.fetchval(
                "SELECT count(*) FROM inference.maintenance_log "
                "WHERE function_name = 'optimized_run_maintenance' AND status = 'done' "
                "AND started_at >= $1", since) == 1
            status = await conn.fetchrow(
                "SELECT * FROM inference.maintenance_cron_status() WHERE is_maintenance_job")
            assert status["schedule"] == "0 2 * * *" and status["last_status"] == "succeeded"
        finally:
            await conn.close()
    finally:
        await cron.close()


async def test_cli_run_and_status(make_db: MakeDb, capsys: pytest.CaptureFixture[str]) -> None:
    dsn = await make_db()
    parser = build_parser()
    settings = _settings(dsn)

    def cli(*argv: str) -> int:
        args = parser.parse_args(argv)
        return int(args.handler(args, settings))

    # The handlers run their own event loop, as they do under the real CLI.
    assert await asyncio.to_thread(cli, "maintenance", "run") == 0
    assert await asyncio.to_thread(cli, "maintenance", "run", "--parallel", "2") == 0
    assert await asyncio.to_thread(cli, "maintenance", "status", "--exact") == 0
    out = capsys.readouterr().out
    assert "every partition set: done" in out
    assert "inference.requests: done" in out
    assert "optimized_run_maintenance" in out and "parallel_run_maintenance" in out
    assert "inference.requests_default" in out and "kB" in out

    results = await run_maintenance_now(dsn, parallel=2, schemas=["inference"])
    assert [r.status for r in results] == ["done"]


async def test_the_original_log_table_is_a_view(make_db: MakeDb) -> None:
    dsn = await make_db()
    [result] = await run_maintenance_now(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT function_name, start_time, end_time, duration, rows_processed, "
            "partitions_created, partitions_dropped, additional_info "
            "FROM maintenance_performance_log WHERE id = $1", result.log_id)
    finally:
        await conn.close()
    assert row["function_name"] == "optimized_run_maintenance"
    assert row["duration"] == row["end_time"] - row["start_time"]
    assert row["rows_processed"] == result.rows_moved
    assert row["partitions_created"] == result.partitions_created
    assert json.loads(row["additional_info"])["status"] == result.status


async def test_gateway_scheduler_runs_once_and_defers_to_pg_cron(
    make_db: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The database's pg_cron job is made as for any database (pg_cron is preloaded on the dev
    # cluster, and reached over dblink), on a schedule twelve hours away so that pg_cron itself
    # never runs maintenance during the test.
    now = dt.datetime.now(UTC)
    dsn = await make_db(maintenance_schedule=f"{now.minute} {(now.hour + 12) % 24} * * *")
    conn = await asyncpg.connect(dsn)
    tried: list[int] = []
    take_lead = leader.take_lead

    async def noting_take_lead(c: asyncpg.Connection, key: int) -> bool:
        tried.append(key)
        return await take_lead(c, key)

    monkeypatch.setattr(leader, "take_lead", noting_take_lead)
    try:
        async def runs_at_a_firing() -> int:
            """Two schedulers of ``* * * * *`` on a clock of the test's own, just before a
            minute; the clock reaches the minute once both have tried to lead, and they are
            stopped once the one leading has had its turn at the minute. Returns how many
            maintenance runs were logged meanwhile."""
            fire = dt.datetime(2024, 3, 9, 2, 0, tzinfo=UTC)
            clock = [fire - dt.timedelta(milliseconds=50)]
            leads: list[int] = []
            turns: list[tuple[int, dt.datetime]] = []

            def job(i: int) -> leader.LeaderJob:
                base = maintenance_job(dsn, "* * * * *", now=lambda: clock[0])

                async def step(c: asyncpg.Connection) -> float:
                    at = clock[0]
                    delay = await base.step(c)
                    turns.append((i, at))
                    return delay

                def on_lead() -> None:
                    leads.append(i)
                    assert base.on_lead is not None
                    base.on_lead()

                return dataclasses.replace(base, step=step, on_lead=on_lead)

            first = await conn.fetchval(
                "SELECT coalesce(max(id), 0) FROM inference.maintenance_log")
            tried.clear()
            stop = asyncio.Event()
            tasks = [asyncio.create_task(leader.run(dsn, job(i), stop)) for i in range(2)]
            try:
                await _until(lambda: len(tried) >= 2 and turns, "a scheduler led")
                clock[0] = fire
                await _until(lambda: any(at >= fire for _, at in turns), "the minute's turn")
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
            assert len(leads) == 1 and {i for i, _ in turns} == set(leads)
            return int(await conn.fetchval(
                "SELECT count(*) FROM inference.maintenance_log WHERE id > $1", first))

        # The pg_cron job made by the migration is in charge: the scheduler stands by.
        assert await conn.fetchval(
            "SELECT count(*) FROM inference.maintenance_cron_status() "
            "WHERE is_maintenance_job AND active") == 1
        assert await runs_at_a_firing() == 0
        # Without it, exactly one of the two schedulers runs maintenance.
        assert await conn.fetchval("SELECT inference.unschedule_maintenance()")
        assert await runs_at_a_firing() == 1
    finally:
        await conn.close()


def test_cron_schedule_parsing() -> None:
    at = dt.datetime(2024, 3, 9, 1, 59, 30, tzinfo=UTC)  # a Saturday
    assert CronSchedule.parse("0 2 * * *").next_after(at) == at.replace(hour=2, minute=0,
                                                                         second=0)
    assert CronSchedule.parse("0 2 * * *").next_after(at.replace(hour=2, minute=0)) == (
        dt.datetime(2024, 3, 10, 2, 0, tzinfo=UTC))
    assert CronSchedule.parse("*/15 * * * *").next_after(at) == dt.datetime(
        2024, 3, 9, 2, 0, tzinfo=UTC)
    assert CronSchedule.parse("30 4 * * mon-fri").next_after(at) == dt.datetime(
        2024, 3, 11, 4, 30, tzinfo=UTC)
    assert CronSchedule.parse("0 0 29 feb *").next_after(at) == dt.datetime(
        2028, 2, 29, tzinfo=UTC)
    assert CronSchedule.parse("@daily").next_after(at) == dt.datetime(2024, 3, 10, tzinfo=UTC)
    # Both day fields restricted: either matches, as in cron.
    assert CronSchedule.parse("0 0 1 * 0").next_after(at) == dt.datetime(2024, 3, 10, tzinfo=UTC)
    assert CronSchedule.parse("0 0 * * 7").next_after(at) == dt.datetime(2024, 3, 10, tzinfo=UTC)
    for bad in ("0 2 * *", "61 * * * *", "* * 0 * *", "a b c d e", "5-1 * * * *"):
        with pytest.raises(ValueError, match="invalid cron schedule"):
            CronSchedule.parse(bad)
    with pytest.raises(ValueError, match="never fires"):
        CronSchedule.parse("0 0 31 2 *").next_after(at)
