"""One of three replicas is SIGKILLed under load, then restarted.

Streams already under way on it are cut (an in-band error, billed for what was relayed); every
other request is served by the others, including those that were sent to it and found it gone
before any byte came back; no new request goes to it from a second after the kill; it is back
in rotation within five seconds of its restart; every answer has exactly one usage row.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from harness import CLI, Proc, start, start_gateway, start_simulator, wait_http, wait_rows

MODEL = "facebook/opt-125m"
TOKENS = 20
TPOT_MS = 20  # a stream lasts about 0.4 s
CONNECTIONS = 24
KILL_AT = 2.0  # seconds into the load
RESTART_AT = 4.0
LOAD_FOR = 9.0


@dataclass
class Seen:
    request_id: str
    started: float  # epoch
    status: int
    events: int = 0  # content events received
    error: str | None = None  # the in-band error, if the stream was cut


@dataclass
class Load:
    results: list[Seen] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # requests that got no answer at all


async def _stream(session: aiohttp.ClientSession, gateway: Proc,
                  tenant: tuple[str, str]) -> Seen:
    body = {"model": MODEL, "max_tokens": TOKENS, "stream": True,
            "messages": [{"role": "user", "content": "count"}]}
    started = time.time()
    async with session.post(f"{gateway.url}/v1/chat/completions", json=body,
                            headers={"X-TEMBO-ORG": tenant[0],
                                     "X-TEMBO-INSTANCE": tenant[1]}) as response:
        seen = Seen(response.headers["X-Request-Id"], started, response.status)
        raw = await response.read()
    for event in raw.split(b"\n\n"):
        if not event.startswith(b"data: {"):
            continue
        data = json.loads(event[6:])
        if "error" in data:
            seen.error = data["error"]["code"]
        elif data["choices"] and data["choices"][0]["delta"].get("content"):
            seen.events += 1
    return seen


async def _run_load(gateway: Proc, tenant: tuple[str, str], until: float) -> Load:
    load = Load()

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < until:
            try:
                load.results.append(await _stream(session, gateway, tenant))
            except aiohttp.ClientError as exc:
                load.failures.append(repr(exc))

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(CONNECTIONS)))
    return load


async def test_a_replica_killed_under_load(tmp_path: Path, database_url: str) -> None:
    tenant = (f"org-{uuid.uuid4().hex[:8]}", "inst")
    args = ["--model", MODEL, "--tpot-ms", str(TPOT_MS)]
    sims = [start_simulator(tmp_path, *args) for _ in range(3)]
    victim = sims[2]
    urls = "|".join(s.url for s in sims)
    gateway = start_gateway(tmp_path, database_url, sims[0].url,
                            MODEL_SERVICE_PORT_MAP=f"{MODEL}={urls}")
    restarted: Proc | None = None
    try:
        begin = time.monotonic()
        load_task = asyncio.create_task(_run_load(gateway, tenant, begin + LOAD_FOR))
        await asyncio.sleep(KILL_AT)
        victim.popen.send_signal(signal.SIGKILL)
        killed_at = time.time()
        victim.popen.wait()
        await asyncio.sleep(RESTART_AT - KILL_AT)
        restarted = start([*CLI, "simulate", "--port", str(victim.port), *args], {},
                          tmp_path / "sim-restarted.log", victim.port)
        wait_http(f"{restarted.url}/health", restarted.popen)
        restarted_at = time.time()
        load = await load_task

        assert load.failures == [], load.failures[:5]
        assert all(s.status == 200 for s in load.results)
        ids = [uuid.UUID(s.request_id) for s in load.results]
        rows = {str(r["request_id"]): r for r in await wait_rows(
            database_url, "request_id = ANY($1::uuid[])", (ids,), len(ids))}
        assert len(rows) == len(ids) == len(set(ids))  # one row for every answer
        cut = [s for s in load.results if s.error is not None]
        for seen in cut:  # cut streams were under way on the killed replica at the kill
            row = rows[seen.request_id]
            assert row["replica"] == victim.url and row["status"] == 502
            assert row["completion_tokens"] == seen.events < TOKENS
            assert seen.started < killed_at
        whole = [s for s in load.results if s.error is None]
        assert all(rows[s.request_id]["completion_tokens"] == TOKENS for s in whole)
        on_victim = sorted(r["started_at"].timestamp() for r in rows.values()
                           if r["replica"] == victim.url)
        assert not [t for t in on_victim if killed_at + 1 < t < restarted_at], \
            "a request went to the killed replica more than a second after the kill"
        assert [t for t in on_victim if restarted_at <= t < restarted_at + 5], \
            "the restarted replica was not back in rotation within five seconds"
    finally:
        gateway.stop()
        for sim in sims:
            sim.stop()
        if restarted is not None:
            restarted.stop()
