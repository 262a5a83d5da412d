"""Ingest rate into the partitioned audit table: batched COPY against one INSERT per record.

    python bench/ingest_bench.py [--records 200000] [--baseline-records 5000]

Measures, in one run against the dev Postgres:
  insert-per-record  the baseline: one INSERT statement (its own transaction) per record
  copy-batches       PostgresWriter: 1,000 records a batch, COPYed in one transaction
  spool drain        the whole writer: records read back from the disk spool, then COPYed
                     (and the cost of appending a record to the spool, on the request path)
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

from inference_gateway.db.migrate import migrate
from inference_gateway.metering.meter import Meter
from inference_gateway.metering.record import COLUMNS, UsageRecord
from inference_gateway.metering.spool import Spool
from inference_gateway.metering.writer import PostgresWriter, configure, row
from inference_gateway.settings import load_settings

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
    await configure(conn)
    try:
        start = time.perf_counter()
        for record in records:
            await conn.execute(sql, *row(record))
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


async def spool_and_copy(url: str, records: list[UsageRecord], batch: int
                         ) -> tuple[float, float]:
    """Seconds to append every record to a spool, and to drain that spool into Postgres.

    The drain is the writer's catch-up rate: what it does after an outage, or at start-up
    with records left by a crashed process.
    """
    with tempfile.TemporaryDirectory() as spool_dir:
        settings = load_settings(database_url=url, spool_dir=Path(spool_dir),
                                 usage_batch_size=batch, usage_flush_interval_ms=50)
        filler = Spool(Path(spool_dir), settings.spool_segment_bytes)
        filler.open()
        start = time.perf_counter()
        for record in records:
            filler.append(record)
        appended = time.perf_counter() - start
        filler.close()
        meter = Meter(settings)
        start = time.perf_counter()
        await meter.start()  # claims the segments just written and drains them
        drained = await meter.flush(600)
        elapsed = time.perf_counter() - start
        await meter.close()
        assert drained, "the spool did not drain"
        return appended, elapsed


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
    appended, drained = await spool_and_copy(url, make_records(n), args.batch)
    results["spool_append_us_per_record"] = appended / n * 1e6
    results["spool_drain_rows_per_s"] = n / drained
    conn = await asyncpg.connect(url)
    try:
        stored = await conn.fetchval("SELECT count(*) FROM inference.requests")
    finally:
        await conn.close()
    assert stored == base + 2 * n, f"expected {base + 2 * n} rows, found {stored}"
    results["copy_vs_insert_ratio"] = (
        results["copy_batches_rows_per_s"] / results["insert_per_record_rows_per_s"])
    results["spool_drain_vs_insert_ratio"] = (
        results["spool_drain_rows_per_s"] / results["insert_per_record_rows_per_s"])

    print(f"{'path':<22}{'rows/s':>12}")
    print(f"{'insert-per-record':<22}{results['insert_per_record_rows_per_s']:>12,.0f}")
    print(f"{'copy-batches':<22}{results['copy_batches_rows_per_s']:>12,.0f}")
    print(f"{'spool drain':<22}{results['spool_drain_rows_per_s']:>12,.0f}")
    print(f"copy / insert ratio:        {results['copy_vs_insert_ratio']:.1f}x")
    print(f"spool drain / insert ratio: {results['spool_drain_vs_insert_ratio']:.1f}x")
    print(f"spool append (request path): {results['spool_append_us_per_record']:.1f} µs a record")
    print(f"rows stored: {stored} (all accounted for)")
    out = ROOT / "bench" / "results" / "ingest.json"
    out.write_text(json.dumps({k: round(v, 1) for k, v in results.items()}, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
