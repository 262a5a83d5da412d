"""The meter's policies with a writer that fails on purpose: rejects, outages, a full spool."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

from inference_gateway.metering.meter import Meter
from inference_gateway.metering.record import UsageRecord
from inference_gateway.metering.spool import DEAD_LETTER_FILE
from inference_gateway.metering.writer import WriteResult
from inference_gateway.settings import load_settings


def record(i: int) -> UsageRecord:
    return UsageRecord(f"00000000-0000-4000-8000-{i:012d}", "o", "i", "m", "m", "/v1/x",
                       i, 1, 200, False, False, 1, 1, 1000.0, 1001.0)


class FlakyWriter:
    """Refuses everything while ``down``; rejects records whose prompt_tokens are in ``bad``."""

    def __init__(self) -> None:
        self.down = False
        self.bad: set[int] = set()
        self.stored: list[UsageRecord] = []
        self.batches: list[int] = []
        self.while_writing: Callable[[], None] = lambda: None

    async def write(self, records: list[UsageRecord]) -> WriteResult:
        if self.down:
            raise ConnectionRefusedError("postgres is down")
        self.batches.append(len(records))
        self.while_writing()
        rejected = [(r, "check violation") for r in records if r.prompt_tokens in self.bad]
        good = [r for r in records if r.prompt_tokens not in self.bad]
        self.stored.extend(good)
        return WriteResult(len(good), rejected)

    async def ping(self) -> None:
        if self.down:
            raise ConnectionRefusedError("postgres is down")

    async def close(self) -> None:
        pass


def make_meter(tmp_path: Path, writer: FlakyWriter, **overrides: object) -> Meter:
    settings = load_settings(**{"spool_dir": tmp_path, "usage_flush_interval_ms": 10,
                                "writer_max_backoff_sec": 0.05, **overrides})
    return Meter(settings, writer)


async def test_rejected_record_goes_to_dead_letters_and_does_not_block(tmp_path: Path) -> None:
    writer = FlakyWriter()
    writer.bad = {3}
    meter = make_meter(tmp_path, writer)
    await meter.start()
    for i in range(6):
        meter.submit(record(i))
    assert await meter.flush(5)
    await meter.close()
    assert [r.prompt_tokens for r in writer.stored] == [0, 1, 2, 4, 5]
    [line] = (tmp_path / DEAD_LETTER_FILE).read_text().splitlines()
    entry = json.loads(line)
    assert entry["reason"] == "check violation" and '"prompt_tokens":3' in entry["line"]
    assert meter.spool.stats.dead_letters == 1


async def test_outage_keeps_records_until_the_writer_recovers(tmp_path: Path) -> None:
    writer = FlakyWriter()
    writer.down = True
    meter = make_meter(tmp_path, writer)
    await meter.start()
    for i in range(50):
        meter.submit(record(i))
    assert not await meter.flush(0.3)
    assert writer.stored == [] and meter.health.database_ok is False
    writer.down = False
    assert await meter.flush(5)
    await meter.close()
    assert [r.prompt_tokens for r in writer.stored] == list(range(50))


async def test_records_that_arrive_during_a_write_wait_for_the_next_flush(
    tmp_path: Path,
) -> None:
    """Chasing them at once would write a handful of rows per COPY, back to back."""
    writer = FlakyWriter()
    meter = make_meter(tmp_path, writer, usage_flush_interval_ms=60_000)
    await meter.start()
    arrivals = iter([[100, 101, 102]])
    writer.while_writing = lambda: [meter.submit(record(i)) for i in next(arrivals, [])]
    for i in range(10):
        meter.submit(record(i))
    assert not await meter.flush(0.3)  # the next timed flush is a minute away
    assert writer.batches == [10]
    assert await meter.flush(5)  # an explicit flush writes them
    assert writer.batches == [10, 3]
    await meter.close()


async def test_a_backlog_is_written_in_full_batches_back_to_back(tmp_path: Path) -> None:
    writer = FlakyWriter()
    writer.down = True
    meter = make_meter(tmp_path, writer, usage_flush_interval_ms=60_000, usage_batch_size=4)
    await meter.start()
    for i in range(10):
        meter.submit(record(i))
    assert not await meter.flush(0.3)
    writer.down = False
    assert await meter.flush(5)
    await meter.close()
    assert writer.batches == [4, 4, 2]
    assert [r.prompt_tokens for r in writer.stored] == list(range(10))


async def test_a_record_is_written_within_the_interval_without_a_flush(tmp_path: Path) -> None:
    writer = FlakyWriter()
    meter = make_meter(tmp_path, writer)
    await meter.start()
    meter.submit(record(1))
    for _ in range(500):
        if writer.stored:
            break
        await asyncio.sleep(0.01)
    await meter.close()
    assert [r.prompt_tokens for r in writer.stored] == [1]


async def test_an_idle_writer_does_not_poll(tmp_path: Path) -> None:
    """Only a record, a flush or the once-a-second disk check wakes it."""
    writer = FlakyWriter()
    meter = make_meter(tmp_path, writer)  # a 10 ms flush interval
    wake_ups = 0
    drain = meter._drain

    async def counting_drain() -> None:
        nonlocal wake_ups
        wake_ups += 1
        await drain()

    meter._drain = counting_drain  # type: ignore[method-assign]
    await meter.start()
    await asyncio.sleep(0.5)
    await meter.close()
    assert wake_ups <= 2  # the start, and the final flush of close()


async def test_refuse_policy_answers_503_once_the_cap_is_reached(tmp_path: Path) -> None:
    writer = FlakyWriter()
    writer.down = True
    meter = make_meter(tmp_path, writer, spool_full_policy="refuse", spool_max_bytes=4096)
    await meter.start()
    while meter.spool.pending_bytes() < 4096:
        meter.submit(record(1))
    meter._check_disk()
    assert not meter.accepting()
    writer.down = False
    assert await meter.flush(5)
    meter._check_disk()
    assert meter.accepting()
    await meter.close()


async def test_drop_policy_keeps_serving_and_counts(tmp_path: Path) -> None:
    writer = FlakyWriter()
    writer.down = True
    meter = make_meter(tmp_path, writer, spool_full_policy="drop", spool_max_bytes=4096)
    await meter.start()
    while meter.spool.pending_bytes() < 4096:
        meter.submit(record(1))
    meter._check_disk()
    assert meter.accepting()
    meter.submit(record(2))
    assert meter.spool.stats.dropped == 1
    writer.down = False
    await meter.close()


async def test_spill_policy_refuses_only_under_the_disk_floor(tmp_path: Path) -> None:
    meter = make_meter(tmp_path, FlakyWriter(), spool_max_bytes=4096,
                       spool_min_free_bytes=2**62)  # more free space than any disk has
    await meter.start()
    assert not meter.accepting()
    await meter.close()
