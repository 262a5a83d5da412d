"""The same counters inside one process: what limits are enforced with while Redis is away.

Each process then holds its share of every limit (the limit divided by the number of gateway
processes), so that together they stay near the limit without talking to each other. While
Redis answers, each process also remembers here what it admitted itself, and its share of what
each quota holds: when Redis goes away in the middle of a minute or a month, what was used
still counts.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from inference_gateway.admission.checks import Check
from inference_gateway.admission.redis_counters import Decision


@dataclass
class _Window:
    entries: deque[tuple[float, str]] = field(default_factory=deque)  # (time ms, ticket)
    costs: dict[str, int] = field(default_factory=dict)
    total: int = 0

    def forget(self, before: float) -> None:
        while self.entries and self.entries[0][0] <= before:
            _, ticket = self.entries.popleft()
            self.total -= self.costs.pop(ticket, 0)


class LocalCounters:
    def __init__(self, share: float) -> None:
        self.share = share  # this process's part of every limit
        self._windows: dict[str, _Window] = {}
        self._places: dict[str, dict[str, float]] = {}  # held places, with their time-out
        self._quotas: dict[str, int] = {}

    def _limit(self, check: Check) -> int:
        return max(1, int(check.limit * self.share))

    def admit(self, checks: list[Check], ticket: str, now_ms: float = 0) -> Decision:
        now = now_ms or time.time() * 1000
        used: list[int] = []
        resets: list[int] = []
        taken: list[int] = []
        for i, check in enumerate(checks):
            limit = self._limit(check)
            if check.kind == "window":
                window = self._windows.setdefault(check.key, _Window())
                window.forget(now - check.span_ms)
                if window.total + check.floor > limit:
                    retry = int(window.entries[0][0] + check.span_ms - now) if window.entries \
                        else check.span_ms
                    return Decision(False, i, max(retry, 1), [window.total], [], [])
                taken.append(min(check.cost, limit - window.total))
                used.append(window.total + taken[-1])
                resets.append(int(window.entries[0][0] + check.span_ms - now)
                              if window.entries else check.span_ms)
            elif check.kind == "concurrent":
                places = self._places.setdefault(check.key, {})
                for held in [t for t, until in places.items() if until <= now]:
                    del places[held]
                if len(places) + 1 > limit:
                    return Decision(False, i, 1000, [len(places)], [], [])
                taken.append(1)
                used.append(len(places) + 1)
                resets.append(0)
            else:
                total = self._quotas.get(check.key, 0)
                if total + check.floor > limit:
                    return Decision(False, i, check.span_ms, [total], [], [])
                taken.append(min(check.cost, limit - total))
                used.append(total + taken[-1])
                resets.append(check.span_ms)
        self.remember(checks, ticket, taken, now_ms=now)
        return Decision(True, -1, 0, used, resets, taken)

    def remember(self, checks: list[Check], ticket: str, taken: list[int],
                 shared_used: list[int] | None = None, now_ms: float = 0) -> None:
        """Count an admitted request in this process's counters. ``shared_used`` is what
        Redis said each counter holds: a quota then holds this process's share of it."""
        now = now_ms or time.time() * 1000
        for i, (check, take) in enumerate(zip(checks, taken, strict=True)):
            if check.kind == "window":
                window = self._windows.setdefault(check.key, _Window())
                window.forget(now - check.span_ms)
                window.entries.append((now, ticket))
                window.costs[ticket] = take
                window.total += take
            elif check.kind == "concurrent":
                self._places.setdefault(check.key, {})[ticket] = now + check.span_ms
            elif shared_used is not None:
                self._quotas[check.key] = int(shared_used[i] * self.share)
            else:
                self._quotas[check.key] = self._quotas.get(check.key, 0) + take

    def settle(self, checks: list[Check], ticket: str, taken: list[int],
               actual: list[int]) -> None:
        for check, reserved, spent in zip(checks, taken, actual, strict=True):
            if check.kind == "window":
                window = self._windows.get(check.key)
                if window is not None and ticket in window.costs:
                    window.total += spent - window.costs[ticket]
                    window.costs[ticket] = spent
            elif check.kind == "concurrent":
                self._places.get(check.key, {}).pop(ticket, None)
            elif check.key in self._quotas:
                self._quotas[check.key] += spent - reserved
