"""What a limit tells the client: OpenAI's 429 bodies and its rate-limit headers.

The OpenAI SDKs retry a 429 after ``retry-after-ms`` (or ``Retry-After``) and show the
``x-ratelimit-*`` headers; the wording and codes are OpenAI's, so that clients written for it
understand ours.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from multidict import istr

from inference_gateway.admission.checks import Check
from inference_gateway.admission.redis_counters import Decision
from inference_gateway.errors import GatewayError


def duration(ms: float) -> str:
    """A time as OpenAI's rate-limit headers write it: ``120ms``, ``1s``, ``6m0s``."""
    if ms < 1000:
        return f"{max(int(ms), 0)}ms"
    return _seconds(math.ceil(ms / 1000))


@functools.lru_cache(maxsize=4096)  # by whole seconds: requests mostly reset within a minute
def _seconds(seconds: int) -> str:
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def refusal(check: Check, decision: Decision) -> GatewayError:
    """The 429 of the check that refused, as OpenAI words it, with when to come back."""
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


# Per measure, its three header names and the per-minute windows that may give them:
# (index of the check, limit, the limit as written).
HeaderPlan = tuple[tuple[tuple[str, str, str], tuple[tuple[int, int, str], ...]], ...]


def header_plan(checks: list[Check]) -> HeaderPlan:
    """Which of a request's checks give its rate-limit headers: worked out once per plan."""
    plan = []
    for measure, names in _HEADER_NAMES.items():
        windows = tuple((i, check.limit, str(check.limit)) for i, check in enumerate(checks)
                        if check.kind == "window" and check.measure == measure)
        if windows:
            plan.append((names, windows))
    return tuple(plan)


class Room(Protocol):
    """What a counter holds with a request counted, and when it has room again."""

    @property
    def used(self) -> int: ...

    @property
    def reset_at(self) -> float: ...  # monotonic seconds


class Known(NamedTuple):
    """A counter as Redis's answer described it."""

    used: int
    reset_at: float


def rate_limit_headers(plan: HeaderPlan, rooms: Sequence[Room], now: float) -> dict[str, str]:
    """OpenAI's rate-limit headers from the tightest per-minute limit of each measure."""
    headers: dict[str, str] = {}
    for (limit_name, remaining_name, reset_name), windows in plan:
        i, limit, written = windows[0]
        used = rooms[i].used
        remaining = limit - used if used < limit else 0
        if len(windows) > 1:  # the tightest of several
            for j, other, other_written in windows[1:]:
                used = rooms[j].used
                left = other - used if used < other else 0
                if left < remaining:
                    i, remaining, written = j, left, other_written
        headers[limit_name] = written
        headers[remaining_name] = str(remaining)
        headers[reset_name] = duration(round((rooms[i].reset_at - now) * 1000))
    return headers


# As ``istr``, the names an HTTP server's header map takes without working out their case.
_HEADER_NAMES = {
    measure: (istr(f"x-ratelimit-limit-{measure}"), istr(f"x-ratelimit-remaining-{measure}"),
              istr(f"x-ratelimit-reset-{measure}"))
    for measure in ("requests", "tokens")}
