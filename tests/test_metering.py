"""The meter's policies with a writer that fails on purpose: rejects, outages, a full spool."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from inference_gateway.metering import meter as meter_module
from inference_gateway.metering.meter import Meter
from inference_gateway.metering.record import UsageRecord, new_request_id
from inference_gateway.metering.spool import DEAD_LETTER_FILE, encode_line
from inference_gateway.metering.writer import WriteResult
from inference_gateway.settings import load_settings


def record(i: int) -> UsageRecord:
    return UsageRecord(f"00000000-0000-4000-8000-{i:012d}", "o", "i", "m", "m", "/v1/x",
                       i, 1, 200, False, False, 1, 1, 1000.0, 1001.0)


async def until(check: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Wait for a condition; fail after a generous deadline."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.005)


class FlakyWriter:
    """Refuses everything while ``down``; rejects records whose prompt_tokens are in ``bad``."""

    def __init__(self) -> None:
        self.down = False
        self.refused = 0  # writes refused while down
        self.bad: set[int] = set()
        self.stored: list[UsageRecord] = []
        self.batches: list[int] = []
        self.while_writing: Callable[[], None] = lambda: None

    async def write(self, records: list[UsageRecord]) -> WriteResult:
        if self.down:
            self.refused += 1
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


async def test_unreadable_lines_are_dead_lettered_and_the_rest_written(tmp_path: Path) -> None:
    """A segment left by a dead process, damaged: a checksum that does not match, a line whose
    checksum matches but that is not JSON, and JSON that is not a usage record."""
    bad = [
        b"0badc0de " + record(90).to_json(),
        encode_line(b"{not json")[:-1],
        encode_line(b'{"request_id": "x"}')[:-1],
    ]
    lines = [encode_line(record(0).to_json()), bad[0] + b"\n", encode_line(record(1).to_json()),
             bad[1] + b"\n", bad[2] + b"\n", encode_line(record(2).to_json())]
    orphan = tmp_path / "seg-00000000000000000001-1-1.log"
    orphan.write_bytes(b"".join(lines))
    writer = FlakyWriter()
    meter = make_meter(tmp_path, writer)
    await meter.start()
    assert await meter.flush(5)
    await meter.close()
    assert [r.prompt_tokens for r in writer.stored] == [0, 1, 2]
    entries = [json.loads(line) for line in (tmp_path / DEAD_LETTER_FILE).read_text().splitlines()]
    assert entries == [{"reason": "unreadable spool line (checksum or JSON)",
                        "line": line.decode()} for line in bad]
    assert (meter.spool.stats.corrupt, meter.spool.stats.dead_letters) == (3, 3)
    assert not orphan.exists()  # acknowledged: the next start does not set them aside again

    again = make_meter(tmp_path, FlakyWriter())
    await again.start()
    assert await again.flush(5)
    await again.close()
    assert again.spool.stats.dead_letters == 0
    assert len((tmp_path / DEAD_LETTER_FILE).read_text().splitlines()) == 3


async def test_outage_keeps_records_until_the_writer_recovers(tmp_path: Path) -> None:
    writer = FlakyWriter()
    writer.down = True
    meter = make_meter(tmp_path, writer)
    await meter.start()
    for i in range(50):
        meter.submit(record(i))
    await until(lambda: writer.refused >= 3, "the writer tried again while Postgres was down")
    assert writer.stored == [] and meter.health.database_ok is False
    assert meter.spool.has_pending()
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
    drains: list[list[int]] = []  # the batches written by the end of each drain
    drain = meter._drain

    async def noting_drain() -> None:
        await drain()
        drains.append(list(writer.batches))

    meter._drain = noting_drain  # type: ignore[method-assign]
    await meter.start()
    arrivals = iter([[100, 101, 102]])
    writer.while_writing = lambda: [meter.submit(record(i)) for i in next(arrivals, [])]
    for i in range(10):
        meter.submit(record(i))
    first = asyncio.ensure_future(meter.flush())  # the next timed flush is a minute away
    await until(lambda: drains, "the first drain")
    assert drains[0] == [10]  # the three that arrived during the write were left for later
    assert await meter.flush(5)  # an explicit flush writes them
    assert writer.batches == [10, 3]
    assert await first
    await meter.close()
    assert [r.prompt_tokens for r in writer.stored] == [*range(10), 100, 101, 102]


async def test_a_backlog_is_written_in_full_batches_back_to_back(tmp_path: Path) -> None:
    writer = FlakyWriter()
    writer.down = True
    meter = make_meter(tmp_path, writer, usage_flush_interval_ms=60_000, usage_batch_size=4)
    await meter.start()
    for i in range(10):
        meter.submit(record(i))
    meter._wake.set()  # as a full batch or a flush would
    await until(lambda: writer.refused, "a write refused while Postgres was down")
    writer.down = False
    assert await meter.flush(5)
    await meter.close()
    assert writer.batches == [4, 4, 2]
    assert [r.prompt_tokens for r in writer.stored] == list(range(10))


async def test_a_record_is_written_within_the_interval_without_a_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No once-a-second disk check either: only the flush interval's timer can wake the writer.
    monkeypatch.setattr(meter_module, "DISK_CHECK_INTERVAL_SEC", 3600.0)
    writer = FlakyWriter()
    meter = make_meter(tmp_path, writer)
    await meter.start()
    meter.submit(record(1))
    await until(lambda: writer.stored, "the record written without a flush")
    assert [r.prompt_tokens for r in writer.stored] == [1]
    await meter.close()
    assert writer.batches == [1]


async def test_an_idle_writer_does_not_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a record, a flush or the once-a-second disk check wakes it (the last is put off
    here, so that the counts are exact)."""
    monkeypatch.setattr(meter_module, "DISK_CHECK_INTERVAL_SEC", 3600.0)
    writer = FlakyWriter()
    meter = make_meter(tmp_path, writer)  # a 10 ms flush interval

    class CountingEvent(asyncio.Event):
        waits = 0  # the writer's loop waits on its event once per turn

        async def wait(self) -> bool:  # type: ignore[override]
            self.waits += 1
            return await super().wait()

    meter._wake = wake = CountingEvent()
    drains = 0
    drain = meter._drain

    async def counting_drain() -> None:
        nonlocal drains
        drains += 1
        await drain()

    meter._drain = counting_drain  # type: ignore[method-assign]
    await meter.start()
    # Nothing to wait for: the point is that nothing happens. A writer polling at its 10 ms
    # flush interval would turn 30 times in this time.
    await asyncio.sleep(0.3)
    assert (wake.waits, drains) == (1, 0)  # the first wait, still going on
    await meter.close()


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


def test_request_ids_are_random_uuids_and_a_forked_worker_has_its_own() -> None:
    ids = [new_request_id() for _ in range(1000)]  # more than one fetch of random bytes
    assert len(set(ids)) == 1000
    assert all(uuid.UUID(i).version == 4 and uuid.UUID(i).variant == uuid.RFC_4122
               and str(uuid.UUID(i)) == i for i in ids)
    new_request_id()  # bytes are fetched and not all used: a child must not reuse them
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.waitpid(child, 0)
    theirs = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert theirs not in {new_request_id() for _ in range(300)}
