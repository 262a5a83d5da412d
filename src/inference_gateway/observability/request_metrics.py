"""The request path's metrics: an observer that only adds to numbers this process holds.

Each finished request costs a few dictionary look-ups, list increments and bisections (about
3 µs, see docs/metrics.md); nothing is formatted, exported or written here. ``snapshot`` turns
the numbers into series once a second, or when ``/metrics`` is scraped.
"""

from __future__ import annotations

import time

from inference_gateway.errors import GatewayError
from inference_gateway.metering.record import UsageRecord
from inference_gateway.observability import catalog as c
from inference_gateway.observability.orgs import OrgLabels
from inference_gateway.observability.series import Snapshot, new_histogram, observe, put
from inference_gateway.proxy.endpoints import KNOWN_PATHS
from inference_gateway.proxy.relay import Outcome

_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")
_KNOWN = frozenset(KNOWN_PATHS)


def route_of(path: str) -> str:
    """The endpoint a path was served as: a stored response's id is not a label value."""
    if path in _KNOWN:
        return path
    if path.startswith("/v1/responses/"):
        return "/v1/responses/{id}/cancel" if path.endswith("/cancel") else "/v1/responses/{id}"
    return "other"


class Slot:
    """The numbers of one model and endpoint."""

    __slots__ = (
        "classes",
        "client",
        "completion",
        "durations",
        "overhead",
        "prompt",
        "tpot",
        "ttfb",
        "ttft",
    )

    def __init__(self) -> None:
        self.classes = [0] * len(_CLASSES)
        self.durations: dict[int, list[float]] = {}  # by error status (0: none)
        self.client: dict[int, list[float]] = {}  # the upstream call, by error status
        self.ttfb = new_histogram(c.TTFB)
        self.overhead = new_histogram(c.OVERHEAD)
        self.ttft = new_histogram(c.TTFT)
        self.tpot = new_histogram(c.TPOT)
        self.prompt = new_histogram(c.TOKEN_USAGE)
        self.completion = new_histogram(c.TOKEN_USAGE)


def _by_status(table: dict[int, list[float]], status: int) -> list[float]:
    histogram = table.get(status)
    if histogram is None:
        histogram = table[status] = new_histogram(c.SERVER_DURATION)
    return histogram


class RequestMetrics:
    """The ``Observer`` of the request path that keeps the numbers ``/metrics`` serves."""

    def __init__(self, orgs: OrgLabels) -> None:
        self.orgs = orgs
        self.in_flight = 0
        self.slots: dict[tuple[str, str], Slot] = {}
        self.tokens: dict[tuple[str, str], list[int]] = {}  # (model, org) → prompt, compl., cached
        self.replicas: dict[tuple[str, str], list[int]] = {}  # → prompt, completion, prompt * n
        self.rejected: dict[tuple[str, str, str], int] = {}
        self.rate_limited: dict[str, int] = {}

    # -- the Observer ---------------------------------------------------------------------------

    def started(self) -> None:
        self.in_flight += 1

    def refused(self, path: str, error: GatewayError) -> None:
        self.in_flight -= 1
        code = error.code or ""
        key = (route_of(path), str(error.status), code)
        self.rejected[key] = self.rejected.get(key, 0) + 1
        if error.status == 429:
            self.rate_limited[code] = self.rate_limited.get(code, 0) + 1

    def finished(self, record: UsageRecord, outcome: Outcome) -> None:
        self.in_flight -= 1
        endpoint = record.endpoint
        key = (record.model, endpoint if endpoint in _KNOWN else route_of(endpoint))
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = Slot()
        status = record.status
        slot.classes[min(status // 100, 5)] += 1
        error = status if status >= 400 else 0
        total = record.completed_at - record.started_at
        observe(_by_status(slot.durations, error), c.DURATION_BUCKETS, total)
        # The monotonic clock's reading when the request arrived, for the outcome's times.
        start = time.monotonic() - (time.time() - record.started_at)
        if outcome.first_byte_at is not None:
            observe(slot.ttfb, c.DURATION_BUCKETS, outcome.first_byte_at - start)
        sent, done = outcome.sent_at, outcome.upstream_done_at
        if sent is not None and done is not None:
            observe(_by_status(slot.client, error), c.DURATION_BUCKETS, done - sent)
            observe(slot.overhead, c.OVERHEAD_BUCKETS, sent - done + total)
        prompt, completion = record.prompt_tokens, record.completion_tokens
        first = outcome.first_chunk_at
        if first is not None and record.streamed:
            observe(slot.ttft, c.TTFT_BUCKETS, first - start)
            if completion > 1 and done is not None:
                observe(slot.tpot, c.TPOT_BUCKETS, (done - first) / (completion - 1))
        if prompt or completion:
            observe(slot.prompt, c.TOKEN_BUCKETS, prompt)
            observe(slot.completion, c.TOKEN_BUCKETS, completion)
        org = self.orgs.label(record.organization_id, prompt + completion + 1)
        counts = self.tokens.get((record.model, org))
        if counts is None:
            counts = self.tokens[(record.model, org)] = [0, 0, 0]
        counts[0] += prompt
        counts[1] += completion
        counts[2] += record.cached_tokens
        if record.replica is not None:
            billed = self.replicas.get((record.model, record.replica))
            if billed is None:
                billed = self.replicas[(record.model, record.replica)] = [0, 0, 0]
            billed[0] += prompt
            billed[1] += completion
            billed[2] += prompt * outcome.choices

    # -- off the request path -------------------------------------------------------------------

    def forget_orgs(self, keep: frozenset[str]) -> None:
        """Drop the series of organizations that lost their label."""
        for key in [k for k in self.tokens if k[1] != "other" and k[1] not in keep]:
            del self.tokens[key]

    def snapshot(self, into: Snapshot) -> None:
        put(into, c.IN_FLIGHT, (), float(self.in_flight))
        for (endpoint, status, code), count in self.rejected.items():
            put(into, c.REJECTED, (endpoint, status, code), float(count))
        for code, count in self.rate_limited.items():
            put(into, c.RATE_LIMITED, (code,), float(count))
        for (model, endpoint), slot in self.slots.items():
            self._slot(into, model, endpoint, slot)
        for (model, org), (prompt, completion, cached) in self.tokens.items():
            for kind, count in (("prompt", prompt), ("completion", completion),
                                ("cached", cached)):
                put(into, c.TOKENS, (model, org, kind), float(count))
        for (model, replica), (prompt, completion, expected) in self.replicas.items():
            put(into, c.BILLED, (model, replica, "prompt"), float(prompt))
            put(into, c.BILLED, (model, replica, "completion"), float(completion))
            put(into, c.EXPECTED, (model, replica, "prompt"), float(expected))
            put(into, c.EXPECTED, (model, replica, "generation"), float(completion))

    @staticmethod
    def _slot(into: Snapshot, model: str, endpoint: str, slot: Slot) -> None:
        for i, count in enumerate(slot.classes):
            if count:
                put(into, c.REQUESTS, (model, endpoint, _CLASSES[i]), float(count))
        put(into, c.TTFB, (model, endpoint), slot.ttfb)
        put(into, c.OVERHEAD, (model, endpoint), slot.overhead)
        gen_ai = (c.operation(endpoint), c.PROVIDER, model)
        for status, histogram in slot.durations.items():
            put(into, c.SERVER_DURATION, (*gen_ai, str(status) if status else ""), histogram)
        for status, histogram in slot.client.items():
            put(into, c.CLIENT_DURATION, (*gen_ai, str(status) if status else ""), histogram)
        if any(slot.ttft[:-1]):
            put(into, c.TTFT, gen_ai, slot.ttft)
        if any(slot.tpot[:-1]):
            put(into, c.TPOT, gen_ai, slot.tpot)
        if any(slot.prompt[:-1]):
            put(into, c.TOKEN_USAGE, (*gen_ai, "input"), slot.prompt)
            put(into, c.TOKEN_USAGE, (*gen_ai, "output"), slot.completion)
