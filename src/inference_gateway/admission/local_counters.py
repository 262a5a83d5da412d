"""The same counters inside one process: what limits are enforced with while Redis is away.

Each process then holds its share of every limit (the limit divided by the number of gateway
processes), so that together they stay near the limit without talking to each other. While
Redis answers, each process also remembers here what it admitted itself, and its share of what
each quota holds: when Redis goes away in the middle of a minute or a month, what was used
still counts.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from inference_gateway.admission.checks import Check
from inference_gateway.admission.redis_counters import Decision


class _Window:
    """What was admitted per second, as in Redis (see ``redis_counters``): a second counts
    while any part of it is within the window."""

    __slots__ = ("seconds", "total")

    def __init__(self) -> None:
        self.seconds: OrderedDict[int, int] = OrderedDict()  # second → what it admitted
        self.total = 0

    def forget(self, now_ms: float, span_ms: int) -> None:
        first = int((now_ms - span_ms) // 1000)
        while self.seconds:
            second, held = next(iter(self.seconds.items()))
            if second >= first:
                break
            del self.seconds[second]
            self.total -= held

    def reset_ms(self, now_ms: float, span_ms: int) -> int:
        """When the oldest second still held leaves the window."""
        oldest = next(iter(self.seconds), int(now_ms // 1000))
        return int((oldest + 1) * 1000 + span_ms - now_ms)

    def free_at_ms(self, need: int, now_ms: float, span_ms: int) -> int:
        """When enough has left the window to free ``need``."""
        freed = 0
        for second, held in self.seconds.items():
            freed += held
            if freed >= need:
                return (second + 1) * 1000 + span_ms
        return int(now_ms + span_ms)

    def add(self, second: int, amount: int) -> None:
        self.seconds[second] = self.seconds.get(second, 0) + amount
        self.total += amount

    def admit(self, second: int, amount: int) -> None:
        """Count an admission in its second, or in the newest one held should the clock have
        gone back (Redis's and this process's may differ): the seconds stay in order."""
        newest = next(reversed(self.seconds), second)
        self.add(max(second, newest), amount)


class LocalCounters:
    def __init__(self, share: float) -> None:
        self.share = share  # this process's part of every limit
        self._windows: dict[str, _Window] = {}
        self._places: dict[str, dict[str, float]] = {}  # held places, with their time-out
        # Places of requests under way that Redis counted as room a process held (``leases``):
        # counted here from the moment Redis went away until each is settled.
        self.held_places: dict[str, int] = {}
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
                window.forget(now, check.span_ms)
                if window.total + check.floor > limit:
                    free_at = window.free_at_ms(window.total + check.floor - limit, now,
                                                check.span_ms)
                    return Decision(False, i, max(int(free_at - now), 1), [window.total], [],
                                    [])
                taken.append(min(check.cost, limit - window.total))
                used.append(window.total + taken[-1])
                resets.append(window.reset_ms(now, check.span_ms))
            elif check.kind == "concurrent":
                places = self._places.setdefault(check.key, {})
                for held in [t for t, until in places.items() if until <= now]:
                    del places[held]
                busy = len(places) + self.held_places.get(check.key, 0)
                if busy + 1 > limit:
                    return Decision(False, i, 1000, [busy], [], [])
                taken.append(1)
                used.append(busy + 1)
                resets.append(0)
            else:
                total = self._quotas.get(check.key, 0)
                if total + check.floor > limit:
                    return Decision(False, i, check.span_ms, [total], [], [])
                taken.append(min(check.cost, limit - total))
                used.append(total + taken[-1])
                resets.append(check.span_ms)
        self.remember(checks, ticket, taken, now_ms=now)
        return Decision(True, -1, 0, used, resets, taken, int(now))

    def remember(self, checks: list[Check], ticket: str, taken: list[int],
                 shared_used: list[int] | None = None, now_ms: float = 0) -> None:
        """Count an admitted request in this process's counters. ``shared_used`` is what
        Redis said each counter holds: a quota then holds this process's share of it."""
        now = now_ms or time.time() * 1000
        for i, (check, take) in enumerate(zip(checks, taken, strict=True)):
            if check.kind == "window":
                window = self._windows.setdefault(check.key, _Window())
                window.forget(now, check.span_ms)
                window.admit(int(now // 1000), take)
            elif check.kind == "concurrent":
                self._places.setdefault(check.key, {})[ticket] = now + check.span_ms
            elif shared_used is not None:
                self._quotas[check.key] = int(shared_used[i] * self.share)
            else:
                self._quotas[check.key] = self._quotas.get(check.key, 0) + take

    def hold_places(self, busy: dict[str, int]) -> None:
        """Count the places of requests under way that held room admitted."""
        for key, n in busy.items():
            self.held_places[key] = self.held_places.get(key, 0) + n

    def free_place(self, key: str) -> None:
        """One of those requests is over."""
        n = self.held_places.get(key, 0) - 1
        if n > 0:
            self.held_places[key] = n
        else:
            self.held_places.pop(key, None)

    def count(self, key: str, second: int, amount: int) -> None:
        """Count in a window what requests admitted from room held by this process took in
        ``second`` (reported once their room went back, not one by one)."""
        window = self._windows.setdefault(key, _Window())
        if second in window.seconds or second > next(reversed(window.seconds), second - 1):
            window.add(second, amount)
        else:  # a second before the newest held: counted in the newest, the order kept
            window.admit(second, amount)

    def settle(self, checks: list[Check], ticket: str, at_ms: int, taken: list[int],
               actual: list[int]) -> None:
        """Replace what ``ticket`` reserved when admitted at ``at_ms`` with what it used."""
        second = at_ms // 1000
        for check, reserved, spent in zip(checks, taken, actual, strict=True):
            if check.kind == "window":
                window = self._windows.get(check.key)
                held = window.seconds.get(second) if window is not None else None
                if window is not None and held is not None:
                    window.add(second, max(spent - reserved, -held))
            elif check.kind == "concurrent":
                self._places.get(check.key, {}).pop(ticket, None)
            elif check.key in self._quotas:
                self._quotas[check.key] += spent - reserved
