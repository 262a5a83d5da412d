"""The hourly usage reporter against a database of its own: events, watermark, crashes, late
records, and the pgmq and webhook sinks."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pgmq
import pytest
from aiohttp import web

from inference_gateway.billing import reporter
from inference_gateway.billing.sinks import PgmqSink, WebhookSink
from inference_gateway.db import leader, locks
from inference_gateway.db.migrate import migrate
from inference_gateway.metering.record import UsageRecord
from inference_gateway.metering.writer import PostgresWriter
from inference_gateway.settings import Settings

from harness import Proc, free_port, start_gateway

HOUR = timedelta(hours=1)
NO_GRACE = timedelta(0)
MARGIN = timedelta(milliseconds=200)


def _with_db(url: str, name: str) -> str:
    return f"{url.rpartition('/')[0]}/{name}"


async def _recreate(admin_url: str, name: str, drop_only: bool = False) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if not drop_only:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def billing_url(admin_url: str) -> Iterator[str]:
    """A migrated database for these tests alone: the reporter reads the whole table."""
    name = f"gateway_billing_{uuid.uuid4().hex[:8]}"
    asyncio.run(_recreate(admin_url, name))
    url = _with_db(admin_url, name)
    asyncio.run(migrate(url))
    yield url
    asyncio.run(_recreate(admin_url, name, drop_only=True))


@pytest.fixture(scope="module")
def queue_url(admin_url: str) -> Iterator[str]:
    """A queue database with PGMQ installed from its SQL, as where the extension is missing."""
    name = f"gateway_queue_{uuid.uuid4().hex[:8]}"
    asyncio.run(_recreate(admin_url, name))
    url = _with_db(admin_url, name)
    assert pgmq.install_pgmq_from_sql(dsn=url) == "1.13.0"
    yield url
    asyncio.run(_recreate(admin_url, name, drop_only=True))


@pytest.fixture
async def conn(billing_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the billing database, emptied of requests, events and watermark."""
    c = await asyncpg.connect(billing_url)
    await c.execute("TRUNCATE inference.requests, billing.outbox, billing.corrections")
    await c.execute("UPDATE billing.watermark SET reported_until = NULL, ingested_until = NULL")
    yield c
    await c.close()


async def this_hour(conn: asyncpg.Connection) -> datetime:
    hour: datetime = await conn.fetchval("SELECT date_trunc('hour', now(), 'UTC')")
    return hour


async def seed(conn: asyncpg.Connection, *rows: tuple[str, str, str, datetime, int, int]) -> None:
    """Rows ``(org, instance, model, completed_at, prompt, completion)``, ingested a second
    after they completed, as the live path does; a tenth of each prompt came from the cache."""
    await conn.executemany(
        "INSERT INTO inference.requests (request_id, organization_id, instance_id, model, "
        "requested_model, endpoint, prompt_tokens, completion_tokens, status, duration_ms, "
        "started_at, completed_at, ingested_at, cached_tokens) "
        "VALUES ($1, $2, $3, $4, $4, '/v1/chat/completions', $5, $6, 200, 10, $7, $7, $8, $9)",
        [(uuid.uuid4(), org, inst, model, p, c, at, at + timedelta(seconds=1), p // 10)
         for org, inst, model, at, p, c in rows],
    )


async def set_watermark(conn: asyncpg.Connection, at: datetime) -> None:
    await conn.execute("UPDATE billing.watermark SET reported_until = $1, ingested_until = $1", at)


async def outbox(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT *, body::text AS body FROM billing.outbox ORDER BY id")
    return [dict(r) | {"body": json.loads(r["body"])} for r in rows]


def events(messages: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    found = {}
    for message in messages:
        for event in message["body"]["message"]:
            assert event["idempotency_key"] not in found, "an event was reported twice"
            found[event["idempotency_key"]] = event
    return found


def key(inst: str, model: str, hour: datetime, revision: int = 0) -> str:
    return f"{inst}-{model}-{hour:%Y%m%d%H}" + (f"-r{revision}" if revision else "")


async def test_three_hours_make_the_right_events_and_watermark(conn: asyncpg.Connection) -> None:
    h = await this_hour(conn)
    start = h - 4 * HOUR
    t = start + timedelta(minutes=10, seconds=5, microseconds=250_000)
    await seed(
        conn,
        ("org-a", "inst-1", "m1", t, 10, 5),
        ("org-a", "inst-1", "m1", t + timedelta(minutes=30), 20, 7),
        ("org-a", "inst-1", "m2", t, 1, 1),
        ("org-b", "inst-2", "m1", t + HOUR, 100, 50),
        ("org-z", "inst-9", "m1", start - timedelta(minutes=1), 9, 9),  # before the watermark
        ("org-z", "inst-9", "m1", h + timedelta(seconds=1), 9, 9),  # the hour is not over
    )
    # 1,500 instances in the third hour: two messages, 1,000 events at most in each.
    await conn.execute(
        "INSERT INTO inference.requests (request_id, organization_id, instance_id, model, "
        "requested_model, endpoint, prompt_tokens, completion_tokens, status, duration_ms, "
        "started_at, completed_at, ingested_at) "
        "SELECT gen_random_uuid(), 'org-c', 'inst-c' || i, 'm1', 'm1', '/v1/completions', i, 1, "
        "200, 1, $1, $1, $1 FROM generate_series(1, 1500) AS i",
        start + 2 * HOUR,
    )
    await set_watermark(conn, start)

    passes = await reporter.report(conn, NO_GRACE, MARGIN)

    messages = await outbox(conn)
    assert [(m["period_start"], len(m["body"]["message"])) for m in messages] == [
        (start, 2), (start + HOUR, 1), (start + 2 * HOUR, 1000), (start + 2 * HOUR, 500)]
    assert not any(m["correction"] for m in messages)
    assert all(m["body"]["id"] == str(m["message_id"]) for m in messages)
    found = events(messages)
    assert len(found) == 1503
    assert found[key("inst-1", "m1", start)] == {
        "idempotency_key": key("inst-1", "m1", start),
        "organization_id": "org-a",
        "instance_id": "inst-1",
        "payload": {
            "completed_at": f"{t + timedelta(minutes=30):%Y-%m-%d %H:%M:%S}.250 UTC",
            "model": "m1",
            "prompt_tokens": "30",
            "completion_tokens": "12",
            "cached_tokens": "3",
        },
    }
    assert found[key("inst-2", "m1", start + HOUR)]["payload"]["prompt_tokens"] == "100"
    assert found[key("inst-c1500", "m1", start + 2 * HOUR)]["payload"]["prompt_tokens"] == "1500"
    assert not any(k.startswith("inst-9") for k in found)

    state = await conn.fetchrow("SELECT * FROM billing.watermark")
    assert state["reported_until"] in (h, await this_hour(conn))
    assert state["reported_until"] == passes[-1].reported_until
    assert datetime.now(UTC) - state["ingested_until"] < timedelta(seconds=10)

    await reporter.report(conn, NO_GRACE, MARGIN)  # nothing new: nothing more
    assert len(await outbox(conn)) == 4


async def test_first_run_starts_with_the_last_hour(conn: asyncpg.Connection) -> None:
    h = await this_hour(conn)
    await seed(conn, ("o", "i", "m", h - 2 * HOUR, 1, 1), ("o", "i", "m", h - HOUR, 2, 2))
    [done] = await reporter.report(conn, NO_GRACE, MARGIN)
    assert (done.reported_from, done.reported_until) == (h - HOUR, h)
    assert list(events(await outbox(conn))) == [key("i", "m", h - HOUR)]


async def test_grace_holds_the_last_hour_back(conn: asyncpg.Connection) -> None:
    h = await this_hour(conn)
    await set_watermark(conn, h - HOUR)
    await seed(conn, ("o", "i", "m", h - HOUR, 1, 1))
    [done] = await reporter.report(conn, timedelta(minutes=61), MARGIN)  # over for < 61 min
    assert done.reported_until == h - HOUR and done.events == 0


async def test_crash_between_write_and_watermark_reports_nothing_twice(
    conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = await this_hour(conn)
    await set_watermark(conn, h - 3 * HOUR)
    await seed(conn, *[("o", f"i{n}", "m", h - n * HOUR, n, n) for n in (1, 2, 3)])

    async def crash(*args: object) -> None:
        raise ConnectionResetError("the process died here")

    monkeypatch.setattr(reporter, "advance_watermark", crash)
    with pytest.raises(ConnectionResetError):
        await reporter.report(conn, NO_GRACE, MARGIN)
    assert await outbox(conn) == []
    assert await conn.fetchval("SELECT reported_until FROM billing.watermark") == h - 3 * HOUR

    monkeypatch.undo()
    await reporter.report(conn, NO_GRACE, MARGIN)
    await reporter.report(conn, NO_GRACE, MARGIN)
    assert sorted(events(await outbox(conn))) == [
        key("i1", "m", h - HOUR), key("i2", "m", h - 2 * HOUR), key("i3", "m", h - 3 * HOUR)]


async def test_late_record_makes_exactly_one_correction(
    conn: asyncpg.Connection, billing_url: str
) -> None:
    h = await this_hour(conn)
    hour = h - 2 * HOUR
    await set_watermark(conn, hour)
    await seed(conn, ("org", "inst", "m", hour + timedelta(minutes=5), 10, 10))
    await reporter.report(conn, NO_GRACE, MARGIN)
    assert list(events(await outbox(conn))) == [key("inst", "m", hour)]

    # The spool replays a record of that hour after an outage, through the real writer.
    completed = (hour + timedelta(minutes=59)).timestamp()
    late = UsageRecord(
        request_id=str(uuid.uuid4()), organization_id="org", instance_id="inst", model="m",
        requested_model="m", endpoint="/v1/completions", prompt_tokens=3, completion_tokens=4,
        status=200, streamed=False, disconnected=False, duration_ms=1, ttfb_ms=1,
        started_at=completed - 1, completed_at=completed,
    )
    writer = PostgresWriter(billing_url)
    try:
        assert (await writer.write([late])).inserted == 1
        await asyncio.sleep(MARGIN.total_seconds() * 2)
        await reporter.report(conn, NO_GRACE, MARGIN)
        await reporter.report(conn, NO_GRACE, MARGIN)

        messages = await outbox(conn)
        corrections = [m for m in messages if m["correction"]]
        assert len(corrections) == 1 and corrections[0]["period_start"] == hour
        assert corrections[0]["body"]["message"] == [{
            "idempotency_key": key("inst", "m", hour, 1),
            "organization_id": "org",
            "instance_id": "inst",
            "payload": {"completed_at": f"{hour:%Y-%m-%d} {hour:%H}:59:00 UTC", "model": "m",
                        "prompt_tokens": "3", "completion_tokens": "4",
                        "cached_tokens": "0"},
        }]
        assert len(events(messages)) == 2

        # Replaying the same record again adds nothing; another late one is the next revision.
        assert (await writer.write([late])).inserted == 0
        assert (await writer.write([replace(late, request_id=str(uuid.uuid4()))])).inserted == 1
    finally:
        await writer.close()
    await asyncio.sleep(MARGIN.total_seconds() * 2)
    await reporter.report(conn, NO_GRACE, MARGIN)
    assert key("inst", "m", hour, 2) in events(await outbox(conn))
    assert len(events(await outbox(conn))) == 3


async def test_rows_of_an_open_transaction_wait_for_its_commit(
    conn: asyncpg.Connection, billing_url: str
) -> None:
    h = await this_hour(conn)
    await set_watermark(conn, h - HOUR)
    other = await asyncpg.connect(billing_url)
    try:
        tx = other.transaction()
        await tx.start()
        await seed(other, ("org", "slow", "m", h - HOUR + timedelta(minutes=1), 5, 5))
        await other.execute("UPDATE inference.requests SET ingested_at = clock_timestamp() "
                            "WHERE instance_id = 'slow'")
        await asyncio.sleep(MARGIN.total_seconds() * 2)
        await reporter.report(conn, NO_GRACE, MARGIN)  # cannot see the row yet
        assert events(await outbox(conn)) == {}
        await tx.commit()
    finally:
        await other.close()
    await asyncio.sleep(MARGIN.total_seconds() * 2)
    await reporter.report(conn, NO_GRACE, MARGIN)
    assert list(events(await outbox(conn))) == [key("slow", "m", h - HOUR, 1)]


async def test_only_one_reporter_at_a_time(conn: asyncpg.Connection, billing_url: str) -> None:
    assert await leader.take_lead(conn, locks.BILLING_REPORTER)
    try:
        assert await reporter.run_once(Settings(database_url=billing_url), None) is None
    finally:
        await conn.execute("SELECT pg_advisory_unlock_all()")
    assert await reporter.run_once(Settings(database_url=billing_url), None) is not None


async def test_pgmq_sink_sends_every_message_once(
    conn: asyncpg.Connection, queue_url: str
) -> None:
    h = await this_hour(conn)
    await set_watermark(conn, h - 2 * HOUR)
    await seed(conn, ("o", "i", "m", h - 2 * HOUR, 1, 2), ("o", "i", "m", h - HOUR, 3, 4))
    await reporter.report(conn, NO_GRACE, MARGIN)
    sink = PgmqSink(queue_url, "billing_test")
    try:
        assert await reporter.deliver(conn, sink) == 2
        assert await reporter.deliver(conn, sink) == 0
    finally:
        await sink.close()
    queue = await asyncpg.connect(queue_url)
    try:
        read = await queue.fetch("SELECT message::text FROM pgmq.read('billing_test', 30, 10)")
    finally:
        await queue.close()
    sent = [m["body"] for m in await outbox(conn)]
    assert [json.loads(r["message"]) for r in read] == sent
    assert all(m["delivered_at"] is not None and m["attempts"] == 1 for m in await outbox(conn))


class Receiver:
    """A local webhook endpoint that fails the first ``failures`` requests with a 503."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.requests: list[tuple[str, dict[str, Any]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.content_type, await request.json(loads=json.loads)))
        if len(self.requests) <= self.failures:
            return web.Response(status=503)
        return web.Response(status=204)


async def serve(receiver: Receiver) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/events", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/events"


async def test_webhook_sink_retries_a_failure(conn: asyncpg.Connection) -> None:
    h = await this_hour(conn)
    await set_watermark(conn, h - HOUR)
    await seed(conn, ("org", "inst", "m", h - HOUR, 7, 8))
    await reporter.report(conn, NO_GRACE, MARGIN)
    receiver = Receiver(failures=1)
    runner, url = await serve(receiver)
    sink = WebhookSink(url, timeout=5, retries=2, backoff=0.05)
    try:
        assert await reporter.deliver(conn, sink) == 1
    finally:
        await sink.close()
        await runner.cleanup()
    [message] = await outbox(conn)
    assert len(receiver.requests) == 2  # the failure, then the retry
    (first_type, first), (_, second) = receiver.requests
    assert first == second and first_type == "application/cloudevents+json"
    assert first["specversion"] == "1.0" and first["id"] == str(message["message_id"])
    assert first["type"] == "inference-gateway.usage.hourly"
    assert first["subject"] == f"{h - HOUR:%Y-%m-%dT%H}:00:00Z"
    assert first["data"] == message["body"]
    assert message["delivered_at"] is not None and message["last_error"] is None


async def test_webhook_down_keeps_messages_in_order(conn: asyncpg.Connection) -> None:
    h = await this_hour(conn)
    await set_watermark(conn, h - 2 * HOUR)
    await seed(conn, ("o", "i", "m", h - 2 * HOUR, 1, 1), ("o", "i", "m", h - HOUR, 1, 1))
    await reporter.report(conn, NO_GRACE, MARGIN)
    receiver = Receiver(failures=1000)
    runner, url = await serve(receiver)
    sink = WebhookSink(url, timeout=5, retries=1, backoff=0.01)
    try:
        with pytest.raises(Exception, match="503"):
            await reporter.deliver(conn, sink)
        receiver.failures = 0
        assert await reporter.deliver(conn, sink) == 2
    finally:
        await sink.close()
        await runner.cleanup()
    first, second = await outbox(conn)
    assert (first["attempts"], second["attempts"]) == (2, 1)
    ids = [body["id"] for _, body in receiver.requests]
    assert ids == [str(first["message_id"])] * 3 + [str(second["message_id"])]


def cli(billing_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inference_gateway", *args],
        env={**os.environ, "DATABASE_URL": billing_url, "LOG_LEVEL": "WARNING", **env},
        capture_output=True, text=True, timeout=60, check=False,
    )


async def test_report_command_once(conn: asyncpg.Connection, billing_url: str) -> None:
    h = await this_hour(conn)
    await set_watermark(conn, h - 2 * HOUR)
    await seed(conn, ("o", "i", "m", h - 2 * HOUR, 1, 1), ("o", "j", "m", h - HOUR, 1, 1))
    result = await asyncio.to_thread(cli, billing_url, "report", "--once", BILLING_GRACE_SEC="0")
    assert result.returncode == 0, result.stderr
    assert "2 events, 0 corrections, 2 messages" in result.stdout
    assert len(await outbox(conn)) == 2


def test_report_command_names_missing_sink_settings(billing_url: str) -> None:
    result = cli(billing_url, "report", "--once", BILLING_SINK="webhook")
    assert result.returncode == 2 and "BILLING_WEBHOOK_URL" in result.stderr
    result = cli(billing_url, "report", "--once", BILLING_SINK="pgmq")
    assert result.returncode == 2 and "QUEUE_CONN_URL" in result.stderr


async def test_gateway_workers_elect_one_reporter(
    conn: asyncpg.Connection, billing_url: str, session_tmp: Path, simulator: Proc
) -> None:
    h = await this_hour(conn)
    await set_watermark(conn, h - HOUR)
    await seed(conn, ("o", "i", "m", h - HOUR + timedelta(minutes=3), 1, 1))
    gateway = await asyncio.to_thread(
        start_gateway, session_tmp, billing_url, simulator.url, RUN_BILLING_REPORTER="true",
        WEBSERVER_WORKERS="3", BILLING_GRACE_SEC="0")
    try:
        deadline = time.monotonic() + 15
        while not await outbox(conn):
            assert time.monotonic() < deadline, gateway.log_tail()
            await asyncio.sleep(0.1)
        holders = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1 "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            0x1A7E6A90,
        )
        assert holders == 1
    finally:
        await asyncio.to_thread(gateway.stop)
    assert list(events(await outbox(conn))) == [key("i", "m", h - HOUR)]


async def test_usage_command_prints_a_table(conn: asyncpg.Connection, billing_url: str) -> None:
    h = await this_hour(conn)
    await seed(
        conn,
        ("acme", "i", "m1", h - 2 * HOUR, 1000, 5),
        ("acme", "i", "m1", h - 2 * HOUR + timedelta(minutes=5), 1, 1),
        ("acme", "j", "m2", h - HOUR, 100, 50),
        ("acme", "j", "m2", h - 5 * HOUR, 100, 50),  # outside the range
        ("other", "k", "m1", h - HOUR, 7, 7),
    )
    span = ("--from", f"{h - 3 * HOUR:%Y-%m-%dT%H:%M}", "--to", h.isoformat())
    by_model = await asyncio.to_thread(cli, billing_url, "usage", "--org", "acme", "--by",
                                       "model", *span)
    assert by_model.returncode == 0, by_model.stderr
    rows = [line.split() for line in by_model.stdout.splitlines()]
    assert ["m1", "2", "1,001", "6", "1,007"] in rows
    assert ["m2", "1", "100", "50", "150"] in rows
    assert ["total", "3", "1,101", "56", "1,157"] in rows
    by_hour = await asyncio.to_thread(cli, billing_url, "usage", "--org", "acme", "--by",
                                      "hour", *span)
    hours = [line.split()[:2] for line in by_hour.stdout.splitlines()]
    assert [f"{h - 2 * HOUR:%Y-%m-%d}", f"{h - 2 * HOUR:%H}:00"] in hours
    assert [f"{h - HOUR:%Y-%m-%d}", f"{h - HOUR:%H}:00"] in hours
    bad = await asyncio.to_thread(cli, billing_url, "usage", "--org", "acme", "--from", "soon")
    assert bad.returncode == 2 and "--from" in bad.stderr
