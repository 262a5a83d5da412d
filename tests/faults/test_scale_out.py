"""Two gateway instances behind HAProxy share the work and one Postgres; one is SIGKILLed under
load and restarted: every 2xx the client got has exactly one row, and the other instance serves
throughout.

Each instance has its own port, spool and simulator (deploy/haproxy/haproxy.cfg is the balancer's
configuration, as shipped). The killed instance flushes only once a second, so most of what it
answered before the kill is still in its spool: the rows can only arrive through its replay.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from harness import ROOT, Proc, free_port, start, start_gateway, start_simulator, wait_http

CHAT = {"model": "facebook/opt-125m", "max_tokens": 3,
        "messages": [{"role": "user", "content": "hello"}]}
ORG = "scale-out"
CONCURRENCY = 32
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="haproxy is not installed (scripts/test.sh installs it)")


@dataclass
class Answer:
    sent: float
    status: int  # 0: no HTTP answer at all
    instance: str = ""
    request_id: str = ""


@dataclass
class Load:
    """Requests from ``CONCURRENCY`` clients until ``stop`` is set (or 90 s, or 50,000 sent)."""

    url: str
    answers: list[Answer] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def ok(self, instance: str | None = None, since: float = 0.0) -> list[Answer]:
        return [a for a in self.answers if 200 <= a.status < 300 and a.sent >= since
                and (instance is None or a.instance == instance)]

    async def run(self) -> None:
        deadline = time.monotonic() + 90
        budget = iter(range(50_000))
        headers = {"X-TEMBO-ORG": ORG, "X-TEMBO-INSTANCE": "load"}

        async def client(session: aiohttp.ClientSession) -> None:
            for _ in budget:
                if self.stop.is_set() or time.monotonic() > deadline:
                    return
                sent = time.monotonic()
                try:
                    async with session.post(f"{self.url}/v1/chat/completions", json=CHAT,
                                            headers=headers) as resp:
                        await resp.read()
                        self.answers.append(Answer(
                            sent, resp.status, resp.headers.get("X-Gateway-Instance", ""),
                            resp.headers.get("X-Request-Id", "")))
                except (TimeoutError, aiohttp.ClientError):
                    self.answers.append(Answer(sent, 0))

        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(client(session) for _ in range(CONCURRENCY)))


async def wait_until(condition: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


async def stored(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT request_id::text AS id, count(*) AS n "
                                "FROM inference.requests WHERE organization_id = $1 "
                                "GROUP BY request_id", ORG)
        return {r["id"]: r["n"] for r in rows}
    finally:
        await conn.close()


def start_haproxy(tmp: Path, *gateways: Proc) -> Proc:
    port = free_port()
    env = {"LISTEN": f"127.0.0.1:{port}",
           **{f"GATEWAY_{i}": f"127.0.0.1:{g.port}" for i, g in enumerate(gateways, 1)}}
    proc = start(["haproxy", "-db", "-f", str(HAPROXY_CFG)], env, tmp / "haproxy.log", port)
    wait_http(f"{proc.url}/ready", proc.popen)
    return proc


def test_one_instance_killed_under_load_loses_and_doubles_nothing(  # type: ignore[no-untyped-def]
    cluster, tmp_path: Path
) -> None:
    sims = [start_simulator(tmp_path), start_simulator(tmp_path)]
    # Instance 1 writes to Postgres once a second: at the kill, its last second is only spooled.
    killed_env = {"USAGE_FLUSH_INTERVAL_MS": "1000", "USAGE_BATCH_SIZE": "100000"}
    first = start_gateway(tmp_path, cluster.url, sims[0].url, **killed_env)
    second = start_gateway(tmp_path, cluster.url, sims[1].url)
    procs = [*sims, first, second]
    try:
        balancer = start_haproxy(tmp_path, first, second)
        procs.append(balancer)

        async def scenario() -> tuple[Load, float, float, set[str]]:
            load = Load(balancer.url)
            task = asyncio.create_task(load.run())
            await wait_until(lambda: len(load.ok("gateway-1")) >= 300, 30)
            killed_at = time.monotonic()
            os.killpg(first.popen.pid, signal.SIGKILL)
            first.popen.wait()
            answered_by_first = {a.request_id for a in load.ok("gateway-1")}
            in_postgres = set(await stored(cluster.url))
            only_spooled = answered_by_first - in_postgres
            # The other instance carries the load alone for a while.
            await wait_until(lambda: len(load.ok("gateway-2", since=killed_at + 0.5)) >= 200, 30)
            restarted = start_gateway(tmp_path, cluster.url, sims[0].url,
                                      WEBSERVER_PORT=str(first.port), **killed_env)
            procs.append(restarted)
            back_at = time.monotonic()
            await wait_until(lambda: len(load.ok("gateway-1", since=back_at)) >= 100, 30)
            load.stop.set()
            await task
            return load, killed_at, back_at, only_spooled

        load, killed_at, back_at, only_spooled = asyncio.run(scenario())
        ok_ids = [a.request_id for a in load.ok()]
        failed = [a for a in load.answers if not 200 <= a.status < 300]

        assert len(only_spooled) > 0, "the kill should leave answered records only in the spool"
        # Only what was in flight on the killed instance failed; nothing after it came back.
        assert len(failed) <= CONCURRENCY, f"{len(failed)} requests failed"
        assert all(a.sent < back_at for a in failed)
        # The other instance served throughout: before, during and after the outage.
        assert load.ok("gateway-2", since=0) and load.ok("gateway-2", since=back_at)
        alone = [a for a in load.ok() if killed_at <= a.sent < back_at]
        assert alone and {a.instance for a in alone} == {"gateway-2"}

        async def settle() -> dict[str, int]:
            rows: dict[str, int] = {}
            for _ in range(300):
                rows = await stored(cluster.url)
                if set(ok_ids) <= set(rows):
                    break
                await asyncio.sleep(0.1)
            return rows

        rows = asyncio.run(settle())
        assert len(ok_ids) == len(set(ok_ids))
        missing = set(ok_ids) - set(rows)
        assert not missing, f"{len(missing)} answered requests have no row"
        doubled = {rid: n for rid, n in rows.items() if n != 1}
        assert not doubled, f"rows stored twice: {doubled}"
        # A row nobody got a 2xx for can only be a request the kill cut off after it was spooled.
        assert len(set(rows) - set(ok_ids)) <= len(failed)
        assert only_spooled <= set(rows)  # the restarted instance replayed its predecessor's spool
        print(f"\n{len(ok_ids)} answered ({len(load.ok('gateway-1'))} by the killed instance, "
              f"{len(load.ok('gateway-2'))} by the other), {len(failed)} cut off by the kill, "
              f"{len(only_spooled)} replayed from the spool, {len(alone)} served while one "
              f"instance was down")
    finally:
        for proc in reversed(procs):
            proc.stop()
