"""Room held by gateway processes (leases), against a real Redis: requests admitted without a
round trip while a limit has plenty of room, never more than the limit across processes, and
every bit of held room given back, so that Redis ends up counting exactly what was used."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from inference_gateway.admission.gate import Admission, Ticket
from inference_gateway.admission.held import Hold
from inference_gateway.admission.limits import Limit, LimitBook
from inference_gateway.errors import GatewayError
from inference_gateway.metering.record import UsageRecord
from inference_gateway.settings import Settings
from inference_gateway.tenants.tenant import Tenant


def limit(**values: int) -> Limit:
    fields: dict[str, int | None] = {
        "requests_per_minute": None, "tokens_per_minute": None, "max_concurrent": None,
        "tokens_per_day": None, "tokens_per_month": None}
    fields.update(values)
    return Limit(1, f"org-{uuid.uuid4().hex[:8]}", None, None, None,
                 **fields)  # type: ignore[arg-type]


def record(owner: Limit, prompt: int, completion: int) -> UsageRecord:
    return UsageRecord("r", owner.organization_id, "inst", "m", "m", "/v1/completions", prompt,
                       completion, 200, False, False, 1, 1, 0.0, 0.0)


class Counting:
    """A gate's Redis admissions, counted."""

    def __init__(self, gate: Admission) -> None:
        assert gate.redis is not None
        self.calls = 0
        real = gate.redis.admit

        async def admit(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await real(*args, **kwargs)

        gate.redis.admit = admit  # type: ignore[method-assign]


async def admitted_once_redis_is_gone(gate: Admission, tenant: Tenant) -> int:
    """How many more requests the process's own counters admit, Redis gone (as if)."""
    gate._redis_lost(ConnectionError("gone"))
    more = 0
    with pytest.raises(GatewayError):
        for _ in range(100):
            await gate.admit(tenant, "m", {}, 40, False)
            more += 1
    return more


async def early_in_a_second() -> None:
    """Held room goes back when its second ends: a test that looks at it starts just after
    one began (Redis's clock is this machine's)."""
    await asyncio.sleep(1 - time.time() % 1 + 0.01)


@pytest.fixture
async def gates(redis_url: str) -> AsyncIterator[list[Admission]]:
    made: list[Admission] = []
    yield made
    for gate in made:
        await gate.close()


def gate_for(owner: Limit, redis_url: str, made: list[Admission], processes: int = 1,
             leases: bool = True) -> Admission:
    book = LimitBook()
    book._by_org = {owner.organization_id: (owner,)}
    gate = Admission(Settings(redis_url=redis_url, webserver_workers=processes,
                              rate_limit_leases=leases), book)
    made.append(gate)
    return gate


async def counters(redis_url: str, owner: Limit) -> dict[str, Any]:
    """What Redis holds for the owner: each window's sum, places, quotas."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    found: dict[str, Any] = {}
    try:
        async for key in client.scan_iter(f"igw:{{{owner.organization_id}}}:*"):
            kind = await client.type(key)
            if kind == "hash":
                found[key.rsplit(":", 1)[1]] = int(await client.hget(key, "t") or 0)
            elif kind == "zset":
                found["cc"] = await client.zcard(key)
            else:
                found["quota"] = int(await client.get(key))
    finally:
        await client.aclose()
    return found


async def test_held_room_admits_without_redis_and_redis_ends_exact(
        redis_url: str, gates: list[Admission]) -> None:
    owner = limit(requests_per_minute=100_000, tokens_per_minute=10_000_000,
                  max_concurrent=1000, tokens_per_month=10**12)
    gate = gate_for(owner, redis_url, gates)
    counted = Counting(gate)
    tenant = Tenant(owner.organization_id, "inst")
    spent = 0
    started = time.monotonic()
    for i in range(200):
        ticket = await gate.admit(tenant, "m", {"max_tokens": 50}, 40, True)
        assert ticket is not None
        assert int(ticket.headers["x-ratelimit-remaining-requests"]) < 100_000
        gate.settle(ticket, record(owner, 11, i % 7))
        spent += 11 + i % 7
    seconds = time.monotonic() - started
    # A few per Redis second (the room asked for doubles with demand); the rest from held room.
    assert counted.calls <= 8 * (seconds + 1), (counted.calls, seconds)
    held = await counters(redis_url, owner)
    assert held["rpm"] >= 200 and held["quota"] >= spent  # with room held beside
    await gate.close()
    gates.remove(gate)
    await asyncio.sleep(0.05)
    assert await counters(redis_url, owner) == {"rpm": 200, "tpm": spent, "quota": spent}


async def test_processes_together_admit_the_limit_and_not_one_more(
        redis_url: str, gates: list[Admission]) -> None:
    owner = limit(requests_per_minute=300, max_concurrent=10_000)
    first, second = (gate_for(owner, redis_url, gates, processes=2) for _ in range(2))
    tenant = Tenant(owner.organization_id, "inst")
    admitted: list[Ticket] = []
    refusals: list[GatewayError] = []
    open_gates = [first, second]
    while open_gates:
        for gate in list(open_gates):
            try:
                ticket = await gate.admit(tenant, "m", {}, 40, False)
            except GatewayError as exc:
                refusals.append(exc)
                open_gates.remove(gate)
            else:
                assert ticket is not None
                admitted.append(ticket)
    assert len(admitted) == 300
    assert any(ticket.holds and ticket.holds[0] is not None for ticket in admitted)
    assert all(exc.status == 429 for exc in refusals)
    for gate in (first, second):  # and neither admits another, held room or not
        with pytest.raises(GatewayError):
            await gate.admit(tenant, "m", {}, 40, False)
    for ticket, gate in zip(admitted, [first, second] * 300, strict=False):
        gate.settle(ticket, record(owner, 1, 0))
    await asyncio.sleep(0.05)
    assert (await counters(redis_url, owner))["rpm"] == 300


async def test_places_held_are_all_given_back(redis_url: str, gates: list[Admission]) -> None:
    owner = limit(max_concurrent=40)
    first, second = (gate_for(owner, redis_url, gates, processes=2) for _ in range(2))
    tenant = Tenant(owner.organization_id, "inst")
    tickets: list[tuple[Admission, Ticket]] = []
    for i in range(40):
        gate = (first, second)[i % 2]
        ticket = await gate.admit(tenant, "m", {}, 40, False)
        assert ticket is not None
        tickets.append((gate, ticket))
    for gate in (first, second):  # forty under way: no place for one more, anywhere
        with pytest.raises(GatewayError) as refused:
            await gate.admit(tenant, "m", {}, 40, False)
        assert refused.value.status == 429
    gate, ticket = tickets.pop()
    gate.settle(ticket, record(owner, 1, 0))
    await asyncio.sleep(1.2)  # the second of the held places has ended: given back
    assert (await counters(redis_url, owner))["cc"] == 39
    assert await gate.admit(tenant, "m", {}, 40, False) is not None
    for gate, ticket in tickets:
        gate.settle(ticket, record(owner, 1, 0))
    for gate in (first, second):
        await gate.close()
    gates.clear()
    assert (await counters(redis_url, owner)).get("cc", 0) == 1  # the one still under way


async def test_room_left_when_its_second_ends_goes_back(redis_url: str,
                                                          gates: list[Admission]) -> None:
    owner = limit(tokens_per_minute=1_000_000, tokens_per_day=10**9)
    gate = gate_for(owner, redis_url, gates)
    tenant = Tenant(owner.organization_id, "inst")
    await early_in_a_second()
    ticket = await gate.admit(tenant, "m", {"max_tokens": 100}, 40, True)
    assert ticket is not None and ticket.holds is not None and None not in ticket.holds
    assert (await counters(redis_url, owner))["tpm"] > 111  # the request and the room beside
    await asyncio.sleep(1.1)
    assert await counters(redis_url, owner) == {"tpm": 111, "quota": 111}  # reserved, no more
    gate.settle(ticket, record(owner, 11, 5))  # after its room went back: settled in Redis
    await asyncio.sleep(0.05)
    assert await counters(redis_url, owner) == {"tpm": 16, "quota": 16}


async def test_without_leases_every_request_goes_to_redis(redis_url: str,
                                                           gates: list[Admission]) -> None:
    owner = limit(requests_per_minute=1000)
    gate = gate_for(owner, redis_url, gates, leases=False)
    counted = Counting(gate)
    tenant = Tenant(owner.organization_id, "inst")
    for _ in range(20):
        ticket = await gate.admit(tenant, "m", {}, 40, False)
        assert ticket is not None and ticket.holds is None
    assert counted.calls == 20
    assert (await counters(redis_url, owner))["rpm"] == 20


def test_held_room_is_given_back_under_uvloop(redis_url: str) -> None:
    """The gateway runs on uvloop, whose timers differ from asyncio's in small ways: settling
    after the room's second ended gives back at once there too."""
    import uvloop

    async def run() -> None:
        made: list[Admission] = []
        owner = limit(tokens_per_minute=1_000_000, max_concurrent=1000)
        gate = gate_for(owner, redis_url, made)
        tenant = Tenant(owner.organization_id, "inst")
        try:
            await early_in_a_second()
            tickets = [await gate.admit(tenant, "m", {"max_tokens": 100}, 40, True)
                       for _ in range(2)]
            assert all(ticket is not None and ticket.holds for ticket in tickets)
            await asyncio.sleep(1.1)
            for ticket in tickets:  # the second while the first one's giving back is due
                assert ticket is not None
                gate.settle(ticket, record(owner, 11, 5))
            await asyncio.sleep(0.05)
            assert await counters(redis_url, owner) == {"tpm": 32}
        finally:
            await gate.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())


async def test_a_refusal_while_room_is_held_says_when_it_may_come_back(redis_url: str) -> None:
    """Spare room given in a second may come back when the second ends: a refusal in that
    second says so; one in the next second, once it came back, waits for the window."""
    from inference_gateway.admission.checks import checks_for
    from inference_gateway.admission.redis_counters import RedisCounters, Want

    start = 1_798_761_540_000  # on a second's edge
    owner = limit(requests_per_minute=100)
    counters_ = RedisCounters(redis_url, 1.0)
    checks = checks_for((owner,), 1, 0)
    try:
        granted = await counters_.admit(checks, "a", start, wants=[Want(40)], share=2)
        assert granted.admitted and granted.spare == [24]  # (100 - 1 - 50) / 2
        for i in range(75):  # the rest of the limit, taken by others
            assert (await counters_.admit(checks, f"b{i}", start + 10)).admitted
        refused = await counters_.admit(checks, "c", start + 20)
        assert not refused.admitted and refused.retry_ms == 1080  # the second's end, and 100
        await counters_.give([checks[0].key], f"w {start // 1000} -24 0")  # back, unused
        assert (await counters_.admit(checks, "d", start + 1500)).admitted
        for i in range(23):
            assert (await counters_.admit(checks, f"e{i}", start + 1500)).admitted
        late = await counters_.admit(checks, "f", start + 1600)
        assert not late.admitted and late.retry_ms == 60_000 - 1600 + 1000  # second 0 leaves
    finally:
        await counters_.close()


async def test_a_request_gone_during_its_admission_leaves_nothing_held(
        redis_url: str, gates: list[Admission]) -> None:
    """The client left while Redis granted its request room: the answer still comes, the
    request's part is given back and the spare room with it, at the end of its second."""
    owner = limit(requests_per_minute=10_000, tokens_per_minute=1_000_000,
                  max_concurrent=1000, tokens_per_month=10**9)
    gate = gate_for(owner, redis_url, gates)
    tenant = Tenant(owner.organization_id, "inst")
    warm = limit(requests_per_minute=10)  # opens the connection, so the script goes at once
    gate.book._by_org[warm.organization_id] = (warm,)
    await gate.admit(Tenant(warm.organization_id, "inst"), "m", {}, 40, False)
    await early_in_a_second()
    task = asyncio.create_task(gate.admit(tenant, "m", {"max_tokens": 100}, 40, True))
    await asyncio.sleep(0)  # the script is on its way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert gate.leases is not None and gate.leases.next_due() is not None  # its room is held
    await gate.close()
    gates.remove(gate)
    await asyncio.sleep(0.05)
    # Every counter back to nothing, and no place held.
    assert await counters(redis_url, owner) == {"rpm": 0, "tpm": 0, "quota": 0}


async def test_room_given_back_to_a_redis_that_lost_its_scripts(
        redis_url: str, gates: list[Admission]) -> None:
    """Redis restarted or flushed its scripts while room was held: giving it back loads the
    script again, and Redis still ends up counting what was used, no more."""
    owner = limit(tokens_per_minute=1_000_000)
    gate = gate_for(owner, redis_url, gates)
    tenant = Tenant(owner.organization_id, "inst")
    await early_in_a_second()
    ticket = await gate.admit(tenant, "m", {"max_tokens": 100}, 40, True)
    assert ticket is not None and ticket.holds == [ticket.holds[0]] and ticket.holds[0]
    gate.settle(ticket, record(owner, 11, 5))
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.script_flush()
    finally:
        await client.aclose()
    for _ in range(300):
        if (await counters(redis_url, owner))["tpm"] == 16:
            break
        await asyncio.sleep(0.01)
    assert await counters(redis_url, owner) == {"tpm": 16}


async def test_requests_at_once_wait_for_the_room_one_of_them_asked_for(
        redis_url: str, gates: list[Admission]) -> None:
    """Thirty-two requests arrive together: one asks Redis for room, the others wait for its
    answer and are admitted from it, rather than each making a round trip of its own."""
    owner = limit(requests_per_minute=1_000_000, tokens_per_minute=10**9, max_concurrent=10_000)
    gate = gate_for(owner, redis_url, gates)
    counted = Counting(gate)
    tenant = Tenant(owner.organization_id, "inst")
    await gate.admit(tenant, "m", {"max_tokens": 10}, 40, True)  # demand known: 1 a second
    counted.calls = 0
    await asyncio.sleep(1.05)  # that room went back with its second
    tickets = await asyncio.gather(*(gate.admit(tenant, "m", {"max_tokens": 10}, 40, True)
                                     for _ in range(32)))
    assert all(ticket is not None for ticket in tickets)
    assert counted.calls < 8, counted.calls


async def test_what_held_room_admitted_still_counts_when_redis_goes_away(
        redis_url: str, gates: list[Admission]) -> None:
    """Requests admitted from held room reach the process's own counters, so the fallback
    that takes over when Redis goes away counts them in its minute."""
    owner = limit(requests_per_minute=40)
    gate = gate_for(owner, redis_url, gates)
    tenant = Tenant(owner.organization_id, "inst")
    admitted = [await gate.admit(tenant, "m", {}, 40, False) for _ in range(10)]
    assert any(ticket is not None and ticket.here for ticket in admitted)
    assert await admitted_once_redis_is_gone(gate, tenant) == 30


async def test_a_request_gone_before_its_admission_left_holds_nobody_up(
        redis_url: str, gates: list[Admission]) -> None:
    """The first request leaves while the connection to Redis is still being opened: the room
    it was to ask for is not waited for by the next one."""
    owner = limit(requests_per_minute=100_000, max_concurrent=1000)
    gate = gate_for(owner, redis_url, gates)
    tenant = Tenant(owner.organization_id, "inst")
    task = asyncio.create_task(gate.admit(tenant, "m", {}, 40, False))
    await asyncio.sleep(0)  # it asked for room; nothing has been written yet
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    started = time.monotonic()
    assert await gate.admit(tenant, "m", {}, 40, False) is not None
    assert time.monotonic() - started < 0.5


async def test_places_are_never_named_again_once_given_back(
        redis_url: str, gates: list[Admission]) -> None:
    """A give-back made again later (a Redis that lost its scripts) must not take places a
    grant made meanwhile: places given back leave their name behind, and the next grant uses
    a new one. And nothing spins while places given up are still in use."""
    owner = limit(max_concurrent=1000)
    gate = gate_for(owner, redis_url, gates)
    assert gate.leases is not None
    tenant = Tenant(owner.organization_id, "inst")
    await early_in_a_second()
    first = await gate.admit(tenant, "m", {}, 40, False)
    assert first is not None and first.holds is not None
    (places,) = first.holds
    assert places is not None and not isinstance(places, Hold)
    await asyncio.sleep(1.05)  # its second ended: the spare places went back
    assert gate.leases._places[places.key].name != places.name
    assert places.detached and places.busy == 1
    assert gate.leases.next_due() != 0.0  # given up, in use: nothing to do until it ends
    second = await gate.admit(tenant, "m", {}, 40, False)
    assert second is not None and second.holds is not None
    assert second.holds[0] is not places  # a grant of its own, under the new name
    assert (await counters(redis_url, owner))["cc"] >= 2
    gate.settle(first, record(owner, 1, 0))
    gate.settle(second, record(owner, 1, 0))
    await gate.close()
    gates.remove(gate)
    assert "cc" not in await counters(redis_url, owner)  # every name given back


async def test_the_fallback_counts_requests_under_way_on_held_places(
        redis_url: str, gates: list[Admission]) -> None:
    owner = limit(max_concurrent=20)
    gate = gate_for(owner, redis_url, gates)
    tenant = Tenant(owner.organization_id, "inst")
    await early_in_a_second()
    running = [await gate.admit(tenant, "m", {}, 40, False) for _ in range(8)]
    assert any(ticket is not None and ticket.here for ticket in running)
    assert await admitted_once_redis_is_gone(gate, tenant) == 12  # twenty, eight under way
    for ticket in running:
        assert ticket is not None
        gate.settle(ticket, record(owner, 1, 0))
    assert await gate.admit(tenant, "m", {}, 40, False) is not None  # they are over


def test_a_quota_is_held_a_thousandth_at_most() -> None:
    """Room of a quota granted with an answer that never came stays counted to the period's
    end: a process asks for little of it."""
    from inference_gateway.admission.checks import checks_for
    from inference_gateway.admission.leases import Leases

    owner = limit(tokens_per_month=1_000_000)
    (check,) = checks_for((owner,), 100, 900)
    leases = Leases("x-", 1)
    leases._demand[check.key] = (50_000, time.monotonic())  # a busy last second
    (want,) = leases.wants([check], time.monotonic())
    assert want.room == 1000


def test_a_request_that_does_not_fit_whole_moves_no_counter() -> None:
    """Held room is taken counter by counter; one without enough gives back what the ones
    before it took, so that nothing is admitted, or counted, by halves."""
    from inference_gateway.admission.checks import checks_for
    from inference_gateway.admission.held import Places
    from inference_gateway.admission.leases import Leases
    from inference_gateway.admission.plan import Plan

    owner = limit(requests_per_minute=1000, tokens_per_minute=10**6, max_concurrent=10,
                  tokens_per_month=10**9)
    plan = Plan(checks_for((owner,), 10, 10))
    rpm, tpm, cc, month = plan.checks
    leases = Leases("x-", 1)
    until = time.monotonic() + 60
    holds = {check.key: Hold(check.key, check.kind, 7, until) for check in (rpm, tpm, month)}
    holds[rpm.key].room, holds[tpm.key].room, holds[month.key].room = 5, 100, 19  # 20 asked
    leases._holds.update(holds)
    places = leases._places[cc.key] = Places(cc.key, "x-p0")
    places.held, places.until = 3, until

    def counters() -> list[tuple[int, ...]]:
        return [*((h.room, h.spent, h.here, h.used) for h in holds.values()),
                (places.busy, places.here)]

    before = counters()
    assert leases.take(plan, time.monotonic()) is None
    assert counters() == before
    holds[month.key].room = 20
    taken = leases.take(plan, time.monotonic())
    assert taken is not None and taken[1] == 7
    assert taken[0] == [holds[rpm.key], holds[tpm.key], places, holds[month.key]]
    assert counters() == [(4, 1, 1, 1), (80, 20, 20, 20), (0, 20, 20, 20), (1, 1)]


async def test_thousands_of_places_are_held_and_given_back(redis_url: str) -> None:
    """A busy process may hold many thousands of places of a concurrency limit: granted and
    given back in pieces, since a Redis script can pass only 8000 values to one command."""
    from inference_gateway.admission.checks import checks_for
    from inference_gateway.admission.redis_counters import RedisCounters, Want

    owner = limit(max_concurrent=1_000_000)
    counters_ = RedisCounters(redis_url, 1.0)
    (check,) = checks_for((owner,), 1, 0)
    try:
        granted = await counters_.admit([check], "a", wants=[Want(20_000, 0, "p")], share=2)
        assert granted.admitted and granted.spare == [20_000]
        assert (await counters(redis_url, owner))["cc"] == 20_001  # p#0 ... p#20000
        await counters_.give([check.key], "c p 1 20001")  # all but the request's own
        assert (await counters(redis_url, owner))["cc"] == 1
        await counters_.give([check.key], "c p 0 1")
        assert await counters(redis_url, owner) == {}
    finally:
        await counters_.close()
