"""The per-process copies of the org gate and the API keys, and the tasks that keep them fresh.

Only what the settings use is loaded: the org gate with ``ORG_AUTH_ENABLED``, the keys unless
``AUTH_MODE=headers``. Both are loaded once before the process accepts requests (a failure is
logged and the gate stays closed, the keys empty, until a reload succeeds), then reloaded every
``ORG_AUTH_CACHE_REFRESH_INTERVAL_SEC`` and ``API_KEY_CACHE_REFRESH_INTERVAL_SEC`` over one
shared connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

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

Refresh = Callable[[asyncpg.Connection], Awaitable[None]]


class TenantCaches:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.orgs = OrgGate() if settings.org_auth_enabled else None
        self.keys = KeyRing() if settings.auth_mode != "headers" else None
        self._pool: asyncpg.Pool | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._failing: set[str] = set()

    def identify(self, headers: Mapping[str, str]) -> Tenant:
        return identify(headers, self.settings.auth_mode, self.keys, self.orgs)

    def _caches(self) -> list[tuple[str, Refresh, float]]:
        caches: list[tuple[str, Refresh, float]] = []
        if self.orgs is not None:
            caches.append(("org gate", self.orgs.refresh,
                           self.settings.org_auth_cache_refresh_interval_sec))
        if self.keys is not None:
            caches.append(("API keys", self.keys.refresh,
                           self.settings.api_key_cache_refresh_interval_sec))
        return caches

    async def start(self) -> None:
        caches = self._caches()
        if not caches:
            return
        self._pool = await asyncpg.create_pool(
            self.settings.database_url, min_size=0, max_size=1,
            timeout=FIRST_LOAD_TIMEOUT_SEC, command_timeout=QUERY_TIMEOUT_SEC,
        )
        for name, refresh, interval in caches:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh(name, refresh), FIRST_LOAD_TIMEOUT_SEC)
            self._tasks.append(asyncio.create_task(
                self._keep_fresh(name, refresh, interval), name=f"refresh {name}"
            ))

    async def close(self) -> None:
        await stop(self._tasks)
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
        if name in self._failing:
            self._failing.discard(name)
            log.info("reloaded the %s from Postgres again", name)
