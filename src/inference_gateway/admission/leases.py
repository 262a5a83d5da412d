"""Room a gateway process holds from Redis, so that most limited requests need no round trip.

A round trip to Redis costs more than the rest of a request's path, so when Redis admits a
request while a counter has ample room, it also gives the process some spare room, counted in
Redis as admitted in that second. The process admits its next requests from it, and settles
them against it, while Redis's clock is still in that second; then what is left goes back.

It stays exact: every request is counted in Redis, in the second it was admitted in (the process
uses the room only while Redis's clock is surely still in that second: the grant's time on
Redis's clock plus what has passed since it was asked for). Spare room is only given out of the
room beyond half the limit, and shared: at most that divided by twice the number of processes,
and at most twice what the process admitted from that counter in the last second, or four
times what it admitted in this one (of a quota, a thousandth of it at most). So no process
sits on room others need, and near a limit each request goes to Redis and is settled there at
once, as without leases.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import cast

from inference_gateway.admission.checks import Check
from inference_gateway.admission.held import Give, Hold, Places
from inference_gateway.admission.plan import Plan
from inference_gateway.admission.redis_counters import CODE, Decision, Want

GRANT_STUCK_SEC = 5.0  # a grant of places with no answer by then is taken as failed
# A quota's room held by a process is at most this share of it: should Redis count a grant
# whose answer never came (it timed out), that room stays counted until the period ends.
QUOTA_SPARE_SHARE = 1000


class Leases:
    def __init__(self, holder: str, processes: int) -> None:
        self.holder = holder
        self.share = 2 * processes
        self._holds: dict[str, Hold] = {}
        self._places: dict[str, Places] = {}
        self._demand: dict[str, tuple[int, float]] = {}  # key → spent by its last hold, when
        self._owed: dict[tuple[str, str, int], int] = {}  # (kind, key, second) → change
        self._detached: list[Places] = []
        self._asking: dict[str, float] = {}  # key → when room was asked for, answer to come
        self._answered: dict[str, asyncio.Future[None]] = {}  # for requests waiting on it
        # (key, second, amount): what requests admitted here count in a window, for the
        # process's own counters (see ``local_counters``), once their room is given back.
        self.counted: list[tuple[str, int, int]] = []
        self._ids = itertools.count()

    # -- admitting ----------------------------------------------------------------------------

    def take(self, plan: Plan, now: float) -> tuple[list[Hold | Places], int] | None:
        """Admit a request from the room held, if every one of its checks has enough: where
        its room came from (what each holds now, for the headers) and the second it counts
        in. Each counter is moved as it is found to have room, and moved back should a later
        one have none: that is rare, once per grant at most."""
        holds, places_of = self._holds, self._places
        found: list[Hold | Places] = []
        second = 0
        for key, cost, concurrent in plan.spec:
            if concurrent:
                places = places_of.get(key)
                if places is None or places.until <= now or places.busy >= places.held \
                        or places.granting:
                    self._untake(found, plan.costs)
                    return None
                places.busy += 1
                places.here += 1
                if places.busy > places.peak:
                    places.peak = places.busy
                found.append(places)
            else:
                hold = holds.get(key)
                if hold is None or hold.until <= now or hold.room < cost:
                    self._untake(found, plan.costs)
                    return None
                hold.room -= cost
                hold.spent += cost
                hold.here += cost
                hold.used += cost
                second = hold.second
                found.append(hold)
        return found, second

    @staticmethod
    def _untake(found: list[Hold | Places], costs: list[int]) -> None:
        for held, cost in zip(found, costs, strict=False):
            if type(held) is Hold:
                held.room += cost
                held.spent -= cost
                held.here -= cost
                held.used -= cost
            elif type(held) is Places:
                held.busy -= 1
                held.here -= 1

    def wants(self, checks: list[Check], now: float) -> list[Want]:
        """What to ask Redis for beyond a request: twice the demand of the last second, or
        four times what was admitted in this one when that ran out (a burst)."""
        wants: list[Want] = []
        for check in checks:
            if check.kind == "concurrent":
                places = self._places.get(check.key)
                if places is not None and places.granting \
                        and now - places.granting > GRANT_STUCK_SEC:
                    self._detach(places, places.asked)
                    places = None
                if places is None:
                    places = Places(check.key, f"{self.holder}p{next(self._ids)}")
                    self._places[check.key] = places
                if places.granting:  # one grant at a time keeps the names in order
                    wants.append(Want(0))
                    continue
                places.granting, places.asked = now, max(2 * places.peak, 4 * places.busy, 4)
                self._asking[check.key] = now
                wants.append(Want(places.asked, places.held, places.name))
            else:
                if now - self._asking.get(check.key, -GRANT_STUCK_SEC) < GRANT_STUCK_SEC:
                    wants.append(Want(0))  # one grant at a time: requests at once share it
                    continue
                self._asking[check.key] = now
                hold = self._holds.get(check.key)
                last = self._demand.get(check.key, (0, 0.0))[0]
                spent = hold.spent if hold is not None else 0
                room = max(4 * check.cost, 2 * last, 4 * spent)
                if check.kind == "quota":  # room granted with an answer lost stays counted
                    room = min(room, max(check.cost, check.limit // QUOTA_SPARE_SHARE))
                wants.append(Want(room))
        return wants

    def granted(self, checks: list[Check], wants: list[Want], decision: Decision,
                asked_at: float, now: float) -> list[Hold | Places | None]:
        """Hold the spare room Redis gave with an admission; the request's own part is held
        with it where there was any (and settled here), otherwise in Redis (None)."""
        spares = decision.spare or [0] * len(checks)
        second = decision.at_ms // 1000
        # Redis's clock is at most at_ms (+1, its milliseconds are rounded down) plus the time
        # since the admission was asked for: the room is used only while that is in `second`.
        until = asked_at + ((second + 1) * 1000 - decision.at_ms - 1) / 1000
        found: list[Hold | Places | None] = []
        self.refused(checks, wants)
        for i, check in enumerate(checks):
            spare = spares[i]
            if check.kind == "concurrent":
                places = self._places.get(check.key)
                if places is not None and places.name == wants[i].name and wants[i].room \
                        and spare > 0:
                    places.held += 1 + spare
                    places.busy += 1
                    places.peak = max(places.peak, places.busy)
                    places.until = until
                    found.append(places)
                    continue
                found.append(None)
                continue
            if spare <= 0:
                found.append(None)
                continue
            hold = self._holds.get(check.key)
            if hold is None or hold.second != second or not hold.active:
                if hold is not None:
                    self._expire(hold, now)
                hold = self._holds[check.key] = Hold(check.key, check.kind, second, until)
            hold.until = min(hold.until, until)
            hold.room += spare
            hold.spent += decision.taken[i]
            hold.used = decision.used[i]
            hold.reset_at = now + decision.resets_ms[i] / 1000
            found.append(hold)
        return found

    def refused(self, checks: list[Check], wants: list[Want]) -> None:
        """Redis answered: the grants this request asked for are no longer under way (and a
        refusal changed nothing)."""
        for check, want in zip(checks, wants, strict=True):
            if want.room:
                self._answer(check.key)
                places = self._places.get(check.key)
                if places is not None and places.name == want.name:
                    places.granting = 0.0

    def failed(self, checks: list[Check], wants: list[Want]) -> None:
        """Redis did not answer, or the request left before it did: a grant of places may
        or may not be made, so their names are given back, all that it could have made."""
        for check, want in zip(checks, wants, strict=True):
            if want.room:
                self._answer(check.key)
                places = self._places.get(check.key)
                if places is not None and places.name == want.name:
                    self._detach(places, places.asked)

    def holding(self, checks: list[Check], now: float) -> bool:
        """Whether this process holds room any of these checks could use."""
        for check in checks:
            hold = self._holds.get(check.key)
            if hold is not None and hold.active and hold.room > 0:
                return True
            places = self._places.get(check.key)
            if places is not None and places.held > places.busy and not places.granting:
                return True
        return False

    # -- settling and giving back ---------------------------------------------------------------

    def settle(self, holds: Sequence[Hold | Places | None], checks: list[Check], taken: list[int],
               actual: list[int], now: float, here: bool) -> bool:
        """Settle a request whose room was held (``here``: admitted without Redis); True when
        something is owed to Redis now (rather than when the room's second ends)."""
        owed = False
        for held, check, take, spent in zip(holds, checks, taken, actual, strict=True):
            if held is None:
                continue
            if isinstance(held, Places):
                held.busy -= 1
                held.here -= here
                owed = owed or held.detached or held.until <= now
                continue
            change = spent - take
            if not change:
                continue
            if held.active:
                held.room -= change
                held.used += change
                if here:
                    held.here += change
            else:
                self._owe(check, held, change, here)
                owed = True
        return owed

    def settle_here(self, holds: Sequence[Hold | Places | None], plan: Plan, prompt: int,
                    completion: int, now: float) -> bool:
        """``settle`` for a request admitted from held room alone, the most common: only its
        places and its tokens move."""
        owed = False
        for i in plan.places:
            places = cast(Places, holds[i])
            places.busy -= 1
            places.here -= 1
            owed = owed or places.detached or places.until <= now
        owner, tokens = None, 0
        for i, of in plan.tokens:
            if of is not owner:
                owner, tokens = of, of.weighted(prompt, completion)
            change = tokens - plan.costs[i]
            if change:
                hold = cast(Hold, holds[i])
                if hold.active:
                    hold.room -= change
                    hold.used += change
                    hold.here += change
                else:
                    self._owe(plan.checks[i], hold, change, True)
                    owed = True
        return owed

    def _owe(self, check: Check, hold: Hold, change: int, here: bool) -> None:
        """A change to room already given back: owed to Redis."""
        owed_key = (check.kind, check.key, hold.second)
        self._owed[owed_key] = self._owed.get(owed_key, 0) + change
        if here and check.kind == "window":
            self.counted.append((check.key, hold.second, change))

    def pending(self, checks: list[Check], now: float) -> asyncio.Future[None] | None:
        """The answer to room being asked for one of these checks, if one is to come: a
        request that waits for it may well find room then, without asking itself."""
        for check in checks:
            if now - self._asking.get(check.key, -GRANT_STUCK_SEC) < GRANT_STUCK_SEC:
                answered = self._answered.get(check.key)
                if answered is None:
                    answered = asyncio.get_running_loop().create_future()
                    self._answered[check.key] = answered
                return answered
        return None

    def report(self) -> dict[str, int]:
        """What requests admitted here count in the windows held now, to ``counted``, and
        how many of them are under way per counter of places (Redis went away: the
        process's own counters go on from there)."""
        for hold in self._holds.values():
            if hold.kind == "window" and hold.here:
                self.counted.append((hold.key, hold.second, hold.here))
                hold.here = 0
        busy: dict[str, int] = {}
        for places in [*self._places.values(), *self._detached]:
            if places.here > 0:  # the others are in the process's own counters already
                busy[places.key] = busy.get(places.key, 0) + places.here
        return busy

    def release(self, checks: list[Check], now: float) -> list[Give]:
        """Give back at once all the room held for these checks (a request was refused)."""
        for check in checks:
            hold = self._holds.pop(check.key, None)
            if hold is not None:
                self._expire(hold, now)
            places = self._places.get(check.key)
            if places is not None:
                places.until = 0.0
        return self._gives(now, only={check.key for check in checks})

    def due(self, now: float) -> list[Give]:
        """Room whose second has ended, and changes owed, to give back to Redis now."""
        for key, hold in list(self._holds.items()):
            if hold.until <= now:
                del self._holds[key]
                self._expire(hold, now)
        self._demand = {key: seen for key, seen in self._demand.items() if now - seen[1] < 3}
        return self._gives(now)

    def next_due(self) -> float | None:
        """When ``due`` has something to give back next."""
        if self._owed or any(places.busy <= 0 for places in self._detached):
            return 0.0
        times = [hold.until for hold in self._holds.values()]
        times += [places.until for places in self._places.values()
                  if places.held > places.busy and not places.granting]
        return min(times, default=None)

    def close(self) -> list[Give]:
        """Everything held, given back (the process stops)."""
        for places in list(self._places.values()):
            places.until = 0.0
            if places.granting:  # its answer will not be looked at
                self._detach(places, places.asked)
        return self.due(float("inf"))

    def _answer(self, key: str) -> None:
        self._asking.pop(key, None)
        answered = self._answered.pop(key, None)
        if answered is not None and not answered.done():
            answered.set_result(None)

    def _expire(self, hold: Hold, now: float) -> None:
        hold.active = False
        if hold.kind == "window" and hold.here:
            self.counted.append((hold.key, hold.second, hold.here))
            hold.here = 0
        if hold.room:
            owed_key = (hold.kind, hold.key, hold.second)
            self._owed[owed_key] = self._owed.get(owed_key, 0) - hold.room
            hold.room = 0
        self._demand[hold.key] = (hold.spent, now)

    def _detach(self, places: Places, uncertain: int = -1) -> None:
        """Places given up under their name: all of them are given back once no request uses
        them (with ``uncertain``, the most a grant with no answer may have made beside), and
        the next grant uses a new name, so that a give-back retried late can never take
        places a later grant made."""
        places.detached = True
        places.held += 1 + uncertain
        places.granting = 0.0
        if self._places.get(places.key) is places:
            fresh = Places(places.key, f"{self.holder}p{next(self._ids)}")
            fresh.peak = places.peak
            self._places[places.key] = fresh
        if places.held > 0 or places.busy > 0:
            self._detached.append(places)

    def _gives(self, now: float, only: set[str] | None = None) -> list[Give]:
        gives: list[Give] = []
        for (kind, key, second), change in list(self._owed.items()):
            if only is None or key in only:
                del self._owed[(kind, key, second)]
                if change:
                    gives.append(Give(key, f"{CODE[kind]} {second} {change} 0"))
        for places in list(self._places.values()):
            if (only is None or places.key in only) and places.until <= now \
                    and places.held > places.busy and not places.granting:
                gives.append(Give(places.key, f"c {places.name} {places.busy} {places.held}"))
                places.held = places.busy
                places.peak = max(places.busy, places.peak // 2)
                self._detach(places)
        for places in list(self._detached):
            if places.busy <= 0:
                self._detached.remove(places)
                gives.append(Give(places.key, f"c {places.name} 0 {places.held}"))
        return gives
