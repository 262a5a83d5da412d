"""The usage API through a real gateway over a database of its own: buckets, grouping and
pages checked against the rows summed one by one, who may read what, late rows, costs, and
every bad parameter answered with an OpenAI-shaped 400."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import openai
import pytest

from inference_gateway.portal import rollups
from inference_gateway.portal.timegrid import DAY, HOUR, MINUTE, cover, page_buckets
from inference_gateway.tenants.keys import create_key, revoke_key

from harness import Proc, start_gateway
from usage_support import (
    ADMIN_TOKEN,
    POOLING,
    Row,
    answered,
    drop_database,
    expected,
    fresh_database,
    get,
    insert,
)

USAGE = "/v1/organization/usage"
PRICES = "m1=1:2:0.5,emb=0.1:0"


@dataclass
class World:
    url: str  # the database
    gateway: Proc
    rows: list[Row]
    keys: dict[str, str]  # a1, a2, b1: tenants' keys; admin: an admin key
    prefixes: dict[int, str]  # key id: prefix
    day0: int  # the first day of the seeded rows


def seed_rows(day0: int, ids: dict[str, int]) -> list[Row]:
    a1, a2, b1 = ids["a1"], ids["a2"], ids["b1"]
    rows = [
        Row("acme", "a1", "m1", "/v1/chat/completions", day0 + HOUR + 30, 100, 10, 40, a1),
        Row("acme", "a1", "m2", "/v1/responses", day0 + HOUR + 600, 200, 20, 0, a1),
        Row("acme", "a1", "m1", "/v1/completions", day0 + DAY + 7200, 50, 5, 0, a1),
        Row("acme", "a1", "m1", "/v1/messages", day0 + HOUR + 45, 30, 3, 10),
        Row("acme", "a1", "emb", "/v1/embeddings", day0 + 7200, 40),
        Row("acme", "a1", "emb", "/v1/rerank", day0 + DAY, 60),
        Row("acme", "a1", "m1", "/v1/messages/count_tokens", day0 + HOUR, 999),
        Row("acme", "a2", "m1", "/v1/chat/completions", day0 + 5 * HOUR, 300, 30, 0, a2),
        Row("acme", "a2", "emb", "/v1/score", day0 + DAY + 1, 15, 0, 0, a2),
        Row("bravo", "b1", "m1", "/v1/chat/completions", day0 + HOUR, 1000, 100, 0, b1),
        Row("bravo", "b1", "m3", "/v1/chat/completions/batch", day0 + 2 * DAY + HOUR, 2000,
            200, 100, b1),
        Row("bravo", "b1", "emb", "/v1/embeddings", day0 + 2 * DAY, 500, 0, 0, b1),
    ]
    # And a spread over the three days, for pages of every width.
    endpoints = ("/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/score")
    for i in range(300):
        org, inst, key = (("acme", "a1", a1), ("acme", "a2", a2), ("bravo", "b1", b1))[i % 3]
        endpoint = endpoints[i % 7 % 4]
        pooling = endpoint in POOLING  # prompt tokens only
        rows.append(Row(org, inst, f"m{1 + i % 3}", endpoint, day0 + (i * 7757) % (3 * DAY),
                        5 + i % 17, 0 if pooling else i % 9, 0 if pooling else i % 4,
                        key if i % 5 else None))
    return rows


def cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inference_gateway", *args],
                          env={**os.environ, "DATABASE_URL": database_url, "LOG_LEVEL": "WARNING"},
                          capture_output=True, text=True, timeout=30, check=False)


async def _prepare(url: str, day0: int) -> tuple[list[Row], dict[str, str], dict[int, str]]:
    conn = await asyncpg.connect(url)
    try:
        keys = {name: (await create_key(conn, org, name))[0]
                for name, org in (("a1", "acme"), ("a2", "acme"), ("b1", "bravo"))}
        ids = {name: await conn.fetchval("SELECT id FROM inference.api_keys WHERE prefix = $1",
                                         key[:12]) for name, key in keys.items()}
        rows = seed_rows(day0, ids)
        await insert(conn, rows)
        await rollups.catch_up(conn, timedelta(0))
        prefixes = {i: keys[name][:12] for name, i in ids.items()}
        return rows, keys, prefixes
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def world(admin_url: str, session_tmp: Path, simulator: Proc) -> Iterator[World]:
    name = f"gateway_usage_{uuid.uuid4().hex[:8]}"
    url = asyncio.run(fresh_database(admin_url, name))
    try:
        now = int(time.time())
        day0 = now - now % DAY - 3 * DAY
        rows, keys, prefixes = asyncio.run(_prepare(url, day0))
        made = cli(url, "keys", "create", "--admin")
        assert made.returncode == 0, made.stderr
        keys["admin"] = made.stdout.strip()
        gateway = start_gateway(session_tmp, url, simulator.url, ADMIN_TOKEN=ADMIN_TOKEN,
                                RUN_USAGE_ROLLUPS="false", MODEL_PRICES=PRICES)
        try:
            yield World(url, gateway, rows, keys, prefixes, day0)
        finally:
            gateway.stop()
    finally:
        asyncio.run(drop_database(admin_url, name))


def pages(world: World, path: str, token: str, params: list[tuple[str, object]]
          ) -> list[dict[str, object]]:
    """Every page of a query, following next_page."""
    found = []
    cursor: object = None
    while True:
        status, body = get(world.gateway.url, path, token,
                           params=params + ([("page", cursor)] if cursor else []))
        assert status == 200, body
        found.append(body)
        if not body["has_more"]:
            assert body["next_page"] is None
            return found
        cursor = body["next_page"]


def merged(found: list[dict[str, object]], group_by: list[str], width: int
           ) -> dict[int, dict[tuple[object, ...], list[int]]]:
    out: dict[int, dict[tuple[object, ...], list[int]]] = {}
    for page in found:
        out.update(answered(page, group_by, width))
    return out


def test_the_time_grid() -> None:
    day = 20000 * DAY
    assert cover(day + 90 * MINUTE, day + 3 * DAY + 5 * MINUTE, DAY) == [
        (MINUTE, day + 90 * MINUTE, day + 2 * HOUR), (HOUR, day + 2 * HOUR, day + DAY),
        (DAY, day + DAY, day + 3 * DAY), (MINUTE, day + 3 * DAY, day + 3 * DAY + 5 * MINUTE)]
    assert cover(day, day + 2 * DAY, HOUR) == [(HOUR, day, day + 2 * DAY)]
    assert cover(day + MINUTE, day + 2 * MINUTE, DAY) == [(MINUTE, day + MINUTE, day + 2 * MINUTE)]
    buckets, following = page_buckets(day + 90 * MINUTE, day + 5 * HOUR, HOUR, 2)
    assert buckets == [(day + 90 * MINUTE, day + 2 * HOUR), (day + 2 * HOUR, day + 3 * HOUR)]
    assert following == day + 3 * HOUR


WIDTHS = {"1m": (MINUTE, HOUR - 120, HOUR + 900), "1h": (HOUR, 1234, DAY + 5000),
          "1d": (DAY, 1234, 3 * DAY + 77)}


@pytest.mark.parametrize("family", ["completions", "embeddings"])
@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("group_by", [[], ["model"], ["organization_id"], ["project_id", "model"],
                                      ["api_key_id"], ["organization_id", "instance_id"]])
def test_buckets_and_groups_sum_the_rows(world: World, family: str, width: str,
                                         group_by: list[str]) -> None:
    seconds, start, end = WIDTHS[width]
    start, end = world.day0 + start, world.day0 + end
    params: list[tuple[str, object]] = [("start_time", start), ("end_time", end),
                                        ("bucket_width", width)]
    params += [("group_by", g) for g in group_by]
    found = pages(world, f"{USAGE}/{family}", ADMIN_TOKEN, params)
    buckets = [b for page in found for b in page["data"]]  # type: ignore[attr-defined]
    # Every bucket of the range, in order, the first and last cut to it (to the minute).
    assert buckets[0]["start_time"] == start - start % 60
    assert buckets[-1]["end_time"] == end + (-end) % 60
    assert all(a["end_time"] == b["start_time"] for a, b in itertools.pairwise(buckets))
    assert all(b["object"] == "bucket" for b in buckets)
    columns = ["instance_id" if g == "project_id" else g for g in group_by]
    assert merged(found, columns, seconds) == expected(
        world.rows, family, start - start % 60, end + (-end) % 60, seconds, columns,
        world.prefixes)
    result = next(r for b in buckets for r in b["results"])
    assert result["object"] == f"organization.usage.{family}.result"
    assert ("output_tokens" in result) == (family == "completions")
    if "project_id" in group_by:
        assert result["project_id"] == result["instance_id"]


def test_pages_follow_one_another(world: World) -> None:
    start, end = world.day0, world.day0 + 3 * DAY
    params: list[tuple[str, object]] = [("start_time", start), ("end_time", end),
                                        ("bucket_width", "1h"), ("limit", 20)]
    found = pages(world, f"{USAGE}/completions", ADMIN_TOKEN, params)
    assert [len(p["data"]) for p in found] == [20, 20, 20, 12]  # type: ignore[arg-type]
    assert merged(found, [], HOUR) == expected(world.rows, "completions", start, end, HOUR)
    # A cursor belongs to its query: another range refuses it.
    cursor = found[0]["next_page"]
    status, body = get(world.gateway.url, f"{USAGE}/completions", ADMIN_TOKEN, params=[
        ("start_time", start + 30 * HOUR), ("end_time", end), ("bucket_width", "1h"),
        ("page", cursor)])
    assert status == 400 and body["error"]["param"] == "page"


def test_a_tenant_key_reads_its_own_instance_only(world: World) -> None:
    start, end = world.day0, world.day0 + 3 * DAY
    base: list[tuple[str, object]] = [("start_time", start), ("end_time", end), ("limit", 31),
                                      ("group_by", "organization_id"), ("group_by", "project_id")]
    status, body = get(world.gateway.url, f"{USAGE}/completions", world.keys["a1"], params=base)
    assert status == 200
    assert answered(body, ["organization_id", "instance_id"], DAY) == expected(
        world.rows, "completions", start, end, DAY, ["organization_id", "instance_id"],
        instance_id=["a1"], organization_id=["acme"])
    # The tenant headers name nothing: the key decides.
    status, other = get(world.gateway.url, f"{USAGE}/completions", world.keys["a1"],
                        {"X-TEMBO-ORG": "bravo", "X-TEMBO-INSTANCE": "b1"}, params=base)
    assert status == 200 and other == body
    for param, value in (("organization_ids", "bravo"), ("project_ids", "a2"),
                         ("instance_ids", "b1")):
        status, body = get(world.gateway.url, f"{USAGE}/completions", world.keys["a1"],
                           params=[*base, (param, value)])
        assert status == 403, body
        assert body["error"]["type"] == "permission_error"
    status, body = get(world.gateway.url, f"{USAGE}/organizations", world.keys["a1"],
                       params=[("start_time", start)])
    assert status == 403 and body["error"]["code"] == "admin_required"
    status, scope = get(world.gateway.url, f"{USAGE}/scope", world.keys["b1"])
    assert scope == {"object": "organization.usage.scope", "admin": False,
                     "organization_id": "bravo", "instance_id": "b1",
                     "api_key_id": world.keys["b1"][:12]}


@pytest.mark.parametrize("token", [None, "igw_" + "x" * 43, "not-a-key", ADMIN_TOKEN + "x"])
def test_usage_needs_a_credential(world: World, token: str | None) -> None:
    headers = {"X-TEMBO-ORG": "acme", "X-TEMBO-INSTANCE": "a1"}
    for path in (f"{USAGE}/completions", f"{USAGE}/embeddings", "/v1/organization/costs",
                 f"{USAGE}/organizations", f"{USAGE}/scope"):
        status, body = get(world.gateway.url, path, token, headers,
                           params=[("start_time", world.day0)])
        assert status == 401, (path, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["type"] == "authentication_error"


def test_admins_see_every_organization_and_may_pick_one(world: World) -> None:
    start, end = world.day0, world.day0 + 3 * DAY
    params: list[tuple[str, object]] = [("start_time", start), ("end_time", end), ("limit", 31),
                                        ("group_by", "organization_id")]
    for token in (ADMIN_TOKEN, world.keys["admin"]):
        status, body = get(world.gateway.url, f"{USAGE}/completions", token, params=params)
        assert status == 200
        assert answered(body, ["organization_id"], DAY) == expected(
            world.rows, "completions", start, end, DAY, ["organization_id"])
        status, body = get(world.gateway.url, f"{USAGE}/completions", token,
                           params=[*params, ("organization_ids", "bravo")])
        assert answered(body, ["organization_id"], DAY) == expected(
            world.rows, "completions", start, end, DAY, ["organization_id"],
            organization_id=["bravo"])
    status, body = get(world.gateway.url, f"{USAGE}/organizations", world.keys["admin"],
                       params=[("start_time", start), ("end_time", end), ("limit", 1)])
    assert status == 200 and body["has_more"] is True
    tokens: dict[str, int] = {}
    for r in world.rows:
        if r.family:
            tokens[r.org] = tokens.get(r.org, 0) + r.prompt + r.completion
    top = max(tokens, key=lambda org: tokens[org])
    assert [(o["organization_id"], o["input_tokens"] + o["output_tokens"])
            for o in body["data"]] == [(top, tokens[top])]


def test_an_admin_key_sends_no_requests(world: World) -> None:
    client = openai.OpenAI(base_url=f"{world.gateway.url}/v1", api_key=world.keys["admin"],
                           max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="facebook/opt-125m", max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])
    listing = cli(world.url, "keys", "list").stdout
    line = next(x for x in listing.splitlines() if x.startswith(world.keys["admin"][:12]))
    assert line.split("\t")[1:3] == ["-", "-"] and line.endswith("\tadmin")
    assert cli(world.url, "keys", "create", "--admin", "--org", "x").returncode == 2


def test_a_revoked_key_reads_nothing(world: World) -> None:
    key, prefix = asyncio.run(_new_key(world.url))
    assert get(world.gateway.url, f"{USAGE}/scope", key)[0] == 200
    asyncio.run(_revoke(world.url, prefix))
    assert get(world.gateway.url, f"{USAGE}/scope", key)[0] == 401


async def _new_key(url: str) -> tuple[str, str]:
    conn = await asyncpg.connect(url)
    try:
        return await create_key(conn, "acme", "short-lived")
    finally:
        await conn.close()


async def _revoke(url: str, prefix: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await revoke_key(conn, prefix)
    finally:
        await conn.close()


async def _late(url: str, row: Row | None, roll: bool) -> None:
    conn = await asyncpg.connect(url)
    try:
        if row is not None:
            await insert(conn, [row])
        if roll:
            await rollups.catch_up(conn, timedelta(0))
    finally:
        await conn.close()


def test_late_rows_count_in_their_old_buckets(world: World) -> None:
    """A row that reaches Postgres days late: seen at once (the newest rows are read unrolled),
    then from the rollups, in the bucket of its request, counted once."""
    start, end = world.day0, world.day0 + 3 * DAY
    params: list[tuple[str, object]] = [("start_time", start), ("end_time", end),
                                        ("group_by", "model")]
    late = Row("bravo", "b1", "m-late", "/v1/chat/completions", world.day0 + 3 * HOUR, 77, 7)

    def seen() -> dict[int, list[int]]:
        status, body = get(world.gateway.url, f"{USAGE}/completions", ADMIN_TOKEN, params=params)
        assert status == 200
        got = answered(body, ["model"], DAY)
        return {cell: sums for cell, groups in got.items()
                for group, sums in groups.items() if group == ("m-late",)}

    asyncio.run(_late(world.url, late, roll=False))
    assert seen() == {world.day0: [77, 7, 0, 1]}  # not rolled up yet
    asyncio.run(_late(world.url, None, roll=True))
    assert seen() == {world.day0: [77, 7, 0, 1]}  # rolled up: still once
    world.rows.append(late)  # the later tests' oracle sees it too


def test_costs_price_each_line_item(world: World) -> None:
    start, end = world.day0, world.day0 + 3 * DAY
    status, body = get(world.gateway.url, "/v1/organization/costs", world.keys["a1"], params=[
        ("start_time", start), ("end_time", end), ("group_by", "line_item")])
    assert status == 200 and body["object"] == "page"
    # PRICES as (input, output, cached input): m1=1:2:0.5, emb=0.1:0 (cached as input).
    prices = {"m1": (Decimal(1), Decimal(2), Decimal("0.5")),
              "emb": (Decimal("0.1"), Decimal(0), Decimal("0.1"))}
    want: dict[tuple[int, str], Decimal] = {}
    for r in world.rows:
        if r.family is None or (r.org, r.instance) != ("acme", "a1") or r.model not in prices:
            continue
        unit_in, unit_out, unit_cached = prices[r.model]
        day = r.at - r.at % DAY
        for kind, amount in (("input", (r.prompt - r.cached) * unit_in),
                             ("cached input", r.cached * unit_cached),
                             ("output", r.completion * unit_out)):
            if amount:
                want[(day, f"{r.model}, {kind}")] = want.get((day, f"{r.model}, {kind}"),
                                                             Decimal(0)) + amount
    got = {(b["start_time"], r["line_item"]): r["amount"]["value"]
           for b in body["data"] for r in b["results"]}
    assert got == pytest.approx({k: float(v / 1_000_000) for k, v in want.items()})
    assert {r["amount"]["currency"] for b in body["data"] for r in b["results"]} == {"usd"}


BAD = [
    ({}, "start_time", "missing_required_parameter"),
    ({"start_time": "abc"}, "start_time", "invalid_value"),
    ({"start_time": "-5"}, "start_time", "invalid_value"),
    ({"start_time": "1e9"}, "start_time", "invalid_value"),
    ({"start_time": "99999999999999"}, "start_time", "invalid_value"),
    ({"start_time": "1000", "end_time": "1000"}, "end_time", "invalid_value"),
    ({"start_time": "2000", "end_time": "1000"}, "end_time", "invalid_value"),
    ({"start_time": "1000", "bucket_width": "2h"}, "bucket_width", "invalid_value"),
    ({"start_time": "1000", "limit": "0"}, "limit", "invalid_value"),
    ({"start_time": "1000", "limit": "32"}, "limit", "invalid_value"),
    ({"start_time": "1000", "bucket_width": "1h", "limit": "169"}, "limit", "invalid_value"),
    ({"start_time": "1000", "limit": "ten"}, "limit", "invalid_value"),
    ({"start_time": "1000", "group_by": "user_id"}, "group_by", "invalid_value"),
    ({"start_time": "1000", "group_by": "model;drop"}, "group_by", "invalid_value"),
    ({"start_time": "1000", "page": "not-a-cursor"}, "page", "invalid_value"),
    ({"start_time": "1000", "page": "cGFnZV85"}, "page", "invalid_value"),
    ({"start_time": "1000", "user_ids": "u"}, "user_ids", "invalid_value"),
    ({"start_time": "1000", "batch": "true"}, "batch", "invalid_value"),
    ({"start_time": "1000", "models": "\x01"}, "models", "invalid_value"),
    ({"start_time": "1000", "models": "x" * 257}, "models", "invalid_value"),
    ({"start_time": "1000", "project_ids": "a", "instance_ids": "a"}, "instance_ids",
     "invalid_value"),
    ({"start_time": "1000", "colour": "red"}, "colour", "unknown_parameter"),
    ({"start_time": ["1000", "2000"]}, "start_time", "invalid_value"),
]


@pytest.mark.parametrize(("params", "param", "code"), BAD)
@pytest.mark.parametrize("path", [f"{USAGE}/completions", f"{USAGE}/embeddings"])
def test_bad_parameters_are_400(world: World, path: str, params: dict[str, object], param: str,
                                code: str) -> None:
    pairs = [(k, v) for k, vs in params.items() for v in (vs if isinstance(vs, list) else [vs])]
    status, body = get(world.gateway.url, path, world.keys["a1"], params=pairs)
    assert status == 400, body
    assert body == {"error": {"message": body["error"]["message"], "type": "invalid_request_error",
                              "param": param, "code": code}}


@pytest.mark.parametrize(("path", "params", "param"), [
    ("/v1/organization/costs", {"start_time": "1000", "bucket_width": "1h"}, "bucket_width"),
    ("/v1/organization/costs", {"start_time": "1000", "group_by": "api_key_id"}, "group_by"),
    (f"{USAGE}/organizations", {"start_time": "1000", "limit": "0"}, "limit"),
    (f"{USAGE}/organizations", {"start_time": "1000", "group_by": "model"}, "group_by"),
    (f"{USAGE}/scope", {"x": "1"}, "x"),
])
def test_bad_parameters_of_the_other_routes(world: World, path: str, params: dict[str, str],
                                            param: str) -> None:
    status, body = get(world.gateway.url, path, ADMIN_TOKEN, params=list(params.items()))
    assert status == 400 and body["error"]["param"] == param, body
