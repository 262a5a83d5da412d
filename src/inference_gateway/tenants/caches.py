"""The per-process copies of the org gate, the API keys and the limits, kept fresh.

Only what the settings use is loaded: the org gate with ``ORG_AUTH_ENABLED``, the keys unless
``AUTH_MODE=headers``, the limits when there is somewhere to enforce them. Each is loaded once
before the process accepts requests (a failure is logged and the gate stays closed, the keys
empty, until a reload succeeds), then reloaded:

* at once, when Postgres says its table changed (LISTEN/NOTIFY: triggers on the tables send
  ``inference_gateway_tenants`` with the table's name), so a new key works and a revoked one
  stops working on every process within moments;
* and every ``..._REFRESH_INTERVAL_SEC`` all the same, a safety net for a notification lost
  while the listening connection was down (it reloads everything when it reconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from inference_gateway.background import stop
from inference_gateway.settings import Settings
from inference_gateway.tenants.identity import identify
from inference_gateway.tenants.keys import KeyRing
from inference_gateway.tenants.orgs import OrgGate
from inference_gateway.tenants.tenant import Tenant

log = logging.getLogger(__name__)

FIRST_LOAD_TIMEOUT_SEC = 5.0
QUERY_TIMEOUT_SEC = 10.0
CHANNEL = "inference_gateway_tenants"
RELISTEN_SEC = 2.0

Refresh = Callable[[asyncpg.Connection], Awaitable[None]]


@dataclass(frozen=True)
class Cache:
    name: str
    refresh: Refresh
    interval: float  # the safety net's period
    table: str  # the table whose notification reloads it


class TenantCaches:
    def __init__(self, settings: Settings, extra: Sequence[Cache] = ()) -> None:
        self.settings = settings
        self.orgs = OrgGate() if settings.org_auth_enabled else None
        self.keys = KeyRing() if settings.auth_mode != "headers" else None
        self._extra = tuple(extra)
        self._pool: asyncpg.Pool | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._failing: set[str] = set()
        self._reloading: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self.loaded_at: dict[str, float] = {}  # when each cache last reloaded (Unix time)

    def identify(self, headers: Mapping[str, str]) -> Tenant:
        return identify(headers, self.settings.auth_mode, self.keys, self.orgs)

    def names(self) -> list[str]:
        """The caches this process keeps, by name (for their age in the metrics)."""
        return [cache.name for cache in self._caches()]

    def _caches(self) -> list[Cache]:
        caches: list[Cache] = []
        if self.orgs is not None:
            caches.append(Cache("org gate", self.orgs.refresh,
                                self.settings.org_auth_cache_refresh_interval_sec,
                                "org_validation"))
        if self.keys is not None:
            caches.append(Cache("API keys", self.keys.refresh,
                                self.settings.api_key_cache_refresh_interval_sec, "api_keys"))
        return caches + list(self._extra)

    async def start(self) -> None:
        caches = self._caches()
        if not caches:
            return
        self._pool = await asyncpg.create_pool(
            self.settings.database_url, min_size=0, max_size=1,
            timeout=FIRST_LOAD_TIMEOUT_SEC, command_timeout=QUERY_TIMEOUT_SEC,
        )
        for cache in caches:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh(cache.name, cache.refresh),
                                       FIRST_LOAD_TIMEOUT_SEC)
            self._tasks.append(asyncio.create_task(
                self._keep_fresh(cache.name, cache.refresh, cache.interval),
                name=f"refresh {cache.name}"))
        self._tasks.append(asyncio.create_task(self._listen(caches), name="tenant changes"))

    async def close(self) -> None:
        await stop([*self._tasks, *self._reloading.values()])
        self._tasks.clear()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 2)
            except Exception:
                pool.terminate()

    async def _keep_fresh(self, name: str, refresh: Refresh, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._refresh(name, refresh)

    async def _refresh(self, name: str, refresh: Refresh) -> None:
        """One reload; a failure is logged once per outage and leaves the last good copy."""
        assert self._pool is not None
        try:
            async with self._pool.acquire() as conn:
                await refresh(conn)
        except Exception as exc:  # Postgres away, or anything else: the loop must go on
            if name not in self._failing:
                self._failing.add(name)
                log.error("cannot reload the %s from Postgres (%s); keeping the last copy",
                          name, exc)
            return
        self.loaded_at[name] = time.time()
        if name in self._failing:
            self._failing.discard(name)
            log.info("reloaded the %s from Postgres again", name)

    # -- notifications --------------------------------------------------------------------------

    def _reload_soon(self, cache: Cache) -> None:
        """Reload now; a notification during a reload asks for one more after it."""
        if cache.name in self._reloading:
            self._again.add(cache.name)
            return

        async def reload() -> None:
            try:
                while True:
                    self._again.discard(cache.name)
                    await self._refresh(cache.name, cache.refresh)
                    if cache.name not in self._again:
                        return
            finally:
                self._reloading.pop(cache.name, None)

        self._reloading[cache.name] = asyncio.create_task(reload(), name=f"reload {cache.name}")

    async def _listen(self, caches: list[Cache]) -> None:
        """Hold a LISTEN connection; reconnect when it drops, reloading all that was missed."""
        by_table = {cache.table: [c for c in caches if c.table == cache.table] for cache in caches}

        def notified(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            for cache in by_table.get(payload, ()):
                self._reload_soon(cache)

        first = True
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.settings.database_url,
                                             timeout=FIRST_LOAD_TIMEOUT_SEC)
                await conn.add_listener(CHANNEL, notified)
                if not first:  # what changed while nobody listened
                    for cache in caches:
                        self._reload_soon(cache)
                first = False
                while not conn.is_closed():
                    await asyncio.sleep(RELISTEN_SEC)
                    await conn.execute("SELECT 1")  # notice a dead connection
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pass
            finally:
                if conn is not None:
                    conn.terminate()
            first = False
            await asyncio.sleep(RELISTEN_SEC)
