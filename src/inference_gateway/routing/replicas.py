"""The servers of one model and how busy each is: which one takes the next request.

Load is the gateway's own count of requests in flight on each replica (exact, never stale),
plus what the replica's own ``/metrics`` said the rest of the fleet had on it at the last scrape
(other workers, other gateways), scaled up by how full its KV cache is. The least loaded of the
replicas takes the request; above four replicas, the less loaded of two picked at random
(power of two choices), which spreads a burst instead of sending it all to one replica.

A replica that failed a connection, reset one or answered 5xx before any byte is ejected for
a while (unless every replica is, when they are tried all the same); one that comes back (its
health probe passes again) gets a growing share over ``RAMP_SEC`` instead of the whole burst at
once. A replica the configuration or DNS no longer names is drained: no new request, and its
connections closed once its last request ended.
"""

from __future__ import annotations

import random
import time
import zlib
from dataclasses import dataclass, field

EJECT_SEC = 2.0  # the first ejection; doubled for each failure in a row, up to MAX_EJECT_SEC
MAX_EJECT_SEC = 30.0
RAMP_SEC = 5.0  # a replica back from ejection reaches its full share over this long
MIN_WEIGHT = 0.1
FULL_SCAN_UP_TO = 4  # replicas; above, power of two choices
AFFINITY_SLACK = 2.0  # an affine replica is kept while its load is at most this many requests
AFFINITY_RATIO = 1.5  # ... or this many times the least load, whichever is more


@dataclass(eq=False)
class Replica:
    url: str
    in_flight: int = 0  # this process's requests on it now
    healthy: bool = True  # the last active probe passed (or none has run yet)
    ejected_until: float = 0.0  # passive ejection after failures, monotonic time
    failures: int = 0  # in a row
    back_at: float = 0.0  # when it came back from ejection or ill health
    draining: bool = False
    # From its /metrics at the last scrape: requests on it from everyone, and cache use.
    remote_running: float = 0.0
    remote_waiting: float = 0.0
    kv_cache: float = 0.0
    own_at_scrape: int = 0
    scraped_at: float = 0.0
    served: int = 0  # requests started on it by this process
    errors: int = 0

    def available(self, now: float) -> bool:
        return self.healthy and not self.draining and now >= self.ejected_until

    def weight(self, now: float) -> float:
        since = now - self.back_at
        return 1.0 if since >= RAMP_SEC else max(MIN_WEIGHT, since / RAMP_SEC)

    def load(self, now: float) -> float:
        others = max(0.0, self.remote_running + self.remote_waiting - self.own_at_scrape)
        return (self.in_flight + others) * (1.0 + self.kv_cache) / self.weight(now)

    # -- the relay's reports --------------------------------------------------------------------

    def start(self) -> None:
        self.in_flight += 1
        self.served += 1

    def finish(self, failure: str | None) -> None:
        """A request on it ended; ``failure`` says how it failed before any byte, if it did."""
        self.in_flight -= 1
        if failure is None:
            if self.failures:
                self.failures = 0
            return
        self.errors += 1
        self.failures += 1
        now = time.monotonic()
        self.ejected_until = now + min(EJECT_SEC * 2 ** (self.failures - 1), MAX_EJECT_SEC)
        self.back_at = self.ejected_until

    def state(self, now: float) -> str:
        if self.draining:
            return "draining"
        if not self.healthy:
            return "down"
        if now < self.ejected_until:
            return "ejected"
        return "up" if self.weight(now) >= 1.0 else "returning"


@dataclass(eq=False)
class ReplicaSet:
    """The replicas of one served model."""

    model: str
    replicas: list[Replica] = field(default_factory=list)
    rng: random.Random = field(default_factory=random.Random)

    def candidates(self, affinity: bytes | None = None) -> list[Replica]:
        """The replica for the next request, then one to retry on, best first."""
        now = time.monotonic()
        live = [r for r in self.replicas if r.available(now)]
        if not live:
            # Every replica failed a request lately but none failed its health probe: trying
            # one beats refusing the request (with one replica, that is every failure).
            live = [r for r in self.replicas if r.healthy and not r.draining]
            if not live:
                return []
        if len(live) == 1:
            return live
        if len(live) <= FULL_SCAN_UP_TO:
            self.rng.shuffle(live)  # ties go to a random one
            ranked = sorted(live, key=lambda r: r.load(now))
        else:
            a, b = self.rng.sample(live, 2)
            best = a if a.load(now) <= b.load(now) else b
            rest = [r for r in live if r is not best]
            ranked = [best, min(rest, key=lambda r: r.load(now))]
        if affinity is not None:
            ranked = _with_affinity(ranked, affinity, now)
        return ranked[:2]

    def find(self, url: str) -> Replica | None:
        for replica in self.replicas:
            if replica.url == url:
                return replica
        return None


def _with_affinity(ranked: list[Replica], key: bytes, now: float) -> list[Replica]:
    """Put the replica a prompt prefix hashes to first, while its load stays near the least.

    Rendezvous hashing: each prefix prefers the replica with the highest hash of (prefix, url),
    so adding or removing a replica moves only the prefixes that preferred it.
    """
    preferred = max(ranked, key=lambda r: zlib.crc32(r.url.encode(), zlib.crc32(key)))
    least = ranked[0].load(now)
    if preferred.load(now) <= max(least * AFFINITY_RATIO, least + AFFINITY_SLACK):
        return [preferred, *(r for r in ranked if r is not preferred)]
    return ranked
