"""Migrations: each applied once; a reworded migration that changes nothing is not a warning."""

from __future__ import annotations

import logging

import asyncpg
import pytest

from inference_gateway.db.migrate import REWORDED, migrate


async def _set_checksum(url: str, version: str, checksum: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("UPDATE inference.schema_migrations SET checksum = $2 "
                           "WHERE version = $1", version, checksum)
    finally:
        await conn.close()


async def test_reworded_migrations_are_up_to_date(database_url: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    assert await migrate(database_url) == []  # the session's database is migrated already
    version, earlier = next(iter(REWORDED.items()))
    conn = await asyncpg.connect(database_url)
    try:
        current = await conn.fetchval(
            "SELECT checksum FROM inference.schema_migrations WHERE version = $1", version)
    finally:
        await conn.close()
    try:
        with caplog.at_level(logging.WARNING, logger="inference_gateway.db.migrate"):
            await _set_checksum(database_url, version, next(iter(earlier)))
            assert await migrate(database_url) == []
            assert not caplog.records
            await _set_checksum(database_url, version, "0" * 64)
            assert await migrate(database_url) == []
        assert [r.getMessage() for r in caplog.records] == [
            f"migration {version} changed after it was applied"]
    finally:
        await _set_checksum(database_url, version, current)
