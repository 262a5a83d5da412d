"""Helpers shared by the benchmarks: the dev database and scratch databases in it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent


def dev_database_url() -> str:
    subprocess.run([str(ROOT / "scripts" / "dev-postgres.sh")], check=True,
                   stdout=subprocess.DEVNULL)
    for line in (ROOT / ".dev" / "env").read_text().splitlines():
        if line.removeprefix("export ").startswith("DATABASE_URL="):
            return line.split("=", 1)[1]
    raise RuntimeError(".dev/env has no DATABASE_URL")


def dev_redis_url() -> str:
    """The project's dev Redis (started if need be), for the rate limits' counters."""
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"]
    subprocess.run([str(ROOT / "scripts" / "dev-redis.sh")], check=True,
                   stdout=subprocess.DEVNULL)
    for line in (ROOT / ".dev" / "env").read_text().splitlines():
        if line.removeprefix("export ").startswith("REDIS_URL="):
            return line.split("=", 1)[1]
    raise RuntimeError(".dev/env has no REDIS_URL")


async def scratch_database(admin_url: str, name: str) -> str:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return admin_url.rsplit("/", 1)[0] + "/" + name
