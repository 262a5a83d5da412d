"""How far behind the billing reporter is, read from its watermark in Postgres.

The reporter runs in one process of the whole fleet, maybe in another gateway instance; the
watermark is where every instance can see what it did. A scrape never waits for Postgres: it
shows the last reading and, when that is older than ``CACHE_SEC``, starts a new one in the
background (with a short timeout). A reading older than ``STALE_SEC`` is not shown at all.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from inference_gateway.observability import catalog as c
from inference_gateway.observability.series import Snapshot, put

CACHE_SEC = 10.0
TIMEOUT_SEC = 2.0
STALE_SEC = 300.0
_QUERY = ("SELECT extract(epoch FROM reported_until)::float8, "
          "extract(epoch FROM last_run_at)::float8 FROM billing.watermark")


class BillingLag:
    def __init__(self, database_url: str) -> None:
        self._dsn = database_url
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._asked_at = -CACHE_SEC
        self._values: tuple[float | None, float | None] = (None, None)
        self._read_at: float | None = None

    def read(self, into: Snapshot) -> None:
        now = time.monotonic()
        if now - self._asked_at >= CACHE_SEC and (self._task is None or self._task.done()):
            self._asked_at = now
            self._task = asyncio.get_running_loop().create_task(self._refresh())
        if self._read_at is None or now - self._read_at > STALE_SEC:
            return
        reported, last_run = self._values
        if reported is not None:
            put(into, c.BILLING_LAG, (), max(time.time() - reported, 0.0))
        if last_run is not None:
            put(into, c.BILLING_RUN, (), last_run)

    async def _refresh(self) -> None:
        try:
            async with asyncio.timeout(TIMEOUT_SEC):
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(self._dsn, timeout=TIMEOUT_SEC)
                row = await self._conn.fetchrow(_QUERY)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            self._drop()
            return
        self._values = (row[0], row[1]) if row is not None else (None, None)
        self._read_at = time.monotonic()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._drop()
