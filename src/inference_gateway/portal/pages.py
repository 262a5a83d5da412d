"""The usage API's answers, in the shapes of OpenAI's usage and costs APIs.

A page holds ``limit`` buckets, every one of them, empty or not (``results: []``), and a
``next_page`` cursor while the range goes on. A result carries OpenAI's fields, with ``null``
for what it is not grouped by, plus ours: ``organization_id`` and ``instance_id`` (OpenAI's
``project_id``, which carries the same value). ``api_key_id`` is the key's prefix, as
``inference-gateway keys list`` shows it; ``null`` for usage named by the tenant headers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal

import asyncpg

from inference_gateway.portal.params import Family, UsageQuery, encode_cursor
from inference_gateway.portal.usage_store import METRICS
from inference_gateway.settings import ModelPrice

MILLION = Decimal(1_000_000)


def page(query: UsageQuery, results: Mapping[int, list[dict[str, object]]]) -> dict[str, object]:
    """One page of buckets; ``results`` by the start of the grid cell each belongs to."""
    buckets, next_start = query.buckets()
    first_cell = query.page_start - query.page_start % query.width
    data = [{"object": "bucket", "start_time": start, "end_time": end,
             "results": results.get(first_cell if i == 0 else start, [])}
            for i, (start, end) in enumerate(buckets)]
    return {"object": "page", "data": data, "has_more": next_start is not None,
            "next_page": None if next_start is None else encode_cursor(next_start)}


def _groups(row: Mapping[str, object], group_by: tuple[str, ...]) -> dict[str, object]:
    instance = row["instance_id"] if "instance_id" in group_by else None
    return {"project_id": instance, "instance_id": instance,
            "organization_id": row["organization_id"] if "organization_id" in group_by else None}


def usage_result(family: Family, row: asyncpg.Record, group_by: tuple[str, ...]
                 ) -> dict[str, object]:
    result: dict[str, object] = {"object": f"organization.usage.{family}.result",
                                 "input_tokens": row["input_tokens"]}
    if family == "completions":
        result["output_tokens"] = row["output_tokens"]
        result["input_cached_tokens"] = row["input_cached_tokens"]
    result["num_model_requests"] = row["num_model_requests"]
    result.update(_groups(row, group_by))
    result.update(user_id=None,
                  api_key_id=row["api_key_id"] if "api_key_id" in group_by else None,
                  model=row["model"] if "model" in group_by else None)
    if family == "completions":
        result["batch"] = None
    return result


def usage_page(family: Family, query: UsageQuery, rows: Iterable[asyncpg.Record]
               ) -> dict[str, object]:
    results: dict[int, list[dict[str, object]]] = {}
    for row in rows:
        results.setdefault(row["bucket"], []).append(usage_result(family, row, query.group_by))
    return page(query, results)


def line_items(row: Mapping[str, int], price: ModelPrice) -> list[tuple[str, Decimal]]:
    """What a model's usage costs, by kind of token: ``[(kind, amount)]``, none for no tokens."""
    cached = row["input_cached_tokens"]
    items = [("input", row["input_tokens"] - cached, price.input),
             ("cached input", cached, price.cached_input),
             ("output", row["output_tokens"], price.output)]
    return [(kind, tokens * unit / MILLION) for kind, tokens, unit in items if tokens]


def cost_page(query: UsageQuery, rows: Iterable[asyncpg.Record],
              prices: Mapping[str, ModelPrice], currency: str) -> dict[str, object]:
    """Costs by bucket, from usage grouped by model: by line item (``<model>, <kind>``) when
    ``group_by`` has ``line_item``, else summed. Models without a price cost nothing here."""
    by_line = "model" in query.group_by
    sums: dict[int, dict[tuple[object, ...], tuple[Decimal, dict[str, object]]]] = {}
    for row in rows:
        price = prices.get(row["model"])
        if price is None:
            continue
        groups = _groups(row, query.group_by)
        for kind, amount in line_items(row, price):
            line = f"{row['model']}, {kind}" if by_line else None
            key = (line, groups["instance_id"], groups["organization_id"])
            bucket = sums.setdefault(row["bucket"], {})
            total, _ = bucket.get(key, (Decimal(0), {}))
            bucket[key] = (total + amount, {"line_item": line, **groups})
    results = {
        start: [{"object": "organization.costs.result",
                 "amount": {"value": float(total), "currency": currency}, **fields}
                for total, fields in bucket.values()]
        for start, bucket in sums.items()}
    return page(query, results)


def ranking(rows: list[asyncpg.Record], limit: int) -> dict[str, object]:
    """The organizations with the most tokens, most first."""
    data = [{"object": "organization.usage.ranking", "organization_id": row["organization_id"],
             **{m: row[m] for m in METRICS}} for row in rows[:limit]]
    return {"object": "list", "data": data, "has_more": len(rows) > limit}
