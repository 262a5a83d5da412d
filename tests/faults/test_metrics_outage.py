"""Postgres stops under load: Prometheus sees the spool and the oldest record's age grow,
then fall back to nothing once Postgres returns and the backlog is written."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_support import eventually, need_prometheus, scalar, start_prometheus

from harness import start_gateway, start_simulator, wait_rows
from tests_faults_support import fire

BODY = {"model": "facebook/opt-125m", "max_tokens": 4,
        "messages": [{"role": "user", "content": "hello"}]}


def _fire_until(base: str, org: str, stop: threading.Event, ok: list[str]) -> threading.Thread:
    """Requests in the background, twenty at a time, until ``stop`` (a minute at most)."""

    def run() -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            asyncio.run(fire(base, org, BODY, total=20, concurrency=4, ok=ok))
            time.sleep(0.2)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_spool_and_oldest_age_grow_while_postgres_is_down(cluster: Any,
                                                          tmp_path: Path) -> None:
    need_prometheus()
    simulator = start_simulator(tmp_path, "--model", "facebook/opt-125m")
    gateway = start_gateway(tmp_path, cluster.url, simulator.url, WEBSERVER_WORKERS="2",
                            WRITER_MAX_BACKOFF_SEC="1")
    prometheus = start_prometheus(tmp_path, [f"127.0.0.1:{gateway.port}"])
    ok: list[str] = []
    try:
        asyncio.run(fire(gateway.url, "org-outage", BODY, total=40, concurrency=4, ok=ok))
        eventually(lambda: scalar(prometheus, "sum(gateway_usage_rows_written_total)") == 40,
                   20, "the first requests written")
        eventually(lambda: scalar(
            prometheus, "max(gateway_usage_oldest_unwritten_age_seconds)") == 0, 10,
            "nothing waits before the outage")

        cluster.stop()
        stop = threading.Event()
        load = _fire_until(gateway.url, "org-outage", stop, ok)
        try:
            eventually(lambda: (scalar(prometheus, "min(gateway_usage_database_up)") == 0), 20,
                       "the writers notice Postgres is gone")
            eventually(lambda: (scalar(prometheus, "sum(gateway_usage_spool_records)") or 0) > 0,
                       20, "records wait in the spool")
            records_early = scalar(prometheus, "sum(gateway_usage_spool_records)") or 0
            eventually(lambda: (scalar(prometheus, "sum(gateway_usage_spool_records)") or 0)
                       > records_early, 20, "the spool grows")
            eventually(lambda: (scalar(
                prometheus, "max(gateway_usage_oldest_unwritten_age_seconds)") or 0) >= 5, 20,
                "the oldest record not written grows older")
            records_late = scalar(prometheus, "sum(gateway_usage_spool_records)") or 0
            assert records_late > records_early > 0
            assert (scalar(prometheus, "sum(gateway_usage_spool_bytes)") or 0) > 0
            assert (scalar(prometheus, "sum(gateway_usage_copy_failures_total)") or 0) > 0
        finally:
            stop.set()
            load.join()

        cluster.start()
        eventually(lambda: scalar(prometheus, "sum(gateway_usage_spool_records)") == 0, 60,
                   "the backlog written once Postgres is back")
        eventually(lambda: scalar(
            prometheus, "max(gateway_usage_oldest_unwritten_age_seconds)") == 0, 10,
            "nothing old left unwritten")
        peak = scalar(prometheus, "max_over_time(sum(gateway_usage_spool_records)[2m:1s])")
        assert peak is not None and peak >= records_late
        rows = asyncio.run(wait_rows(cluster.url, "organization_id = $1", ("org-outage",),
                                     len(ok), timeout=30))
        assert len(rows) == len(ok)
        eventually(lambda: scalar(prometheus, "sum(gateway_requests_total)") == len(ok), 10,
                   "every request counted")
        eventually(lambda: scalar(prometheus, "sum(gateway_usage_rows_written_total)")
                   == len(ok), 10, "every row written counted")
        eventually(lambda: scalar(prometheus, "min(gateway_usage_database_up)") == 1, 10,
                   "the writers reach Postgres again")
    except BaseException:
        print(gateway.log_tail(60))
        raise
    finally:
        prometheus.stop()
        gateway.stop()
        simulator.stop()
