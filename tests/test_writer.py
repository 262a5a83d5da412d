"""The batched COPY writer against the real audit table."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
import pytest

from inference_gateway.metering import writer as writer_module
from inference_gateway.metering.record import UsageRecord
from inference_gateway.metering.writer import PACE_ROWS, PostgresWriter, row


def records(n: int, org: str, **overrides: object) -> list[UsageRecord]:
    base = dict(organization_id=org, instance_id="inst", model="m", requested_model="m",
                endpoint="/v1/chat/completions", prompt_tokens=3, completion_tokens=4,
                status=200, streamed=False, disconnected=False, duration_ms=5, ttfb_ms=1,
                started_at=1_790_000_000.0, completed_at=1_790_000_001.0)
    base.update(overrides)
    return [UsageRecord(request_id=str(uuid.uuid4()), **base) for _ in range(n)]  # type: ignore[arg-type]


async def count(database_url: str, org: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM inference.requests WHERE organization_id = $1", org))
    finally:
        await conn.close()


async def test_replayed_batch_adds_no_duplicates(database_url: str) -> None:
    org = f"org-{uuid.uuid4().hex[:8]}"
    batch = records(250, org)
    writer = PostgresWriter(database_url)
    try:
        assert (await writer.write(batch)).inserted == 250
        again = await writer.write(batch)  # a crash between commit and acknowledgement
        assert again.inserted == 0 and again.rejected == []
    finally:
        await writer.close()
    assert await count(database_url, org) == 250


async def test_rejected_records_are_isolated(database_url: str) -> None:
    org = f"org-{uuid.uuid4().hex[:8]}"
    good = records(10, org)
    bad = records(1, org, prompt_tokens=-1)  # violates the CHECK constraint
    writer = PostgresWriter(database_url)
    try:
        result = await writer.write(good[:5] + bad + good[5:])
    finally:
        await writer.close()
    assert result.inserted == 10
    assert [r.request_id for r, _ in result.rejected] == [bad[0].request_id]
    assert "check" in result.rejected[0][1].lower()
    assert await count(database_url, org) == 10


async def test_times_and_ids_are_stored_exactly(database_url: str) -> None:
    org = f"org-{uuid.uuid4().hex[:8]}"
    [record] = records(1, org, started_at=1_790_000_000.123456, completed_at=1_790_000_001.5)
    writer = PostgresWriter(database_url)
    try:
        await writer.write([record])
    finally:
        await writer.close()
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetchrow(
            "SELECT request_id::text, extract(epoch FROM started_at)::numeric AS s, "
            "completed_at::text AS c FROM inference.requests WHERE organization_id = $1", org)
    finally:
        await conn.close()
    assert stored["request_id"] == record.request_id
    assert float(stored["s"]) == 1_790_000_000.123456
    expected = datetime.fromtimestamp(1_790_000_001.5, UTC).strftime("%Y-%m-%d %H:%M:%S.5+00")
    assert stored["c"] == expected


async def test_a_malformed_id_is_rejected_alone(database_url: str) -> None:
    org = f"org-{uuid.uuid4().hex[:8]}"
    batch = records(3, org)
    bad = dataclasses.replace(batch[1], request_id="not-a-uuid")
    writer = PostgresWriter(database_url)
    try:
        result = await writer.write([batch[0], bad, batch[2]])
    finally:
        await writer.close()
    assert result.inserted == 2 and [r.request_id for r, _ in result.rejected] == ["not-a-uuid"]


async def _largest_stretch(
    work: Callable[[], Awaitable[object]], progress: Callable[[], int]
) -> int:
    """The most progress ``work`` made without letting another task run."""
    seen = [progress()]
    stop = False

    async def other_task() -> None:
        while not stop:
            seen.append(progress())
            await asyncio.sleep(0)

    other = asyncio.create_task(other_task())
    await asyncio.sleep(0)
    try:
        await work()
    finally:
        stop = True
        await other
    seen.append(progress())
    return max(b - a for a, b in itertools.pairwise(seen))


def _count_statements(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows of each COPY statement the writer sends from now on."""
    sizes: list[int] = []
    copy_in = writer_module._copy_in

    async def counting(conn: asyncpg.Connection, table: str, schema: str | None,
                       rows: list[tuple[object, ...]]) -> None:
        sizes.append(len(rows))
        await copy_in(conn, table, schema, rows)

    monkeypatch.setattr(writer_module, "_copy_in", counting)
    return sizes


@pytest.mark.parametrize(("batch", "statements"), [
    (10, [10]),
    (100, [16] * 6 + [4]),
    (1000, [125] * 8),
])
async def test_a_batch_goes_in_short_statements(
    database_url: str, monkeypatch: pytest.MonkeyPatch, batch: int, statements: list[int]
) -> None:
    """Short while keeping up (Postgres then works in short runs), few for a backlog."""
    org = f"org-{uuid.uuid4().hex[:8]}"
    sizes = _count_statements(monkeypatch)
    writer = PostgresWriter(database_url)
    try:
        assert (await writer.write(records(batch, org))).inserted == batch
    finally:
        await writer.close()
    assert sizes == statements
    assert await count(database_url, org) == batch


async def test_the_statements_of_a_batch_commit_together(database_url: str) -> None:
    """A bad row in the last statement: what came before must not be stored yet, or the
    retry of the good rows would find them there and count them as already written."""
    org = f"org-{uuid.uuid4().hex[:8]}"
    good = records(99, org)
    bad = records(1, org, prompt_tokens=-1)
    writer = PostgresWriter(database_url)
    try:
        result = await writer.write(good[:95] + bad + good[95:])
    finally:
        await writer.close()
    assert result.inserted == 99 and len(result.rejected) == 1
    assert await count(database_url, org) == 99


async def test_a_large_batch_leaves_room_for_requests(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer shares the event loop with requests: it must hand it back while it works."""
    org = f"org-{uuid.uuid4().hex[:8]}"
    batch = records(2000, org)
    converted = 0

    def counting_row(record: UsageRecord) -> tuple[object, ...]:
        nonlocal converted
        converted += 1
        return row(record)

    monkeypatch.setattr(writer_module, "row", counting_row)
    writer = PostgresWriter(database_url)
    await writer.ping()
    try:
        stretch = await _largest_stretch(lambda: writer.write(batch), lambda: converted)
    finally:
        await writer.close()
    assert converted == 2000
    assert stretch == PACE_ROWS  # converted in runs of PACE_ROWS, a yield after each
    assert await count(database_url, org) == 2000
