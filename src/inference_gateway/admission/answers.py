"""What a limit tells the client: OpenAI's 429 bodies and its rate-limit headers.

The OpenAI SDKs retry a 429 after ``retry-after-ms`` (or ``Retry-After``) and show the
``x-ratelimit-*`` headers; the wording and codes are OpenAI's, so that clients written for it
understand ours.
"""

from __future__ import annotations

import math

from inference_gateway.admission.checks import Check
from inference_gateway.admission.redis_counters import Decision
from inference_gateway.errors import GatewayError


def duration(ms: float) -> str:
    """A time as OpenAI's rate-limit headers write it: ``120ms``, ``1s``, ``6m0s``."""
    if ms < 1000:
        return f"{max(int(ms), 0)}ms"
    seconds = math.ceil(ms / 1000)
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


def rate_limit_headers(checks: list[Check], decision: Decision) -> dict[str, str]:
    """OpenAI's rate-limit headers from the tightest per-minute limit of each measure."""
    tightest: dict[str, tuple[int, int, int]] = {}  # measure → remaining, limit, reset
    for (kind, measure, _, limit, *_), used, reset in zip(checks, decision.used,
                                                          decision.resets_ms, strict=True):
        if kind == "window":
            remaining = limit - used if used < limit else 0
            found = tightest.get(measure)
            if found is None or remaining < found[0]:
                tightest[measure] = (remaining, limit, reset)
    found_headers: dict[str, str] = {}
    for name, (remaining, limit, reset) in tightest.items():
        limit_name, remaining_name, reset_name = _HEADER_NAMES[name]
        found_headers[limit_name] = str(limit)
        found_headers[remaining_name] = str(remaining)
        found_headers[reset_name] = duration(reset)
    return found_headers


_HEADER_NAMES = {measure: (f"x-ratelimit-limit-{measure}", f"x-ratelimit-remaining-{measure}",
                           f"x-ratelimit-reset-{measure}") for measure in ("requests", "tokens")}
