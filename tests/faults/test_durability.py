"""No usage record lost or counted twice: through a Postgres outage and a gateway SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import asyncpg

from harness import Proc, start_gateway, start_simulator, wait_http
from tests_faults_support import fire

CHAT = {"model": "facebook/opt-125m", "max_tokens": 3,
        "messages": [{"role": "user", "content": "hello"}]}


async def stored(url: str, org: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(
            "SELECT request_id, completion_tokens FROM inference.requests "
            "WHERE organization_id = $1", org))
    finally:
        await conn.close()


async def wait_count(url: str, org: str, n: int, timeout: float) -> list[asyncpg.Record]:
    deadline = asyncio.get_running_loop().time() + timeout
    rows: list[asyncpg.Record] = []
    while asyncio.get_running_loop().time() < deadline:
        rows = await stored(url, org)
        if len(rows) >= n:
            return rows
        await asyncio.sleep(0.2)
    return rows


def test_postgres_outage_loses_nothing(cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sim = start_simulator(tmp_path)
    gateway = start_gateway(tmp_path, cluster.url, sim.url, WRITER_MAX_BACKOFF_SEC="0.5")
    try:
        cluster.stop()
        ok = asyncio.run(fire(gateway.url, "outage", CHAT, total=500, concurrency=32))
        assert len(ok) == 500  # the gateway kept serving with Postgres down
        cluster.start()
        rows = asyncio.run(wait_count(cluster.url, "outage", 500, timeout=30))
        assert len(rows) == 500
        assert {str(r["request_id"]) for r in rows} == set(ok)
        assert sum(r["completion_tokens"] for r in rows) == 1500
    finally:
        gateway.stop()
        sim.stop()


def test_sigkill_under_load_loses_nothing_and_duplicates_nothing(  # type: ignore[no-untyped-def]
    cluster, tmp_path: Path
) -> None:
    sim = start_simulator(tmp_path, "--tpot-ms", "2")
    spool = tmp_path / "spool"
    env = {"SPOOL_DIR": str(spool), "USAGE_FLUSH_INTERVAL_MS": "300",
           "WEBSERVER_WORKERS": "2"}
    gateway = start_gateway(tmp_path, cluster.url, sim.url, **env)
    try:
        async def load_and_kill() -> list[str]:
            answered: list[str] = []
            task = asyncio.create_task(fire(gateway.url, "sigkill", CHAT, total=2000,
                                            concurrency=64, ok=answered))
            deadline = asyncio.get_running_loop().time() + 60
            while len(answered) < 700:  # mid-run: some written, some spooled, many in flight
                assert not task.done(), f"the load ended after {len(answered)} answers"
                assert asyncio.get_running_loop().time() < deadline, "the load did not get going"
                await asyncio.sleep(0.01)
            os.killpg(gateway.popen.pid, signal.SIGKILL)  # the supervisor and its workers
            return await task

        ok = asyncio.run(load_and_kill())
        gateway.popen.wait()
        assert 0 < len(ok) < 2000, "the kill should land mid-run"
        restarted = start_gateway(tmp_path, cluster.url, sim.url, **{**env, "WEBSERVER_PORT":
                                  str(gateway.port)})
        try:
            rows = asyncio.run(wait_count(cluster.url, "sigkill", len(ok), timeout=30))
            ids = [str(r["request_id"]) for r in rows]
            assert len(ids) == len(set(ids)), "a record was stored twice"
            assert set(ok) <= set(ids), f"{len(set(ok) - set(ids))} answered requests lost"
        finally:
            restarted.stop()
    finally:
        if gateway.popen.poll() is None:
            gateway.stop()
        sim.stop()


def test_spool_status_command_reports_pending(tmp_path: Path, cluster) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    sim = start_simulator(tmp_path)
    spool = tmp_path / "spool"
    gateway = start_gateway(tmp_path, cluster.url, sim.url, SPOOL_DIR=str(spool))
    try:
        cluster.stop()
        ok = asyncio.run(fire(gateway.url, "status", CHAT, total=25, concurrency=5))
        assert len(ok) == 25

        def status() -> str:
            return subprocess.run([sys.executable, "-m", "inference_gateway", "spool", "status"],
                                  env={"SPOOL_DIR": str(spool), "PATH": "/usr/bin:/bin"},
                                  capture_output=True, text=True, check=True).stdout

        out = status()
        assert "pending records:   25\n" in out
        cluster.start()
        rows = asyncio.run(wait_count(cluster.url, "status", 25, timeout=30))
        assert sorted(str(r["request_id"]) for r in rows) == sorted(ok)
        wait_http(f"{gateway.url}/ready", gateway.popen)
        deadline = time.monotonic() + 30  # acknowledged in the spool just after the commit
        while "pending records:   0\n" not in (out := status()):
            assert time.monotonic() < deadline, out
            time.sleep(0.1)
    finally:
        gateway.stop()
        sim.stop()


_ = (Proc, aiohttp)


def test_crashed_worker_is_replaced_and_its_records_replayed(  # type: ignore[no-untyped-def]
    cluster, tmp_path: Path
) -> None:
    sim = start_simulator(tmp_path)
    # A flush interval far longer than the test: only a replay can bring these rows in.
    gateway = start_gateway(tmp_path, cluster.url, sim.url, WEBSERVER_WORKERS="2",
                            USAGE_FLUSH_INTERVAL_MS="600000", USAGE_BATCH_SIZE="100000")
    try:
        ok = asyncio.run(fire(gateway.url, "worker-crash", CHAT, total=40, concurrency=4))
        assert len(ok) == 40
        assert asyncio.run(stored(cluster.url, "worker-crash")) == []
        children = Path(f"/proc/{gateway.popen.pid}/task/{gateway.popen.pid}/children")
        workers = [int(p) for p in children.read_text().split()]
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        rows = asyncio.run(wait_count(cluster.url, "worker-crash", 40, timeout=30))
        assert sorted(str(r["request_id"]) for r in rows) == sorted(ok)
        wait_http(f"{gateway.url}/ready", gateway.popen)
        assert len(asyncio.run(fire(gateway.url, "after-crash", CHAT, total=5,
                                    concurrency=1))) == 5
    finally:
        gateway.stop()
        sim.stop()
