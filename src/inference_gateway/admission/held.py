"""The room a gateway process holds from Redis (see ``leases``): what is left of it, what
requests admitted from it count, and when it goes back."""

from __future__ import annotations

from typing import NamedTuple


class Hold:
    """Spare room of one window or quota, usable until its Redis second ends."""

    __slots__ = ("active", "here", "key", "kind", "reset_at", "room", "second", "spent",
                 "until", "used")

    def __init__(self, key: str, kind: str, second: int, until: float) -> None:
        self.key, self.kind, self.second, self.until = key, kind, second, until
        self.room = 0  # still to admit from; below 0 when settling added more than it had
        self.used = 0  # the counter's use as last known, for the rate-limit headers
        self.reset_at = 0.0  # when the window has room again (monotonic seconds)
        self.spent = 0  # what was admitted from it: the demand its next grant asks for
        self.here = 0  # what requests admitted from it count, not yet in the local counters
        self.active = True  # False once its room was given back: settle through Redis


class Places:
    """The places at once a process holds for one counter: members ``name#0 ... name#(held-1)``
    of its sorted set, ``busy`` of them taken by requests under way."""

    __slots__ = ("asked", "busy", "detached", "granting", "held", "here", "key", "name",
                 "peak", "reset_at", "until", "used")

    def __init__(self, key: str, name: str) -> None:
        self.key, self.name = key, name
        self.held = self.busy = 0
        self.here = 0  # of the busy ones, admitted without asking Redis
        self.peak = 0  # the most busy at once lately: the demand its next grant asks for
        self.until = 0.0  # spare places may be taken until then
        self.granting = 0.0  # when a grant was asked for, while its answer is to come
        self.asked = 0
        self.detached = False  # a grant failed: how many it holds is not known
        self.used = 0  # as ``Hold``'s (places give no headers)
        self.reset_at = 0.0


class Give(NamedTuple):
    """Room to give back to Redis (see ``redis_counters._GIVE``)."""

    key: str
    spec: str
