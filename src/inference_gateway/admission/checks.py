"""What admitting a request means for each limit: the counters it checks and moves.

Three kinds of check, each exact and each done for all limits of a request in one atomic step:

* ``window``: requests or tokens in the last 60 seconds (a sliding window log: every admitted
  request is kept with its time and cost until it is 60 s old). Any 60-second span admits at
  most the limit, plus what settling added beyond a reservation; a token bucket or GCRA would
  admit up to twice the limit in a span that starts with a full bucket.
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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from inference_gateway.admission.limits import Limit

WINDOW_MS = 60_000
CONCURRENT_TTL_MS = 30 * 60_000  # a place held by a gateway that died is freed after this

Kind = Literal["window", "concurrent", "quota"]
Measure = Literal["requests", "tokens"]


@dataclass(frozen=True, slots=True)
class Check:
    kind: Kind
    measure: Measure
    key: str  # the counter's key; hash-tagged by organization
    limit: int
    cost: int  # what the request reserves at most
    floor: int  # what must fit for it to be admitted
    span_ms: int  # the window, the time-out, or the time left in the period
    owner: Limit


def period_end_ms(now: datetime, period: Literal["day", "month"]) -> tuple[str, int]:
    """The current UTC period's name and its end, in ms since the epoch."""
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start.timestamp() + 86_400
        return f"d{start:%Y%m%d}", int(end * 1000)
    days = calendar.monthrange(now.year, now.month)[1]
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return f"m{start:%Y%m}", int((start.timestamp() + days * 86_400) * 1000)


def checks_for(limits: tuple[Limit, ...], prompt: int, completion: int, *, named: bool = True,
               now: datetime | None = None) -> list[Check]:
    """Every counter a request with these estimates must fit in; ``named`` when the
    request set its own limit of tokens to generate."""
    now = now or datetime.now(UTC)
    now_ms = int(now.timestamp() * 1000)
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
        for period, quota in (("day", limit.tokens_per_day), ("month", limit.tokens_per_month)):
            if quota:
                name, end = period_end_ms(now, period)  # type: ignore[arg-type]
                found.append(Check("quota", "tokens", f"{base}:q:{name}", quota, tokens,
                                   limit.weighted(prompt, 0), end - now_ms, limit))
    return found
