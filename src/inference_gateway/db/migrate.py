"""Applies the plain SQL files in ``migrations/`` in order, each once, each in its own transaction.

Applied files are recorded in ``inference.schema_migrations`` with a checksum; a session-level
advisory lock makes concurrent runs (several gateways starting at once) wait for each other.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources

import asyncpg

from inference_gateway.db import locks
from inference_gateway.settings import Settings

log = logging.getLogger(__name__)

# Migrations whose text was later reworded without a change in what they create: a database
# that applied an earlier text is up to date (checksums of those earlier texts, by version).
REWORDED = {
    # Shared helpers instead of repeated catalog lookups; log_maintenance_performance defined
    # once, in public, where the wrapper called the copy in inference.
    "0002_maintenance.sql": frozenset(
        {"e23a72600027491655e64ab5be90b72595342c0feb9a9e24417b82b9226d7a5b"}),
}
_BOOKKEEPING = """
CREATE SCHEMA IF NOT EXISTS inference;
CREATE TABLE IF NOT EXISTS inference.schema_migrations (
    version    text PRIMARY KEY,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


@dataclass(frozen=True)
class Migration:
    version: str  # the file name, e.g. 0001_requests.sql
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available_migrations() -> list[Migration]:
    folder = resources.files("inference_gateway.db") / "migrations"
    files = sorted(
        (f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name
    )
    return [Migration(f.name, f.read_text(encoding="utf-8")) for f in files]


async def applied_versions(conn: asyncpg.Connection) -> dict[str, str]:
    exists = await conn.fetchval("SELECT to_regclass('inference.schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, checksum FROM inference.schema_migrations")
    return {row["version"]: row["checksum"] for row in rows}


async def pending_migrations(conn: asyncpg.Connection) -> list[Migration]:
    done = await applied_versions(conn)
    return [m for m in available_migrations() if m.version not in done]


async def migrate(dsn: str) -> list[str]:
    """Apply what is missing; returns the versions applied by this call."""
    conn = await asyncpg.connect(dsn, timeout=10)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", locks.MIGRATIONS)
        try:
            await conn.execute(_BOOKKEEPING)
            done = await applied_versions(conn)
            for migration in available_migrations():
                if migration.version in done:
                    applied_text = done[migration.version]
                    if applied_text != migration.checksum and \
                            applied_text not in REWORDED.get(migration.version, ()):
                        log.warning("migration %s changed after it was applied",
                                    migration.version)
                    continue
                log.info("applying migration %s", migration.version)
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO inference.schema_migrations (version, checksum) "
                        "VALUES ($1, $2)",
                        migration.version,
                        migration.checksum,
                    )
                applied.append(migration.version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", locks.MIGRATIONS)
    finally:
        await conn.close()
    return applied


async def prepare_database(settings: Settings) -> list[str]:
    """Migrate, then hand the maintenance settings (retention, schedule) to the database."""
    from inference_gateway.db.maintenance import apply_maintenance_settings

    applied = await migrate(settings.database_url)
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        await apply_maintenance_settings(conn, settings)
    finally:
        await conn.close()
    return applied
