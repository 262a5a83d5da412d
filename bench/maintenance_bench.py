"""Partition maintenance, serial against parallel, on a backlog of rows in the default partitions.

The data: --rows records (default 10 million) over --partitions weekly partitions (default 60),
spread over --sets partition sets in their own schemas (default 4; tables shaped like
inference.requests), all sitting in the default partitions, as after premaking fell behind or a
backfill. Retention is set so that the oldest third of the intervals expires. One maintenance run
then moves every row into its partition, creates the partitions, premakes and drops what expired.

Each mode gets a fresh database (maint_test_bench_*) loaded the same way and vacuumed, then:
  serial:   SELECT * FROM inference.optimized_run_maintenance()
  parallel: SELECT * FROM inference.parallel_run_maintenance(ARRAY['partman'], --jobs)

Usage: python bench/maintenance_bench.py [--rows N] [--partitions N] [--sets N] [--jobs N]
The database server comes from DATABASE_URL, else scripts/dev-postgres.sh.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from inference_gateway.db.migrate import migrate

from common import dev_database_url

ROOT = Path(__file__).resolve().parents[1]

_CREATE_SET = """
CREATE SCHEMA {schema};
CREATE TABLE {schema}.requests (
    LIKE inference.requests INCLUDING DEFAULTS INCLUDING CONSTRAINTS
) PARTITION BY RANGE (completed_at);
ALTER TABLE {schema}.requests ADD PRIMARY KEY (request_id, completed_at);
CREATE INDEX ON {schema}.requests (organization_id, completed_at);
CREATE INDEX ON {schema}.requests (ingested_at);
"""
_CREATE_PARENT = """
SELECT partman.create_parent(p_parent_table => $1, p_control => 'completed_at', p_type => $2,
                             p_interval => '1 week', p_premake => 4)
"""
_CONFIGURE = """
UPDATE partman.part_config SET infinite_time_partitions = true, retention = $2
 WHERE parent_table = $1
"""

# Rows of week w (counting back from the current one) for one set, spread over that week.
_LOAD = """
INSERT INTO {schema}.requests (request_id, organization_id, instance_id, model, requested_model,
                               endpoint, prompt_tokens, completion_tokens, status, duration_ms,
                               started_at, completed_at)
SELECT gen_random_uuid(), 'org-' || (g % 500), 'inst-' || (g % 7), 'model-a', 'model-a',
       '/v1/chat/completions', g % 2000, g % 500, 200, g % 3000, t - interval '1 second', t
  FROM generate_series(1, $2::int) AS g,
       LATERAL (SELECT date_trunc('week', now()) - make_interval(weeks => $1::int)
                       + make_interval(secs => (g::float8 * 604799 / $2::int))) AS x(t)
"""


def _with_db(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


@dataclass(frozen=True)
class Plan:
    rows: int
    partitions: int
    sets: int
    jobs: int

    @property
    def weeks_per_set(self) -> int:
        return max(self.partitions // self.sets, 1)

    @property
    def rows_per_week(self) -> int:
        return max(self.rows // (self.sets * self.weeks_per_set), 1)

    @property
    def first_week(self) -> int:
        return 6  # older than the 4 weeks create_parent makes behind now: all in the default

    @property
    def retention_weeks(self) -> int:
        # The oldest third of the intervals expires.
        return self.first_week + self.weeks_per_set - self.weeks_per_set // 3


async def _prepare(base: str, name: str, plan: Plan) -> str:
    admin = await asyncpg.connect(base)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = _with_db(base, name)
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.fetchval("SELECT inference.unschedule_maintenance()")
        major = await conn.fetchval(
            "SELECT split_part(extversion, '.', 1)::int FROM pg_extension "
            "WHERE extname = 'pg_partman'"
        )
        await conn.execute("SET client_min_messages = warning")
        for k in range(plan.sets):
            async with conn.transaction():
                await conn.execute(_CREATE_SET.format(schema=f"bench_{k}"))
                await conn.execute(_CREATE_PARENT, f"bench_{k}.requests",
                                   "range" if major >= 5 else "native")
                await conn.execute(_CONFIGURE, f"bench_{k}.requests",
                                   f"{plan.retention_weeks} weeks")
    finally:
        await conn.close()

    async def load(k: int) -> None:
        c = await asyncpg.connect(dsn)
        try:
            for w in range(plan.first_week, plan.first_week + plan.weeks_per_set):
                await c.execute(_LOAD.format(schema=f"bench_{k}"), w, plan.rows_per_week)
            await c.execute(f"VACUUM (ANALYZE) bench_{k}.requests_default")
        finally:
            await c.close()

    started = time.monotonic()
    await asyncio.gather(*(load(k) for k in range(plan.sets)))
    print(f"  loaded {plan.rows_per_week * plan.weeks_per_set * plan.sets} rows into "
          f"{name} in {time.monotonic() - started:.1f} s", flush=True)
    return dsn


async def _measure(dsn: str, plan: Plan, parallel: bool) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET client_min_messages = warning")
        started = time.monotonic()
        if parallel:
            rows = await conn.fetch(
                "SELECT * FROM inference.parallel_run_maintenance(ARRAY['partman'], $1)",
                plan.jobs,
            )
        else:
            rows = await conn.fetch("SELECT * FROM inference.optimized_run_maintenance()")
        seconds = time.monotonic() - started
        for row in rows:
            print(f"    {row['parent_table'] or 'every set'}: {row['status']}, "
                  f"{row['partitions_created']} created, {row['partitions_dropped']} dropped, "
                  f"{row['rows_moved']} rows moved, {row['default_rows']} left in default, "
                  f"{row['seconds']} s")
        left = await conn.fetchval(
            "SELECT sum(row_count) FROM inference.partition_overview(true) WHERE is_default"
        )
        if left:
            raise RuntimeError(f"{left} rows are still in default partitions")
        again = time.monotonic()
        if parallel:
            await conn.fetch(
                "SELECT * FROM inference.parallel_run_maintenance(ARRAY['partman'], $1)",
                plan.jobs,
            )
        else:
            await conn.fetch("SELECT * FROM inference.optimized_run_maintenance()")
        print(f"    a second run with nothing to do: {time.monotonic() - again:.2f} s")
        return seconds
    finally:
        await conn.close()


async def _drop(base: str, name: str) -> None:
    admin = await asyncpg.connect(base)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--partitions", type=int, default=60)
    parser.add_argument("--sets", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=None,
                        help="parallel connections (default: sets, at most the CPU count)")
    parser.add_argument("--keep", action="store_true", help="keep the databases afterwards")
    args = parser.parse_args(argv)
    jobs = args.jobs or max(1, min(args.sets, os.cpu_count() or 1))
    plan = Plan(rows=args.rows, partitions=args.partitions, sets=args.sets, jobs=jobs)
    base = dev_database_url()
    print(f"{plan.rows_per_week * plan.weeks_per_set * plan.sets} rows over "
          f"{plan.weeks_per_set * plan.sets} weekly partitions in {plan.sets} partition sets "
          f"({plan.weeks_per_set} weeks each, retention {plan.retention_weeks} weeks), "
          f"all in the default partitions; parallel jobs: {plan.jobs}", flush=True)

    results: dict[str, float] = {}
    for mode in ("serial", "parallel"):
        name = f"maint_test_bench_{mode}"
        print(f"{mode}:", flush=True)
        dsn = await _prepare(base, name, plan)
        try:
            results[mode] = await _measure(dsn, plan, parallel=mode == "parallel")
        finally:
            if not args.keep:
                await _drop(base, name)
        print(f"  {mode} maintenance: {results[mode]:.2f} s", flush=True)

    print()
    print(f"serial   (optimized_run_maintenance):       {results['serial']:8.2f} s")
    print(f"parallel (parallel_run_maintenance, {plan.jobs} jobs): {results['parallel']:8.2f} s")
    print(f"ratio serial/parallel: {results['serial'] / results['parallel']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
