"""What a worker's other parts already count, read into series when a snapshot is taken.

The replicas, the usage pipeline, the tenant caches and the malformed-request filter keep their
own numbers; they are read here, once a second or at a scrape, never on the request path.
"""

from __future__ import annotations

import time

from inference_gateway.metering.meter import Meter
from inference_gateway.metering.spool_lines import completed_at
from inference_gateway.observability import catalog as c
from inference_gateway.observability.malformed_requests import MalformedRequests
from inference_gateway.observability.series import Snapshot, put
from inference_gateway.routing.router import Router
from inference_gateway.tenants.caches import TenantCaches

STATES = ("up", "returning", "draining", "ejected", "down")  # from best to worst


def replicas(into: Snapshot, router: Router, vllm_tokens: dict[str, tuple[float, float]]
             ) -> None:
    now = time.monotonic()
    for model, replica_set in router.sets.items():
        for replica in replica_set.replicas:
            labels = (model, replica.url)
            put(into, c.REPLICA_UP, labels, 1.0 if replica.healthy else 0.0)
            state = replica.state(now)
            for name in STATES:
                put(into, c.REPLICA_STATE, (*labels, name), 1.0 if name == state else 0.0)
            put(into, c.REPLICA_IN_FLIGHT, labels, float(replica.in_flight))
            put(into, c.REPLICA_REQUESTS, labels, float(replica.served))
            put(into, c.REPLICA_ERRORS, labels, float(replica.errors))
            tokens = vllm_tokens.get(replica.url)
            if tokens is not None:
                put(into, c.VLLM, (*labels, "prompt"), tokens[0])
                put(into, c.VLLM, (*labels, "generation"), tokens[1])


class Pipeline:
    """The usage pipeline of one worker: its spool, its writer, and how old its backlog is."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self._unreadable: tuple[tuple[int, int], float] | None = None

    def read(self, into: Snapshot) -> None:
        spool, health = self.meter.spool, self.meter.health
        stats = spool.stats
        pending = max(stats.appended + stats.replayed - stats.acknowledged, 0)
        put(into, c.SPOOL_RECORDS, (), float(pending))
        put(into, c.SPOOL_BYTES, (), float(spool.pending_bytes()))
        oldest = self._oldest()
        if oldest is not None:
            put(into, c.OLDEST, (), oldest)
        put(into, c.ROWS_WRITTEN, (), float(health.written))
        put(into, c.COPY_BATCHES, (), float(health.batches))
        put(into, c.COPY_FAILURES, (), float(health.failures))
        put(into, c.DEAD_LETTERS, (), float(stats.dead_letters))
        put(into, c.DROPPED, (), float(stats.dropped))
        put(into, c.DATABASE_UP, (), 1.0 if health.database_ok else 0.0)

    def _oldest(self) -> float | None:
        """When the oldest record not yet in Postgres was completed (Unix time)."""
        where = self.meter.spool.oldest_pending()
        if where is None:
            return None
        fd, offset, size = where
        try:
            at = completed_at(fd, offset, size)
        except OSError:
            at = None
        if at is not None:
            return at
        # Unreadable (a corrupt line, about to be dead-lettered): as old as when first seen.
        if self._unreadable is None or self._unreadable[0] != (fd, offset):
            self._unreadable = ((fd, offset), time.time())
        return self._unreadable[1]


def tenants(into: Snapshot, caches: TenantCaches) -> None:
    for name in caches.names():  # the org gate, the keys, the limits; never loaded: as old as us
        put(into, c.CACHE_AGE, (name,), caches.loaded_at.get(name) or _STARTED)


def malformed(into: Snapshot, counter: MalformedRequests | None) -> None:
    if counter is not None:
        put(into, c.MALFORMED, (), float(counter.count))


_STARTED = time.time()
