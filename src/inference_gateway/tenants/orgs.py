"""The org gate: with ``ORG_AUTH_ENABLED`` only organizations marked valid may send requests.

``inference.org_validation`` is the source of truth. Each process keeps the set of valid
organizations in memory, reloaded in the background, so the request path never queries Postgres.
Until the first load succeeds the set is empty, and a failed reload keeps the last good set: an
outage can delay a change, never open the gate to an organization that was not allowed.
"""

from __future__ import annotations

import asyncpg


class OrgGate:
    """The in-memory set of valid organizations."""

    def __init__(self) -> None:
        self._valid: frozenset[str] = frozenset()

    def allows(self, org: str) -> bool:
        return org in self._valid

    async def refresh(self, conn: asyncpg.Connection) -> None:
        rows = await conn.fetch("SELECT org_id FROM inference.org_validation WHERE valid")
        self._valid = frozenset(row["org_id"] for row in rows)


async def set_valid(conn: asyncpg.Connection, org: str, valid: bool) -> None:
    """Allow (``valid``) or deny an organization, creating its row if need be."""
    await conn.execute(
        "INSERT INTO inference.org_validation (org_id, valid, last_updated_at) "
        "VALUES ($1, $2, now()) "
        "ON CONFLICT (org_id) DO UPDATE SET valid = EXCLUDED.valid, last_updated_at = now()",
        org,
        valid,
    )


async def list_orgs(conn: asyncpg.Connection, org: str | None = None) -> list[asyncpg.Record]:
    return list(await conn.fetch(
        "SELECT org_id, valid, last_updated_at FROM inference.org_validation "
        "WHERE $1::text IS NULL OR org_id = $1 ORDER BY org_id",
        org,
    ))
