"""The checks of requests alike, worked out once a second rather than for every request.

Requests from one caller to one model with the same estimates meet the same limits, so their
checks, what each reserves, and which checks give OpenAI's rate-limit headers are the same:
a request admitted from held room then only looks up its counters and moves them.
"""

from __future__ import annotations

import time

from inference_gateway.admission.answers import HeaderPlan, header_plan
from inference_gateway.admission.checks import Check, checks_for
from inference_gateway.admission.limits import LimitBook
from inference_gateway.tenants.tenant import Tenant

MAX_PLANS = 1024  # callers and estimates in one second; past that the memo starts again


class Plan:
    """A request's checks, with what admitting it from held room needs."""

    __slots__ = ("checks", "costs", "headers", "places", "spec", "tokens")

    def __init__(self, checks: list[Check]) -> None:
        self.checks = checks
        self.costs = [check.cost for check in checks]  # shared by its tickets: never changed
        self.spec = [(check.key, check.cost, check.kind == "concurrent") for check in checks]
        # What settling from held room moves: places, and tokens (a request costs what it
        # reserved of every other check).
        self.places = [i for i, check in enumerate(checks) if check.kind == "concurrent"]
        self.tokens = [(i, check.owner) for i, check in enumerate(checks)
                       if check.measure == "tokens"]
        self.headers: HeaderPlan = header_plan(checks)


class Plans:
    """Plans by caller, model and estimates, for the current second (a quota's time left is
    then from the second's start): one lookup for a request from a caller seen before."""

    def __init__(self, book: LimitBook) -> None:
        self.book = book
        self._plans: dict[tuple[str, str, int | None, str, int, int, bool],
                          tuple[int, Plan]] = {}
        self._of: object = None  # the book's limits the plans were made from

    def get(self, tenant: Tenant, model: str, prompt: int, completion: int,
            named: bool) -> Plan:
        second = int(time.time())
        memo = (tenant.organization_id, tenant.instance_id, tenant.key_id, model, prompt,
                completion, named)
        found = self._plans.get(memo)
        if found is not None and found[0] == second and self._of is self.book.version:
            return found[1]
        if self._of is not self.book.version or len(self._plans) > MAX_PLANS:
            self._plans, self._of = {}, self.book.version
        limits = self.book.applying(tenant, model)
        plan = Plan(checks_for(limits, prompt, completion, named=named, now_ms=second * 1000))
        self._plans[memo] = (second, plan)
        return plan


def used_by(checks: list[Check], prompt: int, completion: int) -> list[int]:
    """What a request used of each check, once vLLM said how many tokens it took."""
    used: list[int] = []
    owner, tokens = None, 0
    for check in checks:
        if check.measure == "requests":
            used.append(1)
            continue
        if check.owner is not owner:
            owner = check.owner
            tokens = owner.weighted(prompt, completion)
        used.append(tokens)
    return used
