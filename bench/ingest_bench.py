"""Ingest rate into the partitioned audit table: batched COPY against one INSERT per record.

    python bench/ingest_bench.py [--records 200000] [--baseline-records 5000]

Measures, in one run against the dev Postgres:
  insert-per-record  the baseline: one INSERT statement (its own transaction) per record
  copy-batches       PostgresWriter: COPY into staging + INSERT .. ON CONFLICT, 1,000 a batch
  spool+copy         the whole metering path: records appended to the disk spool, then drained
Prints rows/s for each and the ratios, and writes bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

from inference_gateway.config import load_settings
from inference_gateway.metering import Meter
from inference_gateway.migrate import migrate
from inference_gateway.usage import COLUMNS, UsageRecord
from inference_gateway.writer import PostgresWriter

from common import ROOT, dev_database_url, scratch_database


def make_records(n: int) -> list[UsageRecord]:
    now = time.time()
    return [
        UsageRecord(str(uuid.uuid4()), f"org-{i % 50}", f"inst-{i % 200}", "facebook/opt-125m",
                    "facebook/opt-125m", "/v1/chat/completions", 20 + i % 300, 1 + i % 500,
                    200, i % 3 == 0, False, 40 + i % 900, 5, now - 3600 + i * 0.001,
                    now - 3600 + i * 0.001 + 0.5)
        for i in range(n)
    ]


async def insert_per_record(url: str, records: list[UsageRecord]) -> float:
    cols = ", ".join(COLUMNS)
    params = ", ".join(f"${i + 1}" for i in range(len(COLUMNS)))
    sql = f"INSERT INTO inference.requests ({cols}) VALUES ({params})"
    conn = await asyncpg.connect(url)
    try:
        start = time.perf_counter()
        for record in records:
            await conn.execute(sql, *record.to_row())
        return time.perf_counter() - start
    finally:
        await conn.close()


async def copy_batches(url: str, records: list[UsageRecord], batch: int) -> float:
    writer = PostgresWriter(url)
    try:
        start = time.perf_counter()
        for i in range(0, len(records), batch):
            await writer.write(records[i:i + batch])
        return time.perf_counter() - start
    finally:
        await writer.close()


async def spool_and_copy(url: str, records: list[UsageRecord], batch: int) -> float:
    with tempfile.TemporaryDirectory() as spool_dir:
        settings = load_settings(database_url=url, spool_dir=Path(spool_dir),
                                 usage_batch_size=batch, usage_flush_interval_ms=50)
        meter = Meter(settings)
        await meter.start()
        start = time.perf_counter()
        for record in records:
            meter.submit(record)
        drained = await meter.flush(600)
        elapsed = time.perf_counter() - start
        await meter.close()
        assert drained, "the spool did not drain"
        return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--baseline-records", type=int, default=5_000)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()

    url = await scratch_database(dev_database_url(), "bench_ingest")
    await migrate(url)
    results: dict[str, float] = {}
    base = args.baseline_records
    baseline_seconds = await insert_per_record(url, make_records(base))
    results["insert_per_record_rows_per_s"] = base / baseline_seconds
    n = args.records
    results["copy_batches_rows_per_s"] = n / await copy_batches(url, make_records(n), args.batch)
    results["spool_copy_rows_per_s"] = n / await spool_and_copy(url, make_records(n), args.batch)
    conn = await asyncpg.connect(url)
    try:
        stored = await conn.fetchval("SELECT count(*) FROM inference.requests")
    finally:
        await conn.close()
    assert stored == base + 2 * n, f"expected {base + 2 * n} rows, found {stored}"
    results["copy_vs_insert_ratio"] = (
        results["copy_batches_rows_per_s"] / results["insert_per_record_rows_per_s"])
    results["spool_copy_vs_insert_ratio"] = (
        results["spool_copy_rows_per_s"] / results["insert_per_record_rows_per_s"])

    print(f"{'path':<22}{'rows/s':>12}")
    print(f"{'insert-per-record':<22}{results['insert_per_record_rows_per_s']:>12,.0f}")
    print(f"{'copy-batches':<22}{results['copy_batches_rows_per_s']:>12,.0f}")
    print(f"{'spool+copy':<22}{results['spool_copy_rows_per_s']:>12,.0f}")
    print(f"copy / insert ratio:       {results['copy_vs_insert_ratio']:.1f}x")
    print(f"spool+copy / insert ratio: {results['spool_copy_vs_insert_ratio']:.1f}x")
    print(f"rows stored: {stored} (all accounted for)")
    out = ROOT / "bench" / "results" / "ingest.json"
    out.write_text(json.dumps({k: round(v, 1) for k, v in results.items()}, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
