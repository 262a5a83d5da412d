"""The limit counters, in a real Redis and in the process's own twin: exact windows,
reservations and settling, places held at once, quotas and their periods."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from inference_gateway.admission.answers import Known, duration, header_plan, rate_limit_headers
from inference_gateway.admission.checks import WINDOW_MS, Check, checks_for, estimate
from inference_gateway.admission.gate import Admission
from inference_gateway.admission.limits import Limit, LimitBook, set_limit
from inference_gateway.admission.local_counters import LocalCounters
from inference_gateway.admission.quotas import reconcile
from inference_gateway.admission.redis_counters import Decision, RedisCounters
from inference_gateway.metering.record import UsageRecord
from inference_gateway.settings import Settings
from inference_gateway.tenants.tenant import Tenant

T0 = datetime(2026, 12, 31, 23, 59, 0, tzinfo=UTC)
MS0 = int(T0.timestamp() * 1000)


def limit(**values: int | None) -> Limit:
    org = f"org-{uuid.uuid4().hex[:8]}"
    fields: dict[str, int | None] = {
        "requests_per_minute": None, "tokens_per_minute": None, "max_concurrent": None,
        "tokens_per_day": None, "tokens_per_month": None}
    fields.update(values)
    return Limit(1, org, None, None, None, **fields)  # type: ignore[arg-type]


class Both:
    """The Redis counters or the local ones behind one asynchronous face."""

    def __init__(self, redis: RedisCounters | None) -> None:
        self.redis = redis
        self.local = LocalCounters(share=1.0)
        self.taken: dict[str, list[int]] = {}  # what each ticket reserved, as a gate keeps it
        self.at: dict[str, int] = {}

    async def admit(self, checks: list[Check], ticket: str, at_ms: int) -> Decision:
        if self.redis is not None:
            decision = await self.redis.admit(checks, ticket, at_ms)
        else:
            decision = self.local.admit(checks, ticket, at_ms)
        self.taken[ticket] = decision.taken
        self.at[ticket] = decision.at_ms
        return decision

    async def settle(self, checks: list[Check], ticket: str, actual: list[int]) -> None:
        if self.redis is not None:
            await self.redis.settle(checks, ticket, self.at[ticket], self.taken[ticket],
                                    actual)
        else:
            self.local.settle(checks, ticket, self.at[ticket], self.taken[ticket], actual)


@pytest.fixture(params=["redis", "local"])
async def counters(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[Both]:
    redis = RedisCounters(redis_url, 1.0) if request.param == "redis" else None
    yield Both(redis)
    if redis is not None:
        await redis.close()


async def test_any_minute_admits_at_most_the_limit(counters: Both) -> None:
    checks = checks_for((limit(requests_per_minute=3),), 10, 0, now=T0)
    admitted = []
    for second in range(0, 150, 5):  # a request every 5 s for 150 s
        if (await counters.admit(checks, f"t{second}", MS0 + second * 1000)).admitted:
            admitted.append(second)
    for start in range(0, 150):
        assert len([s for s in admitted if start <= s < start + 60]) <= 3, (start, admitted)
    # Room again as each one leaves, at the end of its second plus 60 s.
    assert admitted == [0, 5, 10, 65, 70, 75, 130, 135, 140]


async def test_refusal_says_when_there_is_room(counters: Both) -> None:
    checks = checks_for((limit(tokens_per_minute=100),), 30, 10, now=T0)  # 40 a request
    assert (await counters.admit(checks, "a", MS0)).admitted
    assert (await counters.admit(checks, "b", MS0 + 10_000)).admitted
    refused = await counters.admit(checks, "c", MS0 + 20_000)
    assert not refused.admitted and refused.failing == 0
    assert refused.retry_ms == WINDOW_MS + 1000 - 20_000  # when "a"'s second leaves
    assert (await counters.admit(checks, "c", MS0 + refused.retry_ms + 20_000)).admitted


async def test_settling_replaces_the_reservation(counters: Both) -> None:
    checks = checks_for((limit(tokens_per_minute=110),), 30, 60, now=T0)  # reserves 90
    assert (await counters.admit(checks, "a", MS0)).admitted
    assert not (await counters.admit(checks, "b", MS0 + 1)).admitted  # 90 + 90 > 110
    await counters.settle(checks, "a", [12])  # it used 12
    decision = await counters.admit(checks, "b", MS0 + 2)
    assert decision.admitted and decision.used == [12 + 90]
    await counters.settle(checks, "b", [95])  # more than it reserved: the window owes it
    assert not (await counters.admit(checks, "c", MS0 + 3)).admitted


async def test_without_max_tokens_a_request_takes_what_is_left(counters: Both) -> None:
    owner = limit(tokens_per_minute=400, tokens_per_day=1000)
    unnamed = checks_for((owner,), 30, 4096, named=False, now=T0)  # asked for no max_tokens
    first = await counters.admit(unnamed, "a", MS0)
    assert first.admitted and first.taken == [400, 1000]  # never "too large": what is left
    refused = await counters.admit(unnamed, "b", MS0 + 1)
    assert not refused.admitted and refused.failing == 0
    await counters.settle(unnamed, "a", [50, 50])
    second = await counters.admit(unnamed, "b", MS0 + 2)
    assert second.admitted and second.taken == [350, 950] and second.used == [400, 1000]
    await counters.settle(unnamed, "b", [50, 50])  # the day now holds 100 of 1000
    named = checks_for((owner,), 30, 4096, now=T0)  # 4126 can never fit 400 a minute
    too_large = await counters.admit(named, "c", MS0 + 3)
    assert not too_large.admitted and too_large.failing == 0
    daily = limit(tokens_per_day=1000)
    await counters.admit(checks_for((daily,), 30, 870, now=T0), "d", MS0)
    named = checks_for((daily,), 30, 4096, now=T0)  # a quota takes what is left: 100
    assert (await counters.admit(named, "e", MS0 + 1)).taken == [100]
    assert not (await counters.admit(named, "f", MS0 + 2)).admitted


def test_what_redis_admitted_still_counts_when_it_goes_away() -> None:
    local = LocalCounters(share=0.5)  # one of two processes
    minute = checks_for((limit(requests_per_minute=4),), 1, 0, now=T0)
    for ticket in ("a", "b"):  # admitted by Redis, remembered here
        local.remember(minute, ticket, [1], [1], now_ms=MS0)
    assert not local.admit(minute, "c", MS0 + 1).admitted  # its share, 2, is used
    assert not local.admit(minute, "c", MS0 + WINDOW_MS + 999).admitted  # their second
    assert local.admit(minute, "c", MS0 + WINDOW_MS + 1000).admitted
    month = checks_for((limit(tokens_per_month=1000),), 150, 0, now=T0)
    local.remember(month, "d", [100], [800], now_ms=MS0)  # the fleet used 800 of 1000
    refused = local.admit(month, "e", MS0 + 1)
    assert not refused.admitted and refused.used == [400]  # its share: 400 of 500


async def test_places_at_once_are_given_back(counters: Both) -> None:
    checks = checks_for((limit(max_concurrent=2),), 1, 1, now=T0)
    assert (await counters.admit(checks, "a", MS0)).admitted
    assert (await counters.admit(checks, "b", MS0)).admitted
    assert not (await counters.admit(checks, "c", MS0)).admitted
    await counters.settle(checks, "a", [1])
    assert (await counters.admit(checks, "c", MS0)).admitted
    # A gateway that died holding a place: the place is freed after its time-out.
    later = MS0 + checks[0].span_ms + 1
    assert (await counters.admit(checks, "d", later)).admitted


async def test_a_quota_runs_out_and_starts_again_next_period(counters: Both) -> None:
    owner = limit(tokens_per_month=1000)
    spent = 0
    while True:  # reserve 100 (prompt 20 + completion 80), use 70
        checks = checks_for((owner,), 20, 80, now=T0)
        decision = await counters.admit(checks, f"r{spent}", MS0)
        if not decision.admitted:
            break
        await counters.settle(checks, f"r{spent}", [70])
        spent += 70
    # Admitted while its prompt fits (980 + 20), the last one ends over by what it generated.
    assert spent == 15 * 70
    assert decision.retry_ms == 60_000  # the month ends a minute after T0
    after = T0 + timedelta(minutes=2)  # January
    checks = checks_for((owner,), 20, 80, now=after)
    assert (await counters.admit(checks, "jan", int(after.timestamp() * 1000))).admitted


async def test_every_limit_must_admit_and_nothing_is_taken_otherwise(counters: Both) -> None:
    roomy, tight = limit(requests_per_minute=100), limit(requests_per_minute=1)
    tight = Limit(2, roomy.organization_id, "inst", None, None, 1, None, None, None, None)
    checks = checks_for((roomy, tight), 1, 0, now=T0)
    assert (await counters.admit(checks, "a", MS0)).admitted
    refused = await counters.admit(checks, "b", MS0 + 1)
    assert not refused.admitted and refused.failing == 1
    alone = checks_for((roomy,), 1, 0, now=T0)
    assert (await counters.admit(alone, "c", MS0 + 2)).used == [2]  # "b" took nothing


def test_estimates_and_headers() -> None:
    fields: dict[str, object] = {"max_tokens": 50, "n": 2}
    assert estimate(fields, 400, True, 4096) == (101, 100, True)
    assert estimate({}, 400, True, 300) == (101, 300, False)
    assert estimate({"max_tokens": 0}, 400, True, 300) == (101, 300, False)
    assert estimate({"max_tokens": 10**9}, 4, True, 300) == (2, 300, True)
    assert estimate({"max_tokens": 5}, 400, False, 300) == (101, 0, True)
    assert [duration(ms) for ms in (0, 999, 1000, 1001, 59_000, 61_000, 360_000)] == [
        "0ms", "999ms", "1s", "2s", "59s", "1m1s", "6m0s"]
    owner = limit(requests_per_minute=10, tokens_per_minute=1000)
    checks = checks_for((owner,), 10, 10, now=T0)
    def rooms(*counters: tuple[int, int]) -> list[Known]:  # (used, reset in ms)
        return [Known(used, 100 + reset / 1000) for used, reset in counters]

    headers = rate_limit_headers(header_plan(checks), rooms((4, 30_000), (120, 1500)), 100)
    assert headers == {
        "x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "6",
        "x-ratelimit-reset-requests": "30s", "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "880", "x-ratelimit-reset-tokens": "2s"}
    # Of two limits on a measure, the one with less left speaks; one used up says 0.
    tight = limit(requests_per_minute=5)
    both = checks_for((owner, tight), 10, 10, now=T0)
    assert [check.key.rsplit(":", 1)[1] for check in both] == ["rpm", "tpm", "rpm"]
    headers = rate_limit_headers(header_plan(both), rooms((4, 30_000), (120, 1500), (4, 900)),
                                 100)
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"],
            headers["x-ratelimit-reset-requests"]) == ("5", "1", "900ms")
    headers = rate_limit_headers(header_plan(both), rooms((4, 30_000), (120, 1500), (7, 900)),
                                 100)
    assert headers["x-ratelimit-remaining-requests"] == "0"


async def test_quotas_come_back_from_postgres_after_redis_lost_them(database_url: str,
                                                                   redis_url: str) -> None:
    org = f"org-{uuid.uuid4().hex[:8]}"
    now = datetime(2026, 12, 15, 12, 0, tzinfo=UTC)
    conn = await asyncpg.connect(database_url)
    counters = RedisCounters(redis_url, 1.0)
    try:
        owner = await set_limit(conn, org, None, None, None, {
            "tokens_per_day": 1000, "tokens_per_month": 100_000, "completion_weight": 2})
        rows = [(org, datetime(2026, 12, 15, tzinfo=UTC), 100, 50),  # today: 200 weighted
                (org, datetime(2026, 12, 14, tzinfo=UTC), 1000, 0),  # this month
                (org, datetime(2026, 11, 30, tzinfo=UTC), 7, 7),  # last month
                (f"{org}-other", datetime(2026, 12, 15, tzinfo=UTC), 9, 9)]
        await conn.executemany(
            "INSERT INTO inference.usage_day (organization_id, family, bucket_start, "
            "instance_id, model, api_key_id, input_tokens, output_tokens, input_cached_tokens, "
            "num_model_requests) VALUES ($1, 'completions', $2, 'i', 'm', 0, $3, $4, 0, 1)",
            rows)
        day, month = (check.key for check in checks_for((owner,), 0, 0, now=now))
        await reconcile(conn, counters, now)  # Redis knew nothing, as after a restart
        assert [int(await counters.client.get(key)) for key in (day, month)] == [200, 1200]
        await counters.client.set(day, 900)  # reservations Postgres does not know of yet
        await reconcile(conn, counters, now)
        assert int(await counters.client.get(day)) == 900  # never lowered
        refused = await counters.admit(checks_for((owner,), 101, 0, now=now), "a",
                                       int(now.timestamp() * 1000))
        assert not refused.admitted and refused.used == [900]
    finally:
        await counters.client.delete(*[check.key for check in checks_for((owner,), 0, 0, now=now)])
        await counters.close()
        await conn.close()


async def test_a_window_holds_a_few_fields_whatever_the_rate(redis_url: str) -> None:
    """A window is a count per second: what Redis holds stays bounded by the window's length,
    however many requests it counts; a second that left it is no longer settled into it."""
    import redis.asyncio as aioredis

    counters = RedisCounters(redis_url, 1.0)
    store = aioredis.Redis.from_url(redis_url)
    try:
        checks = checks_for((limit(tokens_per_minute=10**9),), 10, 0, now=T0)
        first = await counters.admit(checks, "first", MS0)
        for i in range(2000):  # 20 requests in each of 100 seconds
            decision = await counters.admit(checks, f"r{i}", MS0 + (i // 20) * 1000 + i % 20)
            assert decision.admitted
        assert await store.hlen(checks[0].key) <= 61 + 3  # the seconds, their sum, oldest, newest
        assert decision.used == [61 * 20 * 10]  # 61 seconds of 20 requests of 10 tokens
        await counters.settle(checks, "first", first.at_ms, first.taken, [0])  # long gone
        await counters.settle(checks, "r1999", decision.at_ms, decision.taken, [1])
        after = await counters.admit(checks, "last", MS0 + 99_500)
        assert after.used == [61 * 20 * 10 - 9 + 10]  # r1999 used 1 of its 10
    finally:
        await counters.close()
        await store.aclose()


async def test_a_request_that_left_during_its_admission_gives_back_what_it_took(
        redis_url: str) -> None:
    """The client left while Redis admitted it: the answer still comes, to the one who asked
    for it, and what the admission took is given back exactly."""
    counters = RedisCounters(redis_url, 1.0)
    try:
        await counters.admit(checks_for((limit(requests_per_minute=1),), 1, 0), "open")
        checks = checks_for((limit(requests_per_minute=2, tokens_per_minute=1000,
                                   max_concurrent=1),), 10, 40)
        late: list[Decision] = []
        task = asyncio.create_task(counters.admit(checks, "gone", orphan=late.append))
        await asyncio.sleep(0)  # the script is on its way (the connection is open)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if late:
                break
            await asyncio.sleep(0.01)
        (decision,) = late
        assert decision.admitted and decision.taken == [1, 50, 1]
        await counters.settle(checks, "gone", decision.at_ms, decision.taken, [0, 0, 0])
        again = await counters.admit(checks, "next")
        assert again.admitted and again.used == [1, 50, 1]
    finally:
        await counters.close()


async def test_a_refusal_by_another_check_keeps_the_window_right(counters: Both) -> None:
    """A window that dropped its old seconds keeps its sum right even when another check
    refuses the request in the same step."""
    checks = checks_for((limit(requests_per_minute=10, max_concurrent=1),), 1, 0, now=T0)
    for i in range(9):  # five in second 0, four in second 30, each done at once
        at = MS0 + (0 if i < 5 else 30_000) + i
        assert (await counters.admit(checks, f"r{i}", at)).admitted
        await counters.settle(checks, f"r{i}", [1, 1])
    assert (await counters.admit(checks, "long", MS0 + 30_100)).admitted  # holds the place
    refused = await counters.admit(checks, "x", MS0 + 61_000)  # second 0 has left the window
    assert not refused.admitted and refused.failing == 1  # the place is taken
    await counters.settle(checks, "long", [1, 1])
    after = await counters.admit(checks, "y", MS0 + 62_000)
    assert after.admitted and after.used == [6, 1]


async def test_a_settlement_that_redis_lost_the_script_of_is_made_again(redis_url: str) -> None:
    """A settlement written at once finds a Redis without its script (restarted, flushed):
    the gate makes it again when the answer says so, and its close waits for that."""
    owner = limit(tokens_per_minute=1000)
    book = LimitBook()
    book._by_org = {owner.organization_id: (owner,)}
    # Without held room (leases), the settlement goes to Redis: that is what is tested here.
    gate = Admission(Settings(redis_url=redis_url, rate_limit_leases=False), book)
    tenant = Tenant(owner.organization_id, "inst")
    assert gate.redis is not None
    real_sha = gate.redis._settle.sha
    try:
        first = await gate.admit(tenant, "m", {"max_tokens": 90}, 40, True)  # 11 + 90
        assert first is not None and first.taken == [101]
        gate.redis._settle.sha = "0" * 40  # a script this Redis never had
        record = UsageRecord("r", owner.organization_id, "inst", "m", "m", "/v1/completions",
                             11, 4, 200, False, False, 1, 1, 0.0, 0.0)
        assert gate.settle(first, record) is None  # written at once, its answer to come
        for _ in range(200):  # NOSCRIPT, then the settlement made again with the real script
            gate.redis._settle.sha = real_sha
            if not gate._sent and not gate._settling:
                break
            await asyncio.sleep(0.01)
        second = await gate.admit(tenant, "m", {"max_tokens": 90}, 40, True)
        assert second is not None
        assert second.headers["x-ratelimit-remaining-tokens"] == str(1000 - 15 - 101)
    finally:
        await gate.close()
