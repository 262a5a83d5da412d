"""What admitting a request means for each limit: the counters it checks and moves.

Three kinds of check, each exact and each done for all limits of a request in one atomic step:

* ``window``: requests or tokens in the last 60 seconds, counted per second (a second counts
  while any part of it is in the window). Any 60-second span admits at most the limit, plus
  what settling added beyond a reservation; a token bucket or GCRA would admit up to twice the
  limit in a span that starts with a full bucket.
* ``concurrent``: requests under way; each holds a place until it is settled (or, should its
  gateway die, until a time-out).
* ``quota``: tokens in the current UTC day or calendar month, one counter per period.

A request reserves its estimate (prompt estimate plus the tokens it may generate); settling
replaces the reservation with what vLLM reported. A request that names its ``max_tokens`` must
fit whole; one that does not must fit with its prompt and reserves what is left, up to the cap,
so that leaving out ``max_tokens`` never makes a request too large for a small limit. A quota
admits a request while its prompt fits, whatever it names, and reserves what is left up to its
estimate: a quota refuses only when it is (nearly) spent, never for the size of one request.
"""

from __future__ import annotations

import calendar
import functools
import time
from datetime import UTC, datetime
from typing import Literal, NamedTuple

from inference_gateway.admission.limits import Limit

WINDOW_MS = 60_000
CONCURRENT_TTL_MS = 30 * 60_000  # a place held by a gateway that died is freed after this

Kind = Literal["window", "concurrent", "quota"]
Measure = Literal["requests", "tokens"]


class Check(NamedTuple):  # a tuple: made for every limited request, and cheaply
    kind: Kind
    measure: Measure
    key: str  # the counter's key; hash-tagged by organization
    limit: int
    cost: int  # what the request reserves at most
    floor: int  # what must fit for it to be admitted
    span_ms: int  # the window, the time-out, or the time left in the period
    owner: Limit


DAY_MS = 86_400_000


def estimate(fields: dict[str, object], body_bytes: int, generates: bool,
             cap: int) -> tuple[int, int, bool]:
    """The tokens a request may use: its prompt, guessed from its size, and what it may
    generate (its own limit, at most ``cap``, per choice); and whether it named that limit."""
    prompt = body_bytes // 4 + 1
    if not generates:
        return prompt, 0, True
    asked = fields.get("max_tokens")  # the first given as a number (JSON's true is not one)
    if type(asked) is not int:
        asked = fields.get("max_completion_tokens")
        if type(asked) is not int:
            asked = fields.get("max_output_tokens")
            if type(asked) is not int:
                asked = None
    choices = fields.get("n")
    n = choices if type(choices) is int and choices > 0 else 1
    named = asked is not None and asked > 0
    return prompt, min(asked if asked is not None and named else cap, cap) * n, named


@functools.lru_cache(maxsize=4)
def _periods(day: int) -> tuple[tuple[str, int], tuple[str, int]]:
    """The day's and the month's name and end, for a UTC day (days since the epoch): worked
    out once a day, not for every request."""
    start = datetime.fromtimestamp(day * 86_400, UTC)
    days = calendar.monthrange(start.year, start.month)[1]
    month = start.replace(day=1)
    return ((f"d{start:%Y%m%d}", (day + 1) * DAY_MS),
            (f"m{month:%Y%m}", int((month.timestamp() + days * 86_400) * 1000)))


def checks_for(limits: tuple[Limit, ...], prompt: int, completion: int, *, named: bool = True,
               now: datetime | None = None, now_ms: int | None = None) -> list[Check]:
    """Every counter a request with these estimates must fit in; ``named`` when the
    request set its own limit of tokens to generate."""
    if now_ms is None:
        now_ms = int((now.timestamp() if now is not None else time.time()) * 1000)
    periods = _periods(now_ms // DAY_MS)
    found: list[Check] = []
    for limit in limits:
        base = f"igw:{{{limit.organization_id}}}:{limit.subject}"
        tokens = limit.weighted(prompt, completion)
        floor = tokens if named else limit.weighted(prompt, 0)
        if limit.requests_per_minute:
            found.append(Check("window", "requests", f"{base}:rpm", limit.requests_per_minute,
                               1, 1, WINDOW_MS, limit))
        if limit.tokens_per_minute:
            found.append(Check("window", "tokens", f"{base}:tpm", limit.tokens_per_minute,
                               tokens, floor, WINDOW_MS, limit))
        if limit.max_concurrent:
            found.append(Check("concurrent", "requests", f"{base}:cc", limit.max_concurrent, 1,
                               1, CONCURRENT_TTL_MS, limit))
        for (name, end), quota in zip(periods, (limit.tokens_per_day, limit.tokens_per_month),
                                      strict=True):
            if quota:
                found.append(Check("quota", "tokens", f"{base}:q:{name}", quota, tokens,
                                   limit.weighted(prompt, 0), end - now_ms, limit))
    return found
