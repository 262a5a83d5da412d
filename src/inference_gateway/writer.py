"""Writes batches of usage records into ``inference.requests``, exactly once.

A batch is COPYed straight into the table. If any of its rows is already there (a batch
replayed after a crash: committed, but not yet acknowledged in the spool), the unique key on
``(request_id, completed_at)`` aborts that COPY, and the batch goes the slower, idempotent way:
COPY into a session-local staging table, then ``INSERT ... ON CONFLICT DO NOTHING``. Either
way, no request is stored twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg

from inference_gateway.usage import COLUMNS, UsageRecord

log = logging.getLogger(__name__)

_STAGING_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS usage_staging "
    "(LIKE inference.requests INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
_COLS = ", ".join(COLUMNS)
_MOVE = (
    f"INSERT INTO inference.requests ({_COLS}) SELECT {_COLS} FROM usage_staging "
    "ON CONFLICT (request_id, completed_at) DO NOTHING"
)

# SQLSTATE classes that condemn the data itself: 22 data exception, 23 integrity violation.
_REJECTING_CLASSES = ("22", "23")
_UNIQUE_VIOLATION = "23505"


# Records read, converted or encoded between two yields to the request path. The writer shares
# its event loop with the requests; a thousand rows in one go would hold each up by milliseconds.
PACE_ROWS = 32

_PG_EPOCH = 946_684_800  # 2000-01-01 in Unix time: where Postgres counts timestamps from


def row(record: UsageRecord) -> tuple[object, ...]:
    """The record as a row in the order of ``COLUMNS``, in the types ``configure`` expects.

    Times stay floats and the id a string: the connection's codecs encode them directly, which
    costs less than building ``datetime`` and ``UUID`` objects for every row.
    """
    return (
        record.request_id, record.organization_id, record.instance_id, record.model,
        record.requested_model, record.endpoint, record.prompt_tokens,
        record.completion_tokens, record.status, record.streamed, record.disconnected,
        record.duration_ms, record.ttfb_ms, record.started_at, record.completed_at,
    )


async def paced(rows: list[tuple[object, ...]]) -> AsyncIterator[tuple[object, ...]]:
    """The rows for a COPY, handing the event loop back every ``PACE_ROWS`` rows.

    asyncpg encodes a COPY's rows as it iterates over them, so pacing the iteration spreads
    the encoding between requests instead of stalling them all at once.
    """
    for i, values in enumerate(rows, 1):
        yield values
        if i % PACE_ROWS == 0:
            await asyncio.sleep(0)


def _encode_time(seconds: float) -> tuple[int]:
    return (round((seconds - _PG_EPOCH) * 1_000_000),)


def _decode_time(value: tuple[int]) -> float:
    return value[0] / 1_000_000 + _PG_EPOCH


async def configure(conn: asyncpg.Connection) -> None:
    """Let this connection take timestamps as Unix-time floats (see ``row``)."""
    await conn.set_type_codec("timestamptz", schema="pg_catalog", encoder=_encode_time,
                              decoder=_decode_time, format="tuple")


def is_rejection(exc: BaseException) -> bool:
    if isinstance(exc, ValueError | TypeError | OverflowError):
        return True  # the row could not even be encoded
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate[:2] in _REJECTING_CLASSES


@dataclass
class WriteResult:
    inserted: int
    rejected: list[tuple[UsageRecord, str]]


class PostgresWriter:
    """One connection, reopened on demand; every failure that is not a rejection propagates."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: asyncpg.Connection | None = None

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self._dsn, timeout=5)
            await configure(self._conn)
            await self._conn.execute(_STAGING_DDL)
        return self._conn

    async def write(self, records: list[UsageRecord]) -> WriteResult:
        """Insert the batch; records Postgres rejects are found by halving and returned."""
        rows: list[tuple[object, ...]] = []
        rejected: list[tuple[UsageRecord, str]] = []
        good: list[UsageRecord] = []
        for i, record in enumerate(records, 1):
            try:
                rows.append(row(record))
                good.append(record)
            except (ValueError, TypeError, OverflowError) as exc:
                rejected.append((record, f"cannot convert: {exc}"))
            if i % PACE_ROWS == 0:
                await asyncio.sleep(0)
        inserted = await self._write_splitting(good, rows, rejected)
        return WriteResult(inserted, rejected)

    async def _write_splitting(
        self,
        records: list[UsageRecord],
        rows: list[tuple[object, ...]],
        rejected: list[tuple[UsageRecord, str]],
    ) -> int:
        if not rows:
            return 0
        try:
            return await self._copy(rows)
        except Exception as exc:
            if not is_rejection(exc):
                await self._drop_connection()
                raise
            if len(rows) == 1:
                rejected.append((records[0], f"{type(exc).__name__}: {exc}"))
                return 0
        half = len(rows) // 2
        first = await self._write_splitting(records[:half], rows[:half], rejected)
        second = await self._write_splitting(records[half:], rows[half:], rejected)
        return first + second

    async def _copy(self, rows: list[tuple[object, ...]]) -> int:
        conn = await self._connection()
        try:
            await conn.copy_records_to_table(
                "requests", schema_name="inference", records=paced(rows), columns=COLUMNS
            )
            return len(rows)
        except asyncpg.PostgresError as exc:
            if getattr(exc, "sqlstate", None) != _UNIQUE_VIOLATION:
                raise
        async with conn.transaction():
            await conn.copy_records_to_table("usage_staging", records=paced(rows),
                                             columns=COLUMNS)
            status: str = await conn.execute(_MOVE)
        return int(status.rsplit(" ", 1)[-1])

    async def ping(self) -> None:
        conn = await self._connection()
        await conn.fetchval("SELECT 1")

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await conn.close(timeout=2)
            except Exception:
                conn.terminate()
