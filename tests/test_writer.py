"""The batched COPY writer against the real audit table."""

from __future__ import annotations

import uuid

import asyncpg

from inference_gateway.usage import UsageRecord
from inference_gateway.writer import PostgresWriter


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
