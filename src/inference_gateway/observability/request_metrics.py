"""The request path's metrics: an observer that only adds to numbers this process holds.

Each finished request costs a few dictionary look-ups, list increments and bisections (about
3 µs, see docs/metrics.md); nothing is formatted, exported or written here. ``snapshot`` turns
the numbers into series once a second, or when ``/metrics`` is scraped.
"""

from __future__ import annotations

import time
from bisect import bisect_left as _at

from inference_gateway.errors import GatewayError
from inference_gateway.metering.record import UsageRecord
from inference_gateway.observability import catalog as c
from inference_gateway.observability.orgs import OrgLabels
from inference_gateway.observability.series import Snapshot, new_histogram, observe, put
from inference_gateway.proxy.endpoints import KNOWN_PATHS
from inference_gateway.proxy.relay import Outcome

_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")
_DURATION, _OVERHEAD, _TTFT, _TPOT, _TOKENS = (c.DURATION_BUCKETS, c.OVERHEAD_BUCKETS,
                                               c.TTFT_BUCKETS, c.TPOT_BUCKETS, c.TOKEN_BUCKETS)
_monotonic, _time = time.monotonic, time.time
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
        "ok_client",
        "ok_duration",
        "overhead",
        "prompt",
        "tpot",
        "ttfb",
        "ttft",
    )

    def __init__(self) -> None:
        self.classes = [0] * len(_CLASSES)
        self.durations: dict[int, list[float]] = {}  # by status (0: no error)
        self.client: dict[int, list[float]] = {}  # the upstream call, by status (0: no error)
        self.ok_duration = self.durations[0] = new_histogram(c.SERVER_DURATION)
        self.ok_client = self.client[0] = new_histogram(c.CLIENT_DURATION)
        self.ttfb = new_histogram(c.TTFB)
        self.overhead = new_histogram(c.OVERHEAD)
        self.ttft = new_histogram(c.TTFT)
        self.tpot = new_histogram(c.TPOT)
        self.prompt = new_histogram(c.TOKEN_USAGE)
        self.completion = new_histogram(c.TOKEN_USAGE)


def _failed(table: dict[int, list[float]], status: int) -> list[float]:
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
        # Written for speed (it runs for every request): module constants bound once, the
        # histograms' bisections inline, the successful requests' histograms kept at hand.
        self.in_flight -= 1
        model, status = record.model, record.status
        slot = self.slots.get((model, record.endpoint)) or self._slot_of(model, record.endpoint)
        slot.classes[min(status // 100, 5)] += 1
        total = record.completed_at - record.started_at
        histogram = slot.ok_duration if status < 400 else _failed(slot.durations, status)
        histogram[_at(_DURATION, total)] += 1
        histogram[-1] += total
        # The monotonic clock's reading when the request arrived, for the outcome's times.
        start = _monotonic() - (_time() - record.started_at)
        if (at := outcome.first_byte_at) is not None:
            histogram = slot.ttfb
            histogram[_at(_DURATION, at - start)] += 1
            histogram[-1] += at - start
        sent, done = outcome.sent_at, outcome.upstream_done_at
        if sent is not None and done is not None:
            histogram = slot.ok_client if status < 400 else _failed(slot.client, status)
            histogram[_at(_DURATION, done - sent)] += 1
            histogram[-1] += done - sent
            own = sent - done + total
            slot.overhead[_at(_OVERHEAD, own)] += 1
            slot.overhead[-1] += own
        prompt, completion = record.prompt_tokens, record.completion_tokens
        if (first := outcome.first_chunk_at) is not None and record.streamed:
            observe(slot.ttft, _TTFT, first - start)
            if completion > 1 and done is not None:
                observe(slot.tpot, _TPOT, (done - first) / (completion - 1))
        if prompt or completion:
            slot.prompt[_at(_TOKENS, prompt)] += 1
            slot.prompt[-1] += prompt
            slot.completion[_at(_TOKENS, completion)] += 1
            slot.completion[-1] += completion
        org = self.orgs.label(record.organization_id, prompt + completion + 1)
        counts = self.tokens.get((model, org))
        if counts is None:
            counts = self.tokens[(model, org)] = [0, 0, 0]
        counts[0] += prompt
        counts[1] += completion
        counts[2] += record.cached_tokens
        if (replica := record.replica) is not None:
            billed = self.replicas.get((model, replica))
            if billed is None:
                billed = self.replicas[(model, replica)] = [0, 0, 0]
            billed[0] += prompt
            billed[1] += completion
            billed[2] += prompt * outcome.choices

    def _slot_of(self, model: str, path: str) -> Slot:
        """The slot of a model and endpoint; a path with a response id is kept under its route."""
        endpoint = route_of(path)
        slot = self.slots.get((model, endpoint))
        if slot is None:
            slot = self.slots[(model, endpoint)] = Slot()
        return slot

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
        for family, table in ((c.SERVER_DURATION, slot.durations),
                              (c.CLIENT_DURATION, slot.client)):
            for status, histogram in table.items():
                if any(histogram[:-1]):
                    put(into, family, (*gen_ai, str(status) if status else ""), histogram)
        if any(slot.ttft[:-1]):
            put(into, c.TTFT, gen_ai, slot.ttft)
        if any(slot.tpot[:-1]):
            put(into, c.TPOT, gen_ai, slot.tpot)
        if any(slot.prompt[:-1]):
            put(into, c.TOKEN_USAGE, (*gen_ai, "input"), slot.prompt)
            put(into, c.TOKEN_USAGE, (*gen_ai, "output"), slot.completion)
