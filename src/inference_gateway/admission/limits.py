"""The limits that apply to a request, from an in-memory copy of ``inference.limits``.

A limit names a subject (an organization, one of its instances, or one API key), optionally a
model, and any of: requests and tokens per minute, requests at once, tokens per UTC day and per
calendar month. Every limit whose subject matches the caller and whose model is the request's
(or none) applies; the request is admitted only if each of them admits it.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import asyncpg

from inference_gateway.tenants.tenant import Tenant

_COLUMNS = ("id, organization_id, instance_id, api_key_id, model, requests_per_minute, "
            "tokens_per_minute, max_concurrent, tokens_per_day, tokens_per_month, "
            "prompt_weight, completion_weight")


@dataclass(frozen=True, slots=True)
class Limit:
    id: int
    organization_id: str
    instance_id: str | None
    api_key_id: int | None
    model: str | None
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_concurrent: int | None
    tokens_per_day: int | None
    tokens_per_month: int | None
    prompt_weight: float = 1.0
    completion_weight: float = 1.0

    @property
    def subject(self) -> str:
        """The key prefix of this limit's counters: who, and for which model."""
        who = (f"key:{self.api_key_id}" if self.api_key_id is not None
               else f"inst:{self.instance_id}" if self.instance_id is not None else "org")
        return f"{who}:{self.model or '*'}:{self.id}"

    def weighted(self, prompt: int, completion: int) -> int:
        """Tokens as this limit counts them."""
        return round(prompt * self.prompt_weight + completion * self.completion_weight)

    def describe(self) -> str:
        who = (f"key {self.api_key_id}" if self.api_key_id is not None
               else f"instance {self.instance_id}" if self.instance_id is not None
               else "organization")
        return f"{who} of {self.organization_id}" + (f", model {self.model}" if self.model
                                                     else "")


class LimitBook:
    """The limits by organization, reloaded when the database says they changed."""

    def __init__(self) -> None:
        self._by_org: dict[str, tuple[Limit, ...]] = {}

    @property
    def version(self) -> object:
        """Changes (by identity) whenever the limits are reloaded."""
        return self._by_org

    def limited(self, organization_id: str) -> bool:
        """Whether any limit names this organization."""
        return organization_id in self._by_org

    def applying(self, tenant: Tenant, model: str) -> tuple[Limit, ...]:
        """The limits of a caller and model (worked out once a second per caller, see
        ``plan``)."""
        return tuple(
            limit for limit in self._by_org.get(tenant.organization_id, ())
            if (limit.model is None or limit.model == model)
            and (limit.instance_id is None or limit.instance_id == tenant.instance_id)
            and (limit.api_key_id is None or limit.api_key_id == tenant.key_id))

    def all(self) -> list[Limit]:
        return [limit for limits in self._by_org.values() for limit in limits]

    async def refresh(self, conn: asyncpg.Connection) -> None:
        rows = await conn.fetch(f"SELECT {_COLUMNS} FROM inference.limits")
        by_org: dict[str, list[Limit]] = {}
        for row in rows:
            by_org.setdefault(row["organization_id"], []).append(from_row(row))
        self._by_org = {org: tuple(limits) for org, limits in by_org.items()}


def from_row(row: asyncpg.Record) -> Limit:
    values = dict(row)
    for weight in ("prompt_weight", "completion_weight"):
        if isinstance(values[weight], Decimal):
            values[weight] = float(values[weight])
    return Limit(**values)


# -- managing them (the limits command) -----------------------------------------------------------

SETTABLE = ("requests_per_minute", "tokens_per_minute", "max_concurrent", "tokens_per_day",
            "tokens_per_month", "prompt_weight", "completion_weight")


async def set_limit(conn: asyncpg.Connection, org: str, instance: str | None,
                    key_prefix: str | None, model: str | None,
                    values: dict[str, float | int | None]) -> Limit:
    """Create the subject's limit row or change the given values of it."""
    key_id = None
    if key_prefix is not None:
        key_id = await conn.fetchval(
            "SELECT id FROM inference.api_keys WHERE prefix = $1 AND organization_id = $2",
            key_prefix, org)
        if key_id is None:
            raise ValueError(f"no key with prefix {key_prefix!r} in organization {org!r}")
    names = [n for n in SETTABLE if n in values]
    assignments = ", ".join(f"{n} = EXCLUDED.{n}" for n in names)
    row = await conn.fetchrow(
        f"INSERT INTO inference.limits (organization_id, instance_id, api_key_id, model"
        f"{''.join(', ' + n for n in names)}) VALUES ($1, $2, $3, $4"
        f"{''.join(f', ${i + 5}' for i in range(len(names)))}) "
        "ON CONFLICT (organization_id, coalesce(instance_id, ''), coalesce(api_key_id, 0), "
        f"coalesce(model, '')) DO UPDATE SET {assignments + ', ' if assignments else ''}"
        f"updated_at = now() RETURNING {_COLUMNS}",
        org, instance, key_id, model, *(values[n] for n in names))
    return from_row(row)


async def list_limits(conn: asyncpg.Connection, org: str | None) -> list[Limit]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM inference.limits WHERE $1::text IS NULL OR organization_id = $1 "
        "ORDER BY organization_id, instance_id NULLS FIRST, api_key_id NULLS FIRST, model "
        "NULLS FIRST", org)
    return [from_row(row) for row in rows]


async def remove_limit(conn: asyncpg.Connection, limit_id: int) -> bool:
    return await conn.fetchval("DELETE FROM inference.limits WHERE id = $1 RETURNING id",
                               limit_id) is not None
