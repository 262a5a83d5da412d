"""A small bounded load generator: ``total`` requests, ``concurrency`` at a time, loopback only."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp


async def fire(base_url: str, org: str, body: dict[str, Any], *, total: int,
               concurrency: int, ok: list[str] | None = None) -> list[str]:
    """Send the requests; return the X-Request-Id of every one answered with a 2xx.

    ``ok`` may be passed in to watch the answers arrive while the load runs.
    """
    ok = [] if ok is None else ok
    queue = iter(range(total))
    headers = {"X-TEMBO-ORG": org, "X-TEMBO-INSTANCE": "inst"}
    timeout = aiohttp.ClientTimeout(total=30)

    async def worker(session: aiohttp.ClientSession) -> None:
        for _ in queue:
            try:
                async with session.post(f"{base_url}/v1/chat/completions", json=body,
                                        headers=headers) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        ok.append(resp.headers["X-Request-Id"])
            except (TimeoutError, aiohttp.ClientError):
                continue

    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return ok
