"""Writes batches of usage records into ``inference.requests``, exactly once.

A batch is COPYed straight into the table, in one transaction. If any of its rows is already
there (a batch replayed after a crash: committed, but not yet acknowledged in the spool), the
unique key on ``(request_id, completed_at)`` aborts that transaction, and the batch goes the
slower, idempotent way: COPY into a session-local staging table, then ``INSERT ... ON CONFLICT
DO NOTHING``. Either way, no request is stored twice.

The transaction holds several short COPY statements rather than one long one. Postgres works
through a statement's rows in one run; where it shares CPUs with the gateway, the kernel can
queue a request's process behind that run, and a run of a few hundred rows is milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import asyncpg

from inference_gateway.metering.record import COLUMNS, UsageRecord, values

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


# Records read or converted between two yields to the request path, and the rows of one COPY
# statement while the writer keeps up. The writer shares its event loop with the requests, and
# Postgres may share the CPUs: a thousand rows in one go would hold requests up by milliseconds.
PACE_ROWS = 16
# A batch is split into at most this many statements: a backlog (full batches) then pays for
# few statements, and each is still a fraction of the batch.
MAX_COPIES_PER_BATCH = 8

_PG_EPOCH = 946_684_800  # 2000-01-01 in Unix time: where Postgres counts timestamps from


def row(record: UsageRecord) -> tuple[object, ...]:
    """The record as a row in the order of ``COLUMNS``, in the types ``configure`` expects.

    Times stay floats and the id a string: the connection's codecs encode them directly, which
    costs less than building ``datetime`` and ``UUID`` objects for every row.
    """
    return values(record)


def pieces(rows: list[tuple[object, ...]]) -> list[list[tuple[object, ...]]]:
    """The rows cut into the COPY statements of one batch (see the module's docstring)."""
    size = max(PACE_ROWS, -(-len(rows) // MAX_COPIES_PER_BATCH))
    return [rows[i:i + size] for i in range(0, len(rows), size)]


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


async def _copy_in(conn: asyncpg.Connection, table: str, schema: str | None,
                   rows: list[tuple[object, ...]]) -> None:
    await conn.copy_records_to_table(table, schema_name=schema, records=rows, columns=COLUMNS)


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
        parts = pieces(rows)
        try:
            if len(parts) == 1:  # one statement commits on its own: no BEGIN/COMMIT round trips
                await _copy_in(conn, "requests", "inference", rows)
            else:
                async with conn.transaction():
                    for part in parts:
                        await _copy_in(conn, "requests", "inference", part)
            return len(rows)
        except asyncpg.PostgresError as exc:
            if getattr(exc, "sqlstate", None) != _UNIQUE_VIOLATION:
                raise
        async with conn.transaction():
            for part in parts:
                await _copy_in(conn, "usage_staging", None, part)
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
