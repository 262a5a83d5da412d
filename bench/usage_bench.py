"""The usage API over 10 million audit rows: rollups built, then 30-day queries by day and model.

    python bench/usage_bench.py [--rows 10000000] [--orgs 200] [--days 30] [--queries 100]

In a scratch database of the dev Postgres (bench_usage):
  1. --rows audit rows with generate_series over the last --days days (and one more), in the
     order of their completion as the gateways write them: --orgs organizations of two
     instances each, eight models, every endpoint family, three requests in four made with an
     API key;
  2. the rollups built from them as the fleet-wide job does it (passes of 250,000 rows), then
     one pass over 10,000 rows of the last ten seconds (the job's work every few seconds at
     2,000 requests a second);
  3. a gateway (one worker) answering --queries timed requests, one at a time, for each of:
     tenant   GET /v1/organization/usage/completions, 30 days by day and model, with the API
              key of one instance (ten instances in turn)
     operator the same over every organization, with ADMIN_TOKEN
     operator by organization: 30 days by day and organization, with ADMIN_TOKEN
     and, as the baseline, the operator's query straight on inference.requests, as a usage page
     without rollups would run it (a few times: each is a scan of the whole month).
Prints p50/p95/max (ms) and writes bench/results/usage.json. The database server comes from
DATABASE_URL, else scripts/dev-postgres.sh.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import aiohttp
import asyncpg

from inference_gateway.db.migrate import migrate
from inference_gateway.portal import rollups
from inference_gateway.tenants.keys import create_key

from common import ROOT, dev_database_url, scratch_database

ADMIN_TOKEN = "bench-admin-token-" + "0" * 32
CHUNK = 1_000_000
ENDPOINTS = ["/v1/chat/completions", "/v1/chat/completions", "/v1/chat/completions",
             "/v1/completions", "/v1/responses", "/v1/messages", "/v1/embeddings",
             "/v1/rerank"]
# Row i of $6 over the last $5 seconds: which tenant, model and endpoint, when, and how many
# tokens. Instances belong to one organization each; a key is the instance's (keys are made in
# instance order).
_GENERATE = """
INSERT INTO inference.requests (request_id, organization_id, instance_id, model,
    requested_model, endpoint, prompt_tokens, completion_tokens, cached_tokens, status,
    duration_ms, started_at, completed_at, api_key_id)
SELECT gen_random_uuid(), 'org-' || (i % $3), 'org-' || (i % $3) || '-' || (i / $3 % 2),
       'model-' || (i / 7 % 8), 'model-' || (i / 7 % 8), ($4::text[])[1 + i / 3 % 8],
       20 + i % 500, CASE WHEN i / 3 % 8 < 6 THEN i % 300 ELSE 0 END,
       CASE WHEN i / 3 % 8 < 6 THEN i % 7 * 8 ELSE 0 END, 200, 40 + i % 900, at, at,
       CASE WHEN i % 4 = 0 THEN NULL ELSE 1 + 2 * (i % $3) + i / $3 % 2 END
  FROM generate_series($1::bigint, $2::bigint - 1) AS i,
       LATERAL (SELECT now() - (($6::bigint - i) * $5::bigint / $6::bigint + i % 60)
                           * interval '1 second' AS at) AS t
"""
_RAW_QUERY = """
SELECT date_trunc('day', completed_at, 'UTC') AS day, model, sum(prompt_tokens),
       sum(completion_tokens), sum(cached_tokens), count(*)
  FROM inference.requests
 WHERE completed_at >= to_timestamp($1) AND completed_at < to_timestamp($2)
   AND inference.usage_family(endpoint) = 'completions'
 GROUP BY 1, 2 ORDER BY 1, 2
"""


async def generate(url: str, rows: int, orgs: int, days: int) -> float:
    conn = await asyncpg.connect(url)
    try:
        start = time.perf_counter()
        for first in range(0, rows, CHUNK):
            await conn.execute(_GENERATE, first, min(first + CHUNK, rows), orgs, ENDPOINTS,
                               (days + 1) * 86400, rows)
            print(f"  {min(first + CHUNK, rows):,} rows", flush=True)
        elapsed = time.perf_counter() - start
        await conn.execute("VACUUM ANALYZE inference.requests")
        return elapsed
    finally:
        await conn.close()


async def make_keys(url: str, orgs: int) -> list[str]:
    """One key per instance, in instance order, so the generated key ids match."""
    conn = await asyncpg.connect(url)
    try:
        keys = []
        for org in range(orgs):
            for inst in range(2):
                key, _ = await create_key(conn, f"org-{org}", f"org-{org}-{inst}")
                keys.append(key)
        return keys
    finally:
        await conn.close()


async def build_rollups(url: str, orgs: int) -> dict[str, float]:
    conn = await asyncpg.connect(url)
    try:
        start = time.perf_counter()
        passes = await rollups.catch_up(conn)
        elapsed = time.perf_counter() - start
        rolled = sum(p.rows for p in passes)
        await conn.execute("VACUUM ANALYZE inference.usage_minute, inference.usage_hour, "
                           "inference.usage_day, inference.usage_model_minute, "
                           "inference.usage_model_hour, inference.usage_model_day")
        sizes = {f"rollup_rows_{t}": int(await conn.fetchval(
            f"SELECT count(*) FROM inference.usage_{t}"))
            for t in ("minute", "hour", "day", "model_minute", "model_hour", "model_day",
                      "org_minute", "org_hour", "org_day")}
        # The steady state: what the job does every few seconds.
        await conn.execute(_GENERATE, 0, 10_000, orgs, ENDPOINTS, 10, 10_000)
        await asyncio.sleep(0.1)
        step = time.perf_counter()
        await rollups.catch_up(conn, margin=timedelta(0))
        steady = time.perf_counter() - step
        return {"rollup_seconds": elapsed, "rolled_rows": rolled, "rollup_passes": len(passes),
                "rollup_rows_per_s": rolled / elapsed, "steady_pass_10k_rows_ms": steady * 1000,
                **sizes}
    finally:
        await conn.close()


def start_gateway(url: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {**os.environ, "DATABASE_URL": url, "WEBSERVER_PORT": str(port),
           "WEBSERVER_HOST": "127.0.0.1", "WEBSERVER_WORKERS": "1", "MIGRATE_ON_START": "false",
           "RUN_USAGE_ROLLUPS": "false", "RUN_MAINTENANCE_SCHEDULER": "false",
           "ADMIN_TOKEN": ADMIN_TOKEN, "SPOOL_DIR": str(log.parent / "spool"),
           "MODEL_SERVICE_PORT_MAP": "model-0=http://127.0.0.1:9", "LOG_LEVEL": "WARNING"}
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "inference_gateway", "serve"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


async def wait_ready(base: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            try:
                async with session.get(f"{base}/ready") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the gateway did not become ready")


async def timed(count: int, call: Callable[[int], Awaitable[None]], warmup: int = 3
                ) -> dict[str, float]:
    for i in range(warmup):
        await call(i)
    samples = []
    for i in range(count):
        start = time.perf_counter()
        await call(i)
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return {"p50_ms": statistics.median(samples),
            "p95_ms": samples[max(0, round(0.95 * len(samples)) - 1)], "max_ms": samples[-1],
            "queries": count}


async def query_api(base: str, tokens: list[str], count: int, days: int,
                    group_by: tuple[str, ...] = ("model",)) -> dict[str, float]:
    path = "/v1/organization/usage/completions"
    async with aiohttp.ClientSession() as session:
        async def call(i: int) -> None:
            params = [("start_time", str(int(time.time()) - days * 86400)),
                      ("bucket_width", "1d"), ("limit", "31"),
                      *(("group_by", g) for g in group_by)]
            headers = {"Authorization": f"Bearer {tokens[i % len(tokens)]}"}
            async with session.get(f"{base}{path}", params=params, headers=headers) as resp:
                body = await resp.json()
                assert resp.status == 200, body
                assert len(body["data"]) == days + 1 and not body["has_more"]

        return await timed(count, call)


async def query_raw(url: str, count: int, days: int) -> dict[str, float]:
    conn = await asyncpg.connect(url)
    try:
        async def call(i: int) -> None:
            now = int(time.time())
            await conn.fetch(_RAW_QUERY, now - days * 86400, now)

        return await timed(count, call, warmup=1)
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--orgs", type=int, default=200)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--raw-queries", type=int, default=5)
    args = parser.parse_args()

    url = await scratch_database(os.environ.get("DATABASE_URL") or dev_database_url(),
                                 "bench_usage")
    await migrate(url)
    print(f"generating {args.rows:,} rows over {args.days + 1} days, {args.orgs} organizations")
    results: dict[str, object] = {"rows": args.rows, "organizations": args.orgs,
                                  "instances": 2 * args.orgs, "days": args.days,
                                  "cpus": os.cpu_count()}
    results["generate_seconds"] = await generate(url, args.rows, args.orgs, args.days)
    keys = await make_keys(url, args.orgs)
    print("building the rollups")
    results.update(await build_rollups(url, args.orgs))
    with tempfile.TemporaryDirectory() as scratch:
        proc, base = start_gateway(url, Path(scratch) / "gateway.log")
        try:
            await wait_ready(base)
            print(f"{args.queries} queries each: 30 days by day and model")
            results["tenant"] = await query_api(base, keys[:10], args.queries, args.days)
            results["operator"] = await query_api(base, [ADMIN_TOKEN], args.queries, args.days)
            results["operator_by_organization"] = await query_api(
                base, [ADMIN_TOKEN], args.queries, args.days, ("organization_id",))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    results["raw_table_baseline"] = await query_raw(url, args.raw_queries, args.days)
    operator, raw = results["operator"], results["raw_table_baseline"]
    assert isinstance(operator, dict) and isinstance(raw, dict)
    results["raw_vs_operator_p50_ratio"] = raw["p50_ms"] / operator["p50_ms"]

    print(f"{'query':<34}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}")
    for name in ("tenant", "operator", "operator_by_organization", "raw_table_baseline"):
        r = results[name]
        assert isinstance(r, dict)
        print(f"{name:<34}{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}{r['max_ms']:>9.1f}")
    print(f"rollups: {results['rolled_rows']:,} rows in {results['rollup_seconds']:.1f} s "
          f"({results['rollup_rows_per_s']:,.0f} rows/s); a steady pass of 10,000 rows: "
          f"{results['steady_pass_10k_rows_ms']:.0f} ms")
    print(f"raw table / rollups (operator, p50): {results['raw_vs_operator_p50_ratio']:.0f}x")
    out = ROOT / "bench" / "results" / "usage.json"
    out.write_text(json.dumps(_rounded(results), indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


def _rounded(value: object) -> object:
    if isinstance(value, float):
        return round(value, 1)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


if __name__ == "__main__":
    asyncio.run(main())
