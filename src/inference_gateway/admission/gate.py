"""Whether a request may start: reserve against every limit that applies, settle afterwards.

Admission is one atomic step across all of a request's counters (Redis, shared by every worker
and every gateway); so is settling, which replaces the reservation with the tokens vLLM
reported. A caller without limits costs nothing: no counter is touched. A stream is admitted
once, at its start, and never cut by a limit. While a limit has plenty of room, Redis also
gives each process some spare room, and most requests are admitted and settled against it
without a round trip (``leases``, ``RATE_LIMIT_LEASES``).

When Redis cannot be reached, ``RATE_LIMIT_FALLBACK`` decides: ``local`` (the default) keeps
serving with counters in each process holding its share of every limit, ``open`` admits
everything, ``closed`` refuses with a 503. Redis is tried again every few seconds.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NamedTuple

import redis.exceptions

from inference_gateway.admission.answers import Known, rate_limit_headers, refusal
from inference_gateway.admission.checks import Check, estimate
from inference_gateway.admission.held import Give, Hold, Places
from inference_gateway.admission.leases import Leases
from inference_gateway.admission.limits import LimitBook
from inference_gateway.admission.local_counters import LocalCounters
from inference_gateway.admission.plan import Plan, Plans, used_by
from inference_gateway.admission.redis_counters import Decision, RedisCounters, Want
from inference_gateway.errors import GatewayError
from inference_gateway.metering.record import UsageRecord
from inference_gateway.settings import Settings
from inference_gateway.tenants.tenant import Tenant

log = logging.getLogger(__name__)

RETRY_REDIS_SEC = 2.0


class Ticket(NamedTuple):
    """A request's reservation, settled once its usage is known."""

    id: str
    checks: list[Check]
    taken: list[int]  # what it reserved, per check
    at_ms: int  # when it was admitted: the second its windows hold it in
    local: bool  # reserved in this process's counters (Redis was away)
    headers: dict[str, str]
    holds: Sequence[Hold | Places | None] | None = None  # per check, the held room it came from
    plan: Plan | None = None  # of a request admitted from held room alone

    @property
    def here(self) -> bool:
        """Admitted from held room alone, without asking Redis."""
        return self.plan is not None


class Admission:
    def __init__(self, settings: Settings, book: LimitBook) -> None:
        self.book = book
        self.timeout = settings.redis_timeout_sec
        self.redis = (RedisCounters(settings.redis_url, settings.redis_timeout_sec)
                      if settings.redis_url else None)
        processes = settings.webserver_workers * settings.gateway_instances
        self.local = LocalCounters(share=1.0 / processes)
        self.fallback = settings.rate_limit_fallback
        self.cap = settings.rate_limit_reserved_tokens
        self._redis_back_at = 0.0
        self._settling: set[asyncio.Task[None]] = set()
        self._sent: set[asyncio.Future[Any]] = set()  # settlements written, answers to come
        # Tickets name places held at once in Redis: unique across processes and gateways.
        self._tickets_prefix = os.urandom(8).hex() + "-"
        self._tickets = itertools.count()
        self.leases = (Leases(self._tickets_prefix, processes)
                       if self.redis is not None and settings.rate_limit_leases else None)
        self._giving: asyncio.TimerHandle | None = None  # when held room is given back next
        self._giving_at = 0.0
        self.refused = 0  # requests refused by a limit, for the metrics
        self._plans = Plans(book)

    async def admit(self, tenant: Tenant, model: str, fields: dict[str, object],
                    body_bytes: int, generates: bool) -> Ticket | None:
        if not self.book.limited(tenant.organization_id):
            return None
        prompt, completion, named = estimate(fields, body_bytes, generates, self.cap)
        plan = self._plans.get(tenant, model, prompt, completion, named)
        checks = plan.checks
        if not checks:
            return None
        if self.leases is not None and not self._redis_back_at:  # from room held, if it can
            for _ in range(4):
                now = time.monotonic()
                held = self.leases.take(plan, now)
                if held is not None:  # its ticket is never named in Redis
                    found, second = held
                    return Ticket("", checks, plan.costs, second * 1000, False,
                                  rate_limit_headers(plan.headers, found, now), found, plan)
                pending = self.leases.pending(checks, now)  # room asked for by another
                if pending is None:
                    break
                await asyncio.wait((pending,), timeout=self.timeout)  # never cancels it
        ticket = f"{self._tickets_prefix}{next(self._tickets)}"
        try:
            decision, local, holds = await self._decide(checks, ticket)
            if decision is not None and not decision.admitted and self.leases is not None \
                    and self.leases.holding(checks, time.monotonic()):
                # Room this process holds may be what is missing: given back, and asked again.
                self._give(self.leases.release(checks, time.monotonic()))
                self._count()
                decision, local, holds = await self._decide(checks, ticket)
        except asyncio.CancelledError:  # the client left; Redis may have admitted it all the same
            if self.redis is not None:  # its places at least (the answer gives back the rest)
                self._in_background(self._release(checks, ticket))
            raise
        if decision is None:
            return None
        if not decision.admitted:
            self.refused += 1
            raise refusal(checks[decision.failing], decision)
        now = time.monotonic()
        rooms = [Known(used, now + reset / 1000)
                 for used, reset in zip(decision.used, decision.resets_ms, strict=True)]
        return Ticket(ticket, checks, decision.taken, decision.at_ms, local,
                      rate_limit_headers(plan.headers, rooms, now), holds)

    async def _decide(self, checks: list[Check], ticket: str
                      ) -> tuple[Decision | None, bool, list[Hold | Places | None] | None]:
        if self.redis is not None and time.monotonic() >= self._redis_back_at:
            leases, asked_at = self.leases, time.monotonic()
            wants = leases.wants(checks, asked_at) if leases is not None else None
            try:
                decision = await self.redis.admit(
                    checks, ticket, wants=wants, share=leases.share if leases else 0,
                    orphan=functools.partial(self._orphaned, checks, ticket, wants, asked_at))
            except asyncio.CancelledError:  # its answer may come (``_orphaned``), or never
                if leases is not None and wants is not None:
                    leases.failed(checks, wants)
                raise
            except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
                if leases is not None and wants is not None:
                    leases.failed(checks, wants)
                self._redis_lost(exc)
            else:
                if self._redis_back_at:
                    log.warning("rate limits: Redis answers again; limits are shared again")
                    self._redis_back_at = 0.0
                holds = None
                if decision.admitted:
                    self.local.remember(checks, ticket, decision.taken, decision.used,
                                        decision.at_ms)
                    if leases is not None and wants is not None:
                        holds = leases.granted(checks, wants, decision, asked_at,
                                               time.monotonic())
                        self._give_when_due()
                        self._count()
                elif leases is not None and wants is not None:
                    leases.refused(checks, wants)
                return decision, False, holds
        if self.redis is not None and self.fallback == "open":
            return None, False, None
        if self.redis is not None and self.fallback == "closed":
            raise GatewayError(503, "rate limits cannot be checked right now; retry later",
                               code="rate_limiter_unavailable",
                               headers={"Retry-After": str(int(RETRY_REDIS_SEC))})
        return self.local.admit(checks, ticket), True, None

    def _redis_lost(self, exc: BaseException) -> None:
        if self.leases is not None and not self._redis_back_at:  # the fallback goes on from
            self.local.hold_places(self.leases.report())        # what was admitted here
            self._count()
        if not self._redis_back_at:
            share = {"local": "each process now holds its share of every limit",
                     "open": "requests are admitted without limits",
                     "closed": "requests are refused"}[self.fallback]
            log.warning("rate limits: Redis cannot be reached (%s); %s until it answers",
                        exc, share)
        self._redis_back_at = time.monotonic() + RETRY_REDIS_SEC

    def settle(self, ticket: Ticket, record: UsageRecord) -> asyncio.Task[None] | None:
        """Replace the reservation with what was used, in Redis before the answer's last bytes
        go out, so that the client's next request finds it settled. Written to Redis at once
        when a connection is open (its answer is awaited in the background); otherwise the
        task is returned for the last bytes to wait for (they do, see ``relay``). Never for
        the request path to fail on."""
        if ticket.plan is not None and self.leases is not None and ticket.holds is not None \
                and not self.local.held_places:  # the most common: all from room held
            if self.leases.settle_here(ticket.holds, ticket.plan, record.prompt_tokens,
                                       record.completion_tokens, time.monotonic()):
                self._give_soon()
                self._count()
            return None
        actual = used_by(ticket.checks, record.prompt_tokens, record.completion_tokens)
        if not ticket.here:  # what was admitted here reaches them with its room (``_count``)
            self.local.settle(ticket.checks, ticket.id, ticket.at_ms, ticket.taken, actual)
        elif self.local.held_places:  # Redis went away while it was under way
            for check in ticket.checks:
                if check.kind == "concurrent":
                    self.local.free_place(check.key)
        return self._settle_in_redis(ticket, actual)

    def _settle_in_redis(self, ticket: Ticket, actual: list[int]) -> asyncio.Task[None] | None:
        if ticket.local or self.redis is None:
            return None
        if ticket.holds is not None and self.leases is not None:
            # What came from held room is settled against it; the rest in Redis, at once.
            if self.leases.settle(ticket.holds, ticket.checks, ticket.taken, actual,
                                  time.monotonic(), ticket.here):
                self._give_soon()
                self._count()
            if ticket.here:  # all of it from held room
                return None
            rest = [i for i, held in enumerate(ticket.holds) if held is None]
            if not rest:
                return None
            if len(rest) < len(ticket.checks):
                ticket = ticket._replace(checks=[ticket.checks[i] for i in rest],
                                         taken=[ticket.taken[i] for i in rest], holds=None)
                actual = [actual[i] for i in rest]
        sent = self.redis.send_settle(ticket.checks, ticket.id, ticket.at_ms, ticket.taken,
                                      actual)
        if sent is not None:  # its answer is looked at when it comes: no task per request
            self._watch(sent, functools.partial(self._settle, ticket, actual),
                        "settle a reservation")
            return None
        return self._in_background(self._settle(ticket, actual))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    def _orphaned(self, checks: list[Check], ticket: str, wants: list[Want] | None,
                  asked_at: float, decision: Decision) -> None:
        """Redis's answer to an admission whose request went away before it came: what it
        reserved is given back, all of it, since the request never ran (and spare room it
        brought is held as any other)."""
        holds = None
        if self.leases is not None and wants is not None:
            if not decision.admitted:
                self.leases.refused(checks, wants)
                return
            holds = self.leases.granted(checks, wants, decision, asked_at, time.monotonic())
            self._give_when_due()
            self._count()
        if decision.admitted:
            self._settle_in_redis(Ticket(ticket, checks, decision.taken, decision.at_ms, False,
                                         {}, holds), [0] * len(checks))

    async def _release(self, checks: list[Check], ticket: str) -> None:
        """Free the places held at once by a request that never ran, by its ticket: nothing
        else, as what its admission reserved is only known from its answer (``_orphaned``),
        and an admission that never reached Redis reserved nothing."""
        assert self.redis is not None
        nothing = [0] * len(checks)
        try:
            await self.redis.settle(checks, ticket, 0, nothing, nothing)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            log.warning("rate limits: could not release a reservation (%s)", exc)

    async def _settle(self, ticket: Ticket, actual: list[int]) -> None:
        assert self.redis is not None
        try:
            await self.redis.settle(ticket.checks, ticket.id, ticket.at_ms, ticket.taken,
                                    actual)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            # The reservation stands until it leaves its window (a minute); a place held
            # for concurrency until its time-out.
            log.warning("rate limits: could not settle a reservation (%s)", exc)

    def _watch(self, sent: asyncio.Future[Any],
               again: Callable[[], Coroutine[Any, Any, None]], what: str) -> None:
        """Look at the answer to a script written at once when it comes; ``close`` waits."""
        self._sent.add(sent)
        sent.add_done_callback(functools.partial(self._answered, again, what))

    def _answered(self, again: Callable[[], Coroutine[Any, Any, None]], what: str,
                  sent: asyncio.Future[Any]) -> None:
        """A Redis that lost the script gets it again (``again``). (The connection fails the
        answer, should Redis not answer in time.)"""
        self._sent.discard(sent)
        if sent.cancelled() or (exc := sent.exception()) is None:
            return
        if isinstance(exc, redis.exceptions.NoScriptError):
            self._in_background(again())
        else:
            log.warning("rate limits: could not %s (%s)", what, exc)

    # -- held room given back -------------------------------------------------------------------

    def _give_when_due(self) -> None:
        """A timer for the moment held room's second ends (one at a time)."""
        assert self.leases is not None
        due = self.leases.next_due()
        if due is not None:
            self._give_at(due + 0.001)

    def _give_soon(self) -> None:
        self._give_at(0.0)

    def _give_at(self, when: float) -> None:
        """One timer at a time, at the earliest moment asked for (``time.monotonic``, the
        leases' clock; an event loop's may differ)."""
        if self._giving is not None:
            if self._giving_at <= when:
                return
            self._giving.cancel()
        now = time.monotonic()
        self._giving_at = max(when, now)
        # Never 0: uvloop answers a call_later of 0 with a handle that has no time.
        self._giving = asyncio.get_running_loop().call_later(
            max(self._giving_at - now, 0.0005), self._give_due)

    def _give_due(self) -> None:
        assert self.leases is not None
        self._giving = None
        self._give(self.leases.due(time.monotonic()))
        self._count()
        self._give_when_due()

    def _count(self) -> None:
        """What requests admitted from held room counted, into this process's own counters:
        once per second and window, not once per request."""
        assert self.leases is not None
        counted, self.leases.counted = self.leases.counted, []
        for key, second, amount in counted:
            self.local.count(key, second, amount)

    def _give(self, gives: list[Give]) -> None:
        """Room given back to Redis, one script call per organization (their counters share
        a hash tag); written at once, its answer looked at when it comes."""
        assert self.redis is not None
        by_tag: dict[str, list[Give]] = {}
        for give in gives:
            by_tag.setdefault(give.key[:give.key.index("}") + 1], []).append(give)
        for group in by_tag.values():
            keys, spec = [give.key for give in group], " ".join(give.spec for give in group)
            sent = self.redis.send_give(keys, spec)
            if sent is None:
                self._in_background(self._give_later(keys, spec))
                continue
            self._watch(sent, functools.partial(self._give_later, keys, spec),
                        "give back held room")

    async def _give_later(self, keys: list[str], spec: str) -> None:
        assert self.redis is not None
        try:
            await self.redis.give(keys, spec)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            # It leaves the window within a minute; a quota keeps it (the period's usage in
            # Postgres does not, and the reconciler never lowers a counter).
            log.warning("rate limits: could not give back held room (%s)", exc)

    async def close(self) -> None:
        if self.leases is not None and self.redis is not None:
            if self._giving is not None:
                self._giving.cancel()
                self._giving = None
            await asyncio.sleep(0)  # settlements of the last requests
            self._give(self.leases.close())
            self._count()
        while self._settling or self._sent:  # an answer may still start a task
            await asyncio.gather(*self._settling, *self._sent, return_exceptions=True)
            await asyncio.sleep(0)  # the answers' callbacks run
        if self.redis is not None:
            await self.redis.close()
