"""The hourly usage reporter against a database of its own: events, watermark, crashes, late
records, and the pgmq and webhook sinks."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pgmq
import pytest
from aiohttp import web

from inference_gateway.billing import reporter
from inference_gateway.billing.sinks import OutboxMessage, PgmqSink, SinkError, WebhookSink
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


async def until(check: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    """Poll ``check`` (a function, or a coroutine function) until it returns something true;
    fail after a generous deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.01)


async def past_margin(conn: asyncpg.Connection, since: datetime | None = None) -> None:
    """Wait until the database's clock is more than MARGIN past ``since`` (by default, now):
    rows ingested until then are then old enough for the reporter to count them."""
    if since is None:
        since = await conn.fetchval("SELECT clock_timestamp()")
    await until(lambda: conn.fetchval("SELECT clock_timestamp() - $1::interval > $2",
                                      MARGIN, since), "the settle margin went by")


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

    before = await conn.fetchval("SELECT clock_timestamp()")
    passes = await reporter.report(conn, NO_GRACE, MARGIN)
    after = await conn.fetchval("SELECT clock_timestamp()")

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
    assert state["ingested_until"] == passes[-1].ingested_until
    assert before - MARGIN <= state["ingested_until"] <= after - MARGIN

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
        await past_margin(conn)
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
    await past_margin(conn)
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
        # Old enough by the margin: only the open transaction holds the cutoff before it.
        await past_margin(conn, await other.fetchval(
            "SELECT ingested_at FROM inference.requests WHERE instance_id = 'slow'"))
        await reporter.report(conn, NO_GRACE, MARGIN)  # cannot see the row yet
        assert events(await outbox(conn)) == {}
        assert await conn.fetchval("SELECT ingested_until FROM billing.watermark") <= (
            await other.fetchval("SELECT xact_start FROM pg_stat_activity "
                                 "WHERE pid = pg_backend_pid()"))
        await tx.commit()
    finally:
        await other.close()
    await reporter.report(conn, NO_GRACE, MARGIN)
    assert list(events(await outbox(conn))) == [key("slow", "m", h - HOUR, 1)]


async def test_a_backlog_longer_than_a_pass_is_reported_in_several(
    conn: asyncpg.Connection,
) -> None:
    h = await this_hour(conn)
    start = h - 30 * HOUR  # 30 hours behind: more than the 24 hours of one pass
    await set_watermark(conn, start)
    await seed(conn, *[("o", "i", "m", start + n * HOUR + timedelta(minutes=1), n + 1, 1)
                       for n in range(30)])
    passes = await reporter.report(conn, NO_GRACE, MARGIN)
    assert [(p.reported_from, p.reported_until, p.events, p.caught_up) for p in passes] == [
        (start, start + 24 * HOUR, 24, False),
        (start + 24 * HOUR, passes[-1].reported_until, 6, True),
    ]
    assert passes[-1].reported_until in (h, await this_hour(conn))
    messages = await outbox(conn)
    assert [m["period_start"] for m in messages] == [start + n * HOUR for n in range(30)]
    found = events(messages)  # each hour once
    assert {k: e["payload"]["prompt_tokens"] for k, e in found.items()} == {
        key("i", "m", start + n * HOUR): str(n + 1) for n in range(30)}
    await reporter.report(conn, NO_GRACE, MARGIN)
    assert len(await outbox(conn)) == 30


async def test_a_backlog_pass_that_fails_keeps_the_passes_before_it(
    conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each pass is its own transaction: the second one dies, the first one's 24 hours stay
    reported, and the next run reports the other 6, nothing twice."""
    h = await this_hour(conn)
    start = h - 30 * HOUR
    await set_watermark(conn, start)
    await seed(conn, *[("o", "i", "m", start + n * HOUR, 1, 1) for n in range(30)])
    advance = reporter.advance_watermark
    calls = 0

    async def dies_the_second_time(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ConnectionResetError("the process died here")
        await advance(*args)

    monkeypatch.setattr(reporter, "advance_watermark", dies_the_second_time)
    with pytest.raises(ConnectionResetError):
        await reporter.report(conn, NO_GRACE, MARGIN)
    assert await conn.fetchval("SELECT reported_until FROM billing.watermark") == (
        start + 24 * HOUR)
    assert [m["period_start"] for m in await outbox(conn)] == [
        start + n * HOUR for n in range(24)]

    monkeypatch.undo()
    [done] = await reporter.report(conn, NO_GRACE, MARGIN)
    assert (done.reported_from, done.events) == (start + 24 * HOUR, 6)
    messages = await outbox(conn)
    assert [m["period_start"] for m in messages] == [start + n * HOUR for n in range(30)]
    assert len(events(messages)) == 30


async def test_the_clock_going_back_counts_no_row_twice(
    conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ingestion cutoff and the reported hours never move backwards, so a row counted
    before the clock went back is not counted again once it goes forward."""
    h = await this_hour(conn)
    hour = h - 2 * HOUR
    await set_watermark(conn, hour)
    await seed(conn, ("org", "inst", "m", hour + timedelta(minutes=5), 10, 10))
    await reporter.report(conn, NO_GRACE, MARGIN)
    # A late row for that hour, counted by the next pass as its first correction.
    await conn.execute(
        "INSERT INTO inference.requests (request_id, organization_id, instance_id, model, "
        "requested_model, endpoint, prompt_tokens, completion_tokens, status, duration_ms, "
        "started_at, completed_at) VALUES (gen_random_uuid(), 'org', 'inst', 'm', 'm', "
        "'/v1/completions', 3, 4, 200, 1, $1, $1)", hour + timedelta(minutes=30))
    await past_margin(conn)
    await reporter.report(conn, NO_GRACE, MARGIN)
    state = await conn.fetchrow("SELECT reported_until, ingested_until FROM billing.watermark")
    assert list(events(await outbox(conn))) == [key("inst", "m", hour),
                                                key("inst", "m", hour, 1)]

    # The database's clock goes back an hour (as the reporter reads it).
    monkeypatch.setattr(reporter, "_CLOCK", reporter._CLOCK.replace(
        "clock_timestamp()", "(clock_timestamp() - interval '1 hour')"))
    [back] = await reporter.report(conn, NO_GRACE, MARGIN)
    assert (back.reported_until, back.ingested_until, back.events, back.corrections) == (
        state["reported_until"], state["ingested_until"], 0, 0)
    assert await conn.fetchrow(
        "SELECT reported_until, ingested_until FROM billing.watermark") == state

    monkeypatch.undo()  # and forward again
    await past_margin(conn)
    await reporter.report(conn, NO_GRACE, MARGIN)
    assert list(events(await outbox(conn))) == [key("inst", "m", hour),
                                                key("inst", "m", hour, 1)]


async def test_only_one_reporter_at_a_time(conn: asyncpg.Connection, billing_url: str) -> None:
    assert await leader.take_lead(conn, locks.BILLING_REPORTER)
    try:
        assert await reporter.run_once(Settings(database_url=billing_url), None) is None
    finally:
        await conn.execute("SELECT pg_advisory_unlock_all()")
    assert await reporter.run_once(Settings(database_url=billing_url), None) is not None


class RecordingSink:
    """A sink that accepts every message and keeps it."""

    def __init__(self) -> None:
        self.sent: list[OutboxMessage] = []

    async def send(self, message: OutboxMessage) -> None:
        self.sent.append(message)

    async def close(self) -> None:
        pass


async def test_another_process_reports_when_the_reporter_dies(
    conn: asyncpg.Connection, billing_url: str
) -> None:
    h = await this_hour(conn)
    await set_watermark(conn, h - 2 * HOUR)
    await seed(conn, ("o", "i", "m", h - 2 * HOUR + timedelta(minutes=1), 1, 1),
               ("o", "i", "m", h - HOUR + timedelta(minutes=1), 2, 2))
    settings = Settings(database_url=billing_url, billing_period_sec=0.2, billing_grace_sec=0)
    sinks = {"a": RecordingSink(), "b": RecordingSink()}
    stop = asyncio.Event()
    tasks = {name: asyncio.create_task(leader.run(billing_url,
                                                  reporter.billing_job(settings, sink), stop))
             for name, sink in sinks.items()}
    try:
        await until(lambda: sum(len(s.sent) for s in sinks.values()) == 2, "the first report")
        [first] = [name for name, sink in sinks.items() if sink.sent]
        other = "b" if first == "a" else "a"
        await until(lambda: conn.fetchval("SELECT count(*) = 2 FROM billing.outbox "
                                          "WHERE delivered_at IS NOT NULL"), "marked delivered")
        tasks[first].cancel()  # the reporter's process dies
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[first]
        reported = list(sinks[first].sent)

        # A late row of a reported hour, ingested right at the watermark: the next pass bills
        # it, whoever makes it (the watermark is locked meanwhile, so no pass runs past it).
        async with conn.transaction():
            at = await conn.fetchval("SELECT ingested_until FROM billing.watermark FOR UPDATE")
            await conn.execute(
                "INSERT INTO inference.requests (request_id, organization_id, instance_id, "
                "model, requested_model, endpoint, prompt_tokens, completion_tokens, status, "
                "duration_ms, started_at, completed_at, ingested_at) VALUES "
                "(gen_random_uuid(), 'o', 'i', 'm', 'm', '/v1/completions', 5, 6, 200, 1, $1, "
                "$1, $2)", h - HOUR + timedelta(minutes=30), at)
        await until(lambda: sinks[other].sent, "the other process took over and reported")
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks.values(), return_exceptions=True), 10)
    assert sinks[first].sent == reported  # nothing more from the dead one
    assert [m.period_start for m in reported] == [h - 2 * HOUR, h - HOUR]
    [correction] = sinks[other].sent
    assert correction.correction and correction.period_start == h - HOUR
    [event] = json.loads(correction.body)["message"]
    assert event["idempotency_key"] == key("i", "m", h - HOUR, 1)
    assert (event["payload"]["prompt_tokens"], event["payload"]["completion_tokens"]) == (
        "5", "6")
    messages = await outbox(conn)
    assert [m["message_id"] for m in messages] == [m.message_id for m in [*reported, correction]]
    assert all(m["delivered_at"] is not None and m["attempts"] == 1 for m in messages)


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


async def serve(receiver: Receiver | ScriptedReceiver) -> tuple[web.AppRunner, str]:
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


class ScriptedReceiver:
    """A webhook endpoint that answers each POST as its script says: a status, or "hang"
    (no answer until the test ends, so the sender times out); then 204. It notes every
    event id it received, and those it accepted."""

    def __init__(self, *script: int | str) -> None:
        self.script = list(script)
        self.received: list[str] = []
        self.accepted: list[str] = []
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        event_id = (await request.json())["id"]
        self.received.append(event_id)
        step = self.script.pop(0) if self.script else 204
        if step == "hang":
            await self.release.wait()
            return web.Response(status=503)
        assert isinstance(step, int)
        if 200 <= step < 300:
            self.accepted.append(event_id)
        return web.Response(status=step)


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_webhook_client_error_is_not_retried_and_stops_delivery(
    conn: asyncpg.Connection, status: int
) -> None:
    h = await this_hour(conn)
    await set_watermark(conn, h - 2 * HOUR)
    await seed(conn, ("o", "i", "m", h - 2 * HOUR, 1, 1), ("o", "i", "m", h - HOUR, 1, 1))
    await reporter.report(conn, NO_GRACE, MARGIN)
    receiver = ScriptedReceiver(status)
    runner, url = await serve(receiver)
    sink = WebhookSink(url, timeout=5, retries=3, backoff=0.01)
    try:
        with pytest.raises(SinkError, match=f"HTTP {status}"):
            await reporter.deliver(conn, sink)
        first, second = await outbox(conn)
        assert receiver.received == [str(first["message_id"])]  # once, and not the next one
        assert (first["attempts"], first["last_error"], first["delivered_at"]) == (
            1, f"webhook answered HTTP {status}", None)
        assert (second["attempts"], second["delivered_at"]) == (0, None)
        assert await reporter.deliver(conn, sink) == 2  # the receiver takes them now
    finally:
        await sink.close()
        await runner.cleanup()
    first, second = await outbox(conn)
    assert receiver.accepted == [str(first["message_id"]), str(second["message_id"])]
    assert (first["attempts"], second["attempts"]) == (2, 1)
    assert all(m["delivered_at"] is not None and m["last_error"] is None
               for m in (first, second))


async def test_webhook_server_errors_and_timeouts_are_retried_and_delivered_once(
    conn: asyncpg.Connection,
) -> None:
    h = await this_hour(conn)
    await set_watermark(conn, h - HOUR)
    await seed(conn, ("o", "i", "m", h - HOUR, 7, 8))
    await reporter.report(conn, NO_GRACE, MARGIN)
    # First delivery: a 500, then two timeouts: the retries are used up. Second: a 502, a
    # timeout, then accepted.
    receiver = ScriptedReceiver(500, "hang", "hang", 502, "hang")
    runner, url = await serve(receiver)
    sink = WebhookSink(url, timeout=0.2, retries=2, backoff=0.01)
    try:
        with pytest.raises(SinkError, match="webhook unreachable"):
            await reporter.deliver(conn, sink)
        [message] = await outbox(conn)
        assert (message["attempts"], message["delivered_at"]) == (1, None)
        assert message["last_error"].startswith("webhook unreachable: ")
        assert await reporter.deliver(conn, sink) == 1
    finally:
        receiver.release.set()
        await sink.close()
        await runner.cleanup()
    [message] = await outbox(conn)
    assert receiver.received == [str(message["message_id"])] * 6  # the same event each time
    assert receiver.accepted == [str(message["message_id"])]
    assert message["attempts"] == 2 and message["delivered_at"] is not None
    assert message["last_error"] is None


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
        try:
            await until(lambda: outbox(conn), "a gateway worker reported")
        except AssertionError as exc:
            raise AssertionError(gateway.log_tail()) from exc
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
