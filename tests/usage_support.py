"""What the usage tests share: a database of their own, audit rows at chosen times, an oracle
that sums those rows the slow way, and plain HTTP calls to the usage API."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from inference_gateway.db.migrate import migrate

GENERATION = ("/v1/chat/completions", "/v1/completions", "/v1/chat/completions/batch",
              "/v1/responses", "/v1/messages")
POOLING = ("/v1/embeddings", "/v1/score", "/v1/rerank")
ADMIN_TOKEN = "admin-" + "x" * 40


async def fresh_database(admin_url: str, name: str) -> str:
    """An empty, migrated database: the rollups and the admin's answers cover every row."""
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = f"{admin_url.rpartition('/')[0]}/{name}"
    await migrate(url)
    return url


async def drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@dataclass(frozen=True)
class Row:
    """One audit row, as the meter would have written it."""

    org: str
    instance: str
    model: str
    endpoint: str
    at: int  # completed_at, Unix seconds
    prompt: int = 0
    completion: int = 0
    cached: int = 0
    key_id: int | None = None

    @property
    def family(self) -> str | None:
        return "completions" if self.endpoint in GENERATION else \
            "embeddings" if self.endpoint in POOLING else None


async def insert(conn: asyncpg.Connection, rows: Iterable[Row]) -> None:
    await conn.executemany(
        "INSERT INTO inference.requests (request_id, organization_id, instance_id, model, "
        "requested_model, endpoint, prompt_tokens, completion_tokens, cached_tokens, status, "
        "duration_ms, started_at, completed_at, api_key_id) "
        "VALUES ($1, $2, $3, $4, $4, $5, $6, $7, $8, 200, 5, $9, $9, $10)",
        [(uuid.uuid4(), r.org, r.instance, r.model, r.endpoint, r.prompt, r.completion,
          r.cached, datetime.fromtimestamp(r.at, UTC), r.key_id) for r in rows])


def expected(rows: Iterable[Row], family: str, start: int, end: int, width: int,
             group_by: Sequence[str] = (), prefixes: dict[int, str] | None = None,
             **filters: Sequence[str]) -> dict[int, dict[tuple[object, ...], list[int]]]:
    """The oracle: per bucket (its cell's start on the UTC grid), per group, the sums
    ``[input, output, cached, requests]``, summed row by row."""
    out: dict[int, dict[tuple[object, ...], list[int]]] = {}
    for r in rows:
        key_prefix = (prefixes or {}).get(r.key_id) if r.key_id else None
        values = {"organization_id": r.org, "instance_id": r.instance, "model": r.model,
                  "api_key_id": key_prefix}
        if r.family != family or not start <= r.at < end:
            continue
        if any(values[column] not in allowed for column, allowed in filters.items()):
            continue
        group = tuple(values[column] for column in group_by)
        sums = out.setdefault(r.at - r.at % width, {}).setdefault(group, [0, 0, 0, 0])
        for i, n in enumerate((r.prompt, r.completion, r.cached, 1)):
            sums[i] += n
    return out


def answered(page: dict[str, object], group_by: Sequence[str], width: int
             ) -> dict[int, dict[tuple[object, ...], list[int]]]:
    """An API page in the oracle's form."""
    out: dict[int, dict[tuple[object, ...], list[int]]] = {}
    for bucket in page["data"]:  # type: ignore[attr-defined]
        for r in bucket["results"]:
            group = tuple(r[column] for column in group_by)
            cell = bucket["start_time"] - bucket["start_time"] % width
            out.setdefault(cell, {})[group] = [
                r["input_tokens"], r.get("output_tokens", 0), r.get("input_cached_tokens", 0),
                r["num_model_requests"]]
    return out


def get(base: str, path: str, token: str | None = None, headers: dict[str, str] | None = None,
        params: Sequence[tuple[str, object]] = ()) -> tuple[int, dict[str, object]]:
    """GET a usage path; the status and the JSON body, errors included."""
    query = urllib.parse.urlencode([(k, str(v)) for k, v in params])
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"{base}{path}?{query}", headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=15) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
