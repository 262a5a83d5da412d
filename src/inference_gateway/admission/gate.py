"""Whether a request may start: reserve against every limit that applies, settle afterwards.

Admission is one atomic step across all of a request's counters (Redis, shared by every worker
and every gateway); so is settling, which replaces the reservation with the tokens vLLM
reported. A caller without limits costs nothing: no counter is touched. A stream is admitted
once, at its start, and never cut by a limit.

When Redis cannot be reached, ``RATE_LIMIT_FALLBACK`` decides: ``local`` (the default) keeps
serving with counters in each process holding its share of every limit, ``open`` admits
everything, ``closed`` refuses with a 503. Redis is tried again every few seconds.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import os
import time
from collections.abc import Coroutine
from typing import Any, NamedTuple

import redis.exceptions

from inference_gateway.admission.checks import Check, checks_for
from inference_gateway.admission.limits import LimitBook
from inference_gateway.admission.local_counters import LocalCounters
from inference_gateway.admission.redis_counters import Decision, RedisCounters
from inference_gateway.errors import GatewayError
from inference_gateway.metering.record import UsageRecord
from inference_gateway.settings import Settings
from inference_gateway.tenants.tenant import Tenant

log = logging.getLogger(__name__)

RETRY_REDIS_SEC = 2.0
_TOKEN_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


class Ticket(NamedTuple):
    """A request's reservation, settled once its usage is known."""

    id: str
    checks: list[Check]
    taken: list[int]  # what it reserved, per check
    at_ms: int  # when it was admitted: the second its windows hold it in
    local: bool  # reserved in this process's counters (Redis was away)
    headers: dict[str, str]


def duration(ms: float) -> str:
    """A time as OpenAI's rate-limit headers write it: ``120ms``, ``1s``, ``6m0s``."""
    if ms < 1000:
        return f"{max(int(ms), 0)}ms"
    seconds = math.ceil(ms / 1000)
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def estimate(fields: dict[str, object], body_bytes: int, generates: bool,
             cap: int) -> tuple[int, int, bool]:
    """The tokens a request may use: its prompt, guessed from its size, and what it may
    generate (its own limit, at most ``cap``, per choice); and whether it named that limit."""
    prompt = body_bytes // 4 + 1
    if not generates:
        return prompt, 0, True
    asked = next((v for name in _TOKEN_LIMITS
                  if isinstance(v := fields.get(name), int) and not isinstance(v, bool)), None)
    choices = fields.get("n")
    n = choices if isinstance(choices, int) and not isinstance(choices, bool) and choices > 0 \
        else 1
    named = asked is not None and asked > 0
    return prompt, min(asked if asked is not None and named else cap, cap) * n, named


def _refusal(check: Check, decision: Decision) -> GatewayError:
    retry_ms = max(decision.retry_ms, 1)
    headers = {"Retry-After": str(math.ceil(retry_ms / 1000)), "retry-after-ms": str(retry_ms)}
    used = decision.used[0] if decision.used else 0
    who = check.owner.describe()
    if check.kind == "quota":
        period = "day" if ":q:d" in check.key else "month"
        return GatewayError(
            429, f"You exceeded the token quota of {who} for this {period} ({check.limit} "
            f"tokens; {used} used). It starts again in {duration(retry_ms)}.",
            code="insufficient_quota", error_type="insufficient_quota", headers=headers)
    unit = {"window": "per min", "concurrent": "at once"}[check.kind]
    if check.floor > check.limit:
        message = (f"Request too large for {who}: {check.measure} {unit} limit {check.limit}, "
                   f"requested {check.floor}. Ask for fewer tokens (max_tokens).")
    else:
        message = (f"Rate limit reached for {who} on {check.measure} {unit}: limit "
                   f"{check.limit}, used {used}, requested {check.floor}. Please try again in "
                   f"{duration(retry_ms)}.")
    return GatewayError(429, message, code="rate_limit_exceeded", error_type=check.measure,
                        headers=headers)


def _headers(checks: list[Check], decision: Decision) -> dict[str, str]:
    """OpenAI's rate-limit headers from the tightest per-minute limit of each measure."""
    headers: dict[str, str] = {}
    for measure in ("requests", "tokens"):
        tightest: tuple[int, int, int] | None = None  # remaining, limit, reset
        for check, used, reset in zip(checks, decision.used, decision.resets_ms, strict=True):
            if check.kind == "window" and check.measure == measure:
                remaining = max(check.limit - used, 0)
                if tightest is None or remaining < tightest[0]:
                    tightest = (remaining, check.limit, reset)
        if tightest is not None:
            headers[f"x-ratelimit-limit-{measure}"] = str(tightest[1])
            headers[f"x-ratelimit-remaining-{measure}"] = str(tightest[0])
            headers[f"x-ratelimit-reset-{measure}"] = duration(tightest[2])
    return headers


class Admission:
    def __init__(self, settings: Settings, book: LimitBook) -> None:
        self.book = book
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
        self.refused = 0  # requests refused by a limit, for the metrics

    async def admit(self, tenant: Tenant, model: str, fields: dict[str, object],
                    body_bytes: int, generates: bool) -> Ticket | None:
        limits = self.book.applying(tenant, model)
        if not limits:
            return None
        prompt, completion, named = estimate(fields, body_bytes, generates, self.cap)
        checks = checks_for(limits, prompt, completion, named=named)
        if not checks:
            return None
        ticket = f"{self._tickets_prefix}{next(self._tickets)}"
        try:
            decision, local = await self._decide(checks, ticket)
        except asyncio.CancelledError:  # the client left; Redis may have admitted it all the same
            if self.redis is not None:  # its places at least (the answer gives back the rest)
                self._in_background(self._release(checks, ticket))
            raise
        if decision is None:
            return None
        if not decision.admitted:
            self.refused += 1
            raise _refusal(checks[decision.failing], decision)
        return Ticket(ticket, checks, decision.taken, decision.at_ms, local,
                      _headers(checks, decision))

    async def _decide(self, checks: list[Check], ticket: str) -> tuple[Decision | None, bool]:
        if self.redis is not None and time.monotonic() >= self._redis_back_at:
            try:
                decision = await self.redis.admit(
                    checks, ticket, orphan=functools.partial(self._orphaned, checks, ticket))
            except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
                self._redis_lost(exc)
            else:
                if self._redis_back_at:
                    log.warning("rate limits: Redis answers again; limits are shared again")
                    self._redis_back_at = 0.0
                if decision.admitted:
                    self.local.remember(checks, ticket, decision.taken, decision.used,
                                        decision.at_ms)
                return decision, False
        if self.redis is not None and self.fallback == "open":
            return None, False
        if self.redis is not None and self.fallback == "closed":
            raise GatewayError(503, "rate limits cannot be checked right now; retry later",
                               code="rate_limiter_unavailable",
                               headers={"Retry-After": str(int(RETRY_REDIS_SEC))})
        return self.local.admit(checks, ticket), True

    def _redis_lost(self, exc: BaseException) -> None:
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
        actual = [
            1 if check.measure == "requests"
            else check.owner.weighted(record.prompt_tokens, record.completion_tokens)
            for check in ticket.checks
        ]
        self.local.settle(ticket.checks, ticket.id, ticket.at_ms, ticket.taken, actual)
        if ticket.local or self.redis is None:
            return None
        sent = self.redis.send_settle(ticket.checks, ticket.id, ticket.at_ms, ticket.taken,
                                      actual)
        if sent is not None:  # its answer is looked at when it comes: no task per request
            self._sent.add(sent)
            sent.add_done_callback(functools.partial(self._settled, ticket, actual))
            return None
        return self._in_background(self._settle(ticket, actual))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    def _orphaned(self, checks: list[Check], ticket: str, decision: Decision) -> None:
        """Redis's answer to an admission whose request went away before it came: what it
        reserved is given back, all of it, since the request never ran."""
        if decision.admitted:
            self._in_background(self._give_back(checks, ticket, decision))

    async def _give_back(self, checks: list[Check], ticket: str, decision: Decision) -> None:
        assert self.redis is not None
        try:
            await self.redis.settle(checks, ticket, decision.at_ms, decision.taken,
                                    [0] * len(checks))
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            log.warning("rate limits: could not give back a reservation (%s)", exc)

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

    def _settled(self, ticket: Ticket, actual: list[int], sent: asyncio.Future[Any]) -> None:
        """The answer to a settlement written at once (see ``settle``); a Redis that lost the
        script gets it again. (The connection fails it, should Redis not answer in time.)"""
        self._sent.discard(sent)
        if sent.cancelled() or (exc := sent.exception()) is None:
            return
        if isinstance(exc, redis.exceptions.NoScriptError):
            self._in_background(self._settle(ticket, actual))
        else:
            log.warning("rate limits: could not settle a reservation (%s)", exc)

    async def close(self) -> None:
        while self._settling or self._sent:  # an answer may still start a task
            await asyncio.gather(*self._settling, *self._sent, return_exceptions=True)
            await asyncio.sleep(0)  # the answers' callbacks run
        if self.redis is not None:
            await self.redis.close()
