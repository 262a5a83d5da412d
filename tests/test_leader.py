"""One process of the fleet runs a job: lead, stand by, take over, back off."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from inference_gateway.db import leader

from harness import free_port

LOCK = 0x7E57_0001  # a key of this test's own


async def _until(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the condition did not hold in time: {check}")


async def test_one_leads_and_another_takes_over(database_url: str) -> None:
    turns: dict[str, int] = {"a": 0, "b": 0}
    pids: dict[str, int] = {}
    last: list[str] = []

    def job(name: str) -> leader.LeaderJob:
        async def step(conn: asyncpg.Connection) -> float:
            turns[name] += 1
            pids[name] = conn.get_server_pid()
            last[:] = [name]
            return 0.05

        return leader.LeaderJob(f"job {name}", LOCK, step, standby_sec=0.1)

    stop = asyncio.Event()
    tasks = {n: asyncio.create_task(leader.run(database_url, job(n), stop)) for n in turns}
    try:
        await _until(lambda: sum(turns.values()) >= 5)
        first = "a" if turns["a"] else "b"
        other = "b" if first == "a" else "a"
        assert turns[other] == 0, "two processes led at once"
        # The leader's connection is cut: a process leads again (whichever gets there first).
        admin = await asyncpg.connect(database_url)
        try:
            await admin.execute("SELECT pg_terminate_backend($1)", pids[first])
            led = sum(turns.values())
            await _until(lambda: sum(turns.values()) > led + 3)
            # The leading process goes away: the one standing by takes over.
            [leading] = last
            waiting = "b" if leading == "a" else "a"
            tasks[leading].cancel()
            before = turns[waiting]
            await _until(lambda: turns[waiting] > before)
        finally:
            await admin.close()
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks.values(), return_exceptions=True), 10)


def note_waits(monkeypatch: pytest.MonkeyPatch, stop: asyncio.Event,
               count: int) -> list[float]:
    """The delays ``leader.run`` waits, noted instead of slept; after ``count`` of them it
    waits for ``stop`` only."""
    waits: list[float] = []

    async def noting(event: asyncio.Event, seconds: float) -> bool:
        waits.append(seconds)
        if len(waits) >= count:
            await stop.wait()
        await asyncio.sleep(0)
        return event.is_set()

    monkeypatch.setattr(leader, "_wait", noting)
    return waits


async def test_a_failing_step_backs_off_and_keeps_the_lead(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids: list[int] = []

    async def step(conn: asyncpg.Connection) -> float:
        pids.append(conn.get_server_pid())
        if len(pids) < 3:
            raise RuntimeError("the sink is down")
        return 60.0

    stop = asyncio.Event()
    waits = note_waits(monkeypatch, stop, 3)
    task = asyncio.create_task(
        leader.run(database_url, leader.LeaderJob("flaky", LOCK + 1, step), stop))
    try:
        await _until(lambda: len(waits) >= 3)
        assert waits == [1.0, 2.0, 60.0]  # 1 s, then 2 s, then the step's own delay
        assert len(pids) == 3 and len(set(pids)) == 1  # on the connection holding the lock
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_no_connection_no_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0

    async def step(conn: asyncpg.Connection) -> float:
        nonlocal calls
        calls += 1
        return 1.0

    stop = asyncio.Event()
    waits = note_waits(monkeypatch, stop, 7)
    task = asyncio.create_task(leader.run(f"postgresql://nobody@127.0.0.1:{free_port()}/none",
                                          leader.LeaderJob("nowhere", LOCK + 2, step), stop))
    try:
        await _until(lambda: len(waits) >= 7)
        assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0]  # doubling, up to a minute
        assert not task.done() and calls == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
