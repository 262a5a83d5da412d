"""Limits that hold across gateways: two instances of two workers each, 200 clients on one API
key limited to 100 requests and 10,000 tokens a minute, for two minutes, with Redis stopped
half-way. Each client waits what a 429 says (``retry-after-ms``), as the OpenAI SDK does, so
the clients all come back together the moment a window has room.

What was admitted is read back from ``inference.requests`` (every 2xx the clients got has its
row there, checked too): in every minute of the first half it stays within the limits plus one
request's reservation; in every minute of the second half, when each of the four processes
enforces its share, the same holds; and the gateways serve throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from harness import Proc, free_port, start_gateway, start_simulator, wait_rows

MODEL = "facebook/opt-125m"
RPM, TPM = 100, 10_000
CLIENTS = 200
PHASE_SEC = 63.0  # with Redis, then without it: each holds a whole minute and its edges
WINDOW_SEC = 59.5  # started_at is taken a moment before admission, under load a little more
MAX_TOKENS = (16, 256)  # half the requests reserve ~45 tokens, half ~285

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is missing (scripts/test.sh installs it)")


@dataclass
class Load:
    urls: list[str]
    key: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    statuses: Counter[tuple[int, int]] = field(default_factory=Counter)  # (phase, status)
    served: Counter[tuple[int, str]] = field(default_factory=Counter)  # (phase, url) of 2xx
    phase: int = 0

    async def client(self, session: aiohttp.ClientSession, n: int) -> None:
        url = self.urls[n % len(self.urls)]
        headers = {"Authorization": f"Bearer {self.key}"}
        turn = n
        while not self.stop.is_set():
            turn += 1
            phase = self.phase
            try:
                async with session.post(f"{url}/v1/chat/completions",
                                        json=body(MAX_TOKENS[turn % 2]),
                                        headers=headers) as resp:
                    await resp.read()
                    status = resp.status
                    retry_ms = resp.headers.get("retry-after-ms")
            except (TimeoutError, aiohttp.ClientError):
                status, retry_ms = 0, None
            self.statuses[phase, status] += 1
            if status == 200:
                self.served[phase, url] += 1
            else:  # as the OpenAI SDK does: wait what the gateway says, then all try at once
                wait = int(retry_ms) / 1000 if retry_ms else 1.0
                with contextlib.suppress(TimeoutError):  # or until the run ends
                    await asyncio.wait_for(self.stop.wait(),
                                           min(wait, 60.0) + random.uniform(0, 0.05))

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=60)
        connector = aiohttp.TCPConnector(limit=CLIENTS)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await asyncio.gather(*(self.client(session, n) for n in range(CLIENTS)))


def body(max_tokens: int) -> dict[str, object]:
    return {"model": MODEL, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hello there"}]}


def cli(database_url: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "inference_gateway", *args],
                            env={**os.environ, "DATABASE_URL": database_url},
                            capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.strip()


def start_redis(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    folder = tmp / f"redis-soak-{port}"
    folder.mkdir()
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port),
                             "--dir", str(folder), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, "redis did not start"
            time.sleep(0.05)


def busiest_minute(rows: list[asyncpg.Record], start: float, end: float) -> tuple[int, int]:
    """The most requests and tokens admitted in any WINDOW_SEC that lies within [start, end]
    (the busiest such window begins at start, at a request, or WINDOW_SEC before one)."""
    times = [(row["started_at"].timestamp(), row["prompt_tokens"] + row["completion_tokens"])
             for row in rows if start <= row["started_at"].timestamp() <= end]
    candidates = {start, *(at for at, _ in times), *(at - WINDOW_SEC for at, _ in times)}
    most_requests = most_tokens = 0
    for low in candidates:
        if low < start or low + WINDOW_SEC > end:
            continue
        inside = [tokens for when, tokens in times if low <= when <= low + WINDOW_SEC]
        most_requests = max(most_requests, len(inside))
        most_tokens = max(most_tokens, sum(inside))
    return most_requests, most_tokens


async def test_limits_hold_across_gateways_and_without_redis(
    session_tmp: Path, database_url: str
) -> None:
    redis_port = free_port()
    redis = start_redis(session_tmp, redis_port)
    org = f"soak-{random.randrange(1 << 30):x}"
    key = cli(database_url, "keys", "create", "--org", org, "--instance", "load")
    cli(database_url, "limits", "set", "--org", org, "--key", key[:12],
        "--requests-per-minute", str(RPM), "--tokens-per-minute", str(TPM))
    sim = start_simulator(session_tmp, "--model", MODEL)
    gateways: list[Proc] = []
    try:
        for _ in range(2):
            gateways.append(start_gateway(
                session_tmp, database_url, sim.url, REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
                WEBSERVER_WORKERS="2", GATEWAY_INSTANCES="2", RATE_LIMIT_FALLBACK="local"))
        load = Load([gateway.url for gateway in gateways], key)
        began = time.time()
        running = asyncio.create_task(load.run())
        await asyncio.sleep(PHASE_SEC)
        redis.terminate()
        redis.wait()
        switched = time.time()
        load.phase = 1
        await asyncio.sleep(PHASE_SEC)
        load.stop.set()
        await running
        ended = time.time()

        for gateway in gateways:  # a graceful stop writes what is still spooled
            gateway.stop()
        ok = load.statuses[0, 200] + load.statuses[1, 200]
        rows = await wait_rows(database_url, "organization_id = $1 AND status = 200", (org,),
                               ok, timeout=30)
        assert len(rows) == ok  # every answer the clients got is metered, once
        rows.sort(key=lambda row: row["started_at"])
        unexpected = {k: n for k, n in load.statuses.items() if k[1] not in (200, 429)}
        assert not unexpected, unexpected  # no 5xx, no failed connection, in either phase

        largest = json.dumps(body(MAX_TOKENS[1]))  # as aiohttp sends it
        reservation = len(largest) // 4 + 1 + MAX_TOKENS[1]
        with_redis = busiest_minute(rows, began, switched)
        without = busiest_minute(rows, switched, ended)  # Redis was gone: all local
        across = busiest_minute(rows, began, ended)  # the switch too: reported, not bounded
        print(f"busiest minute (requests, tokens) with Redis: {with_redis}, without: "
              f"{without}, any: {across}; answers (phase, status): {dict(load.statuses)}")
        assert with_redis[0] <= RPM + 1 and with_redis[1] <= TPM + reservation
        assert without[0] <= RPM + 1 and without[1] <= TPM + reservation
        assert without[0] >= RPM // 2  # a whole minute of the fallback, and it admits
        # Both gateways served in both phases: the fallback keeps them going, and says so.
        for phase in (0, 1):
            assert all(load.served[phase, gateway.url] > 0 for gateway in gateways), load.served
        for gateway in gateways:
            assert "Redis cannot be reached" in gateway.log.read_text()
        # The limits bite: the busiest minute with Redis used most of a limit.
        assert with_redis[0] >= RPM * 0.9 or with_redis[1] >= TPM * 0.9, with_redis
    finally:
        for gateway in gateways:
            gateway.stop()
        sim.stop()
        if redis.poll() is None:
            redis.kill()
