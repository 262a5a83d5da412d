"""The Prometheus text format (version 0.0.4) of merged snapshots: done at a scrape only."""

from __future__ import annotations

import math

from inference_gateway.observability.catalog import FAMILIES, Family
from inference_gateway.observability.series import Labels, Snapshot, Value

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: Labels, extra: str = "") -> str:
    parts = [f'{name}="{_escape(value)}"' for name, value in zip(names, values, strict=True)
             if value != ""]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _histogram(family: Family, labels: Labels, counts: list[float]) -> list[str]:
    lines = []
    running = 0.0
    for bound, count in zip((*family.buckets, math.inf), counts[:-1], strict=True):
        running += count
        le = 'le="' + ("+Inf" if math.isinf(bound) else repr(float(bound))) + '"'
        lines.append(f"{family.name}_bucket{_labels(family.labels, labels, le)} "
                     f"{number(running)}")
    tag = _labels(family.labels, labels)
    lines.append(f"{family.name}_sum{tag} {number(counts[-1])}")
    lines.append(f"{family.name}_count{tag} {number(running)}")
    return lines


def _sample(family: Family, labels: Labels, value: Value, now: float) -> list[str]:
    if isinstance(value, list):
        return _histogram(family, labels, value)
    if family.merge == "age":
        value = max(now - value, 0.0)
    return [f"{family.name}{_labels(family.labels, labels)} {number(value)}"]


def render(snapshot: Snapshot, now: float) -> str:
    """Every family in the catalog's order; a family without series shows its HELP and TYPE."""
    lines: list[str] = []
    for family in FAMILIES:
        lines.append(f"# HELP {family.name} {family.help}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in sorted(snapshot.get(family.name, {}).items()):
            lines.extend(_sample(family, labels, value, now))
    return "\n".join(lines) + "\n"
