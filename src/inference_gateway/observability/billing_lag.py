"""How far behind the billing reporter is, read from its watermark in Postgres at a scrape.

The reporter runs in one process of the whole fleet, maybe in another gateway instance; the
watermark is where every instance can see what it did. Read at most every ``CACHE_SEC`` and
with a short timeout, so a scrape never waits on a Postgres that is away (the last reading is
kept, as long as it is not too old to mean anything).
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from inference_gateway.observability import catalog as c
from inference_gateway.observability.series import Snapshot, put

log = logging.getLogger(__name__)

CACHE_SEC = 10.0
TIMEOUT_SEC = 1.0
STALE_SEC = 300.0
_QUERY = ("SELECT extract(epoch FROM reported_until)::float8, "
          "extract(epoch FROM last_run_at)::float8 FROM billing.watermark")


class BillingLag:
    def __init__(self, database_url: str) -> None:
        self._dsn = database_url
        self._conn: asyncpg.Connection | None = None
        self._read_at = 0.0
        self._values: tuple[float | None, float | None] = (None, None)
        self._valid_at = 0.0

    async def read(self, into: Snapshot) -> None:
        now = time.monotonic()
        if now - self._read_at >= CACHE_SEC:
            self._read_at = now
            try:
                async with asyncio.timeout(TIMEOUT_SEC):
                    await self._fetch()
                self._valid_at = now
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await self.close()
        if now - self._valid_at > STALE_SEC:
            return
        reported, last_run = self._values
        if reported is not None:
            put(into, c.BILLING_LAG, (), max(time.time() - reported, 0.0))
        if last_run is not None:
            put(into, c.BILLING_RUN, (), last_run)

    async def _fetch(self) -> None:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self._dsn, timeout=TIMEOUT_SEC)
        row = await self._conn.fetchrow(_QUERY)
        self._values = (row[0], row[1]) if row is not None else (None, None)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()
