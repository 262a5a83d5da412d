"""A worker's numbers as plain data: what is dumped to its file, merged, and rendered.

A ``Snapshot`` maps a family's name to its series, each keyed by its label values. A counter
or gauge is a float; a histogram is a list of bucket counts (not cumulative, the last one for
+Inf) followed by the sum of the observations.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

import orjson

from inference_gateway.observability.catalog import BY_NAME, Family

Labels = tuple[str, ...]
Value = float | list[float]
Snapshot = dict[str, dict[Labels, Value]]


def new_histogram(family: Family) -> list[float]:
    return [0.0] * (len(family.buckets) + 2)


def observe(histogram: list[float], buckets: tuple[float, ...], value: float) -> None:
    """Count one observation; ``buckets`` are the upper bounds, each inclusive."""
    histogram[bisect_left(buckets, value)] += 1
    histogram[-1] += value


def put(snapshot: Snapshot, family: Family, labels: Labels, value: Value) -> None:
    """Add a value to a series (a gauge's values are set: one worker gives one)."""
    series = snapshot.setdefault(family.name, {})
    old = series.get(labels)
    if old is None or family.kind == "gauge":
        series[labels] = list(value) if isinstance(value, list) else value
    else:
        series[labels] = _add(old, value)


def _add(a: Value, b: Value) -> Value:
    if isinstance(a, list) and isinstance(b, list):
        return [x + y for x, y in zip(a, b, strict=True)]
    assert isinstance(a, float | int) and isinstance(b, float | int)
    return a + b


def _combine(family: Family, a: Value, b: Value) -> Value:
    if family.merge == "sum":
        return _add(a, b)
    assert isinstance(a, float | int) and isinstance(b, float | int)
    return max(a, b) if family.merge == "max" else min(a, b)  # "age" keeps the oldest time


def merge(total: Snapshot, part: Snapshot, live: bool = True) -> None:
    """Add one worker's snapshot to the total; a dead worker's gauges are left out."""
    for name, series in part.items():
        family = BY_NAME.get(name)
        if family is None or (family.live_only and not live):
            continue
        into = total.setdefault(name, {})
        for labels, value in series.items():
            old = into.get(labels)
            into[labels] = (list(value) if isinstance(value, list) else value) if old is None \
                else _combine(family, old, value)


def counters_only(snapshot: Snapshot) -> Snapshot:
    """What outlives a worker: its own counters and histograms (not copies of a replica's)."""
    return {name: series for name, series in snapshot.items()
            if name in BY_NAME and not BY_NAME[name].live_only
            and BY_NAME[name].merge == "sum"}


def dumps(snapshot: Snapshot) -> bytes:
    return orjson.dumps({name: [[*labels, value] for labels, value in series.items()]
                         for name, series in snapshot.items()})


def loads(data: bytes) -> Snapshot:
    """A snapshot from its file; anything malformed is left out rather than trusted."""
    raw = orjson.loads(data)
    snapshot: Snapshot = {}
    if not isinstance(raw, dict):
        return snapshot
    for name, rows in raw.items():
        family = BY_NAME.get(name)
        if family is None or not isinstance(rows, list):
            continue
        series = snapshot[name] = {}
        for labels, value in _well_formed(rows, len(family.labels)):
            series[labels] = value
    return snapshot


def _well_formed(rows: Iterable[object], width: int) -> Iterable[tuple[Labels, Value]]:
    for row in rows:
        if not isinstance(row, list) or len(row) != width + 1:
            continue
        labels, value = row[:-1], row[-1]
        if not all(isinstance(v, str) for v in labels):
            continue
        if isinstance(value, float | int) and not isinstance(value, bool):
            yield tuple(str(v) for v in labels), float(value)
        elif isinstance(value, list) and all(isinstance(v, float | int) for v in value):
            yield tuple(str(v) for v in labels), [float(v) for v in value]
