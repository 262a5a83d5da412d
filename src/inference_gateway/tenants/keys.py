"""API keys: each names one organization and one instance, for clients that send only a key.

A key is ``igw_`` and 43 random URL-safe characters (256 bits). Only its SHA-256 is stored (a
fast hash is enough for a random secret that long), with its first 12 characters as a prefix
that identifies it in listings and on the command line. Each process keeps the live keys in a
dictionary by hash, reloaded in the background, so a revoked key stops working within one
refresh interval. "Last used" times are noted in memory on the request path and written to
Postgres by the reloads, in one statement per interval.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from inference_gateway.tenants.tenant import Tenant, is_valid_id

KEY_PREFIX = "igw_"
PREFIX_LENGTH = 12
_CREATE_ATTEMPTS = 5


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """A live key: its row's id (for "last used") and the tenant it names."""

    id: int
    tenant: Tenant


class KeyRing:
    """The live (not revoked) keys of the database, by hash, and when each was last used."""

    def __init__(self) -> None:
        self._by_hash: dict[bytes, KeyEntry] = {}
        self._used: dict[int, float] = {}

    @staticmethod
    def recognizes(token: str) -> bool:
        """Whether a bearer token is in our key format (other services' tokens are not)."""
        return token.startswith(KEY_PREFIX)

    def lookup(self, token: str) -> KeyEntry | None:
        if not token.isascii():
            return None
        entry = self._by_hash.get(hash_key(token))
        if entry is not None:
            self._used[entry.id] = time.time()
        return entry

    async def refresh(self, conn: asyncpg.Connection) -> None:
        await self._write_last_used(conn)
        rows = await conn.fetch(
            "SELECT id, key_hash, organization_id, instance_id FROM inference.api_keys "
            "WHERE revoked_at IS NULL AND organization_id IS NOT NULL"  # admin keys name no tenant
        )
        self._by_hash = {
            bytes(row["key_hash"]): KeyEntry(
                row["id"], Tenant(row["organization_id"], row["instance_id"], row["id"])
            )
            for row in rows
        }

    async def _write_last_used(self, conn: asyncpg.Connection) -> None:
        used, self._used = self._used, {}
        if not used:
            return
        try:
            await conn.execute(
                "UPDATE inference.api_keys AS k SET last_used_at = u.at "
                "FROM unnest($1::bigint[], $2::timestamptz[]) AS u(id, at) "
                "WHERE k.id = u.id AND (k.last_used_at IS NULL OR k.last_used_at < u.at)",
                list(used),
                [datetime.fromtimestamp(at, UTC) for at in used.values()],
            )
        except BaseException:
            for key_id, at in used.items():  # keep them for the next attempt
                self._used[key_id] = max(at, self._used.get(key_id, 0.0))
            raise


async def create_key(conn: asyncpg.Connection, org: str, instance: str) -> tuple[str, str]:
    """Store a new key for the tenant; returns ``(key, prefix)``. The key is not kept anywhere."""
    for name, value in (("organization", org), ("instance", instance)):
        if not is_valid_id(value):
            raise ValueError(f"the {name} id must be 1 to 256 printable ASCII characters")
    return await _store_new_key(conn, org, instance)


async def create_admin_key(conn: asyncpg.Connection) -> tuple[str, str]:
    """Store a new admin key: it reads every organization's usage and cannot send requests."""
    return await _store_new_key(conn, None, None)


async def _store_new_key(conn: asyncpg.Connection, org: str | None, instance: str | None
                         ) -> tuple[str, str]:
    for _ in range(_CREATE_ATTEMPTS):
        key = new_key()
        prefix = key[:PREFIX_LENGTH]
        try:
            await conn.execute(
                "INSERT INTO inference.api_keys (prefix, key_hash, organization_id, instance_id, "
                "is_admin) VALUES ($1, $2, $3, $4, $5)",
                prefix, hash_key(key), org, instance, org is None,
            )
        except asyncpg.UniqueViolationError:  # a prefix already taken: draw again
            continue
        return key, prefix
    raise RuntimeError("could not draw a key with an unused prefix")


async def list_keys(conn: asyncpg.Connection, org: str | None = None) -> list[asyncpg.Record]:
    return list(await conn.fetch(
        "SELECT prefix, organization_id, instance_id, created_at, last_used_at, revoked_at, "
        "is_admin FROM inference.api_keys WHERE $1::text IS NULL OR organization_id = $1 "
        "ORDER BY organization_id NULLS FIRST, instance_id, created_at",
        org,
    ))


async def revoke_key(conn: asyncpg.Connection, prefix_or_key: str) -> bool:
    """Revoke the key with this prefix (a whole key works too); False if no live key has it."""
    revoked = await conn.fetchval(
        "UPDATE inference.api_keys SET revoked_at = now() "
        "WHERE prefix = $1 AND revoked_at IS NULL RETURNING id",
        prefix_or_key[:PREFIX_LENGTH],
    )
    return revoked is not None
