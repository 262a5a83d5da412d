"""Shared fixtures: a real Postgres database with migrations applied, a simulator, a gateway."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from inference_gateway.db.migrate import migrate

from harness import ROOT, Proc, start_gateway, start_simulator


def _admin_url() -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        return url
    subprocess.run([str(ROOT / "scripts" / "dev-postgres.sh")], check=True,
                   stdout=subprocess.DEVNULL)
    for line in (ROOT / ".dev" / "env").read_text().splitlines():
        if line.removeprefix("export ").startswith("DATABASE_URL="):
            return line.split("=", 1)[1]
    raise RuntimeError(".dev/env has no DATABASE_URL")


def _with_db(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


async def _recreate(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def admin_url() -> str:
    return _admin_url()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The rate limiter's Redis: TEST_REDIS_URL, or the project's own (started if need be)."""
    url = os.environ.get("TEST_REDIS_URL")
    if url:
        return url
    subprocess.run([str(ROOT / "scripts" / "dev-redis.sh")], check=True,
                   stdout=subprocess.DEVNULL)
    for line in (ROOT / ".dev" / "env").read_text().splitlines():
        if line.startswith("export REDIS_URL="):
            return line.split("=", 1)[1]
    raise RuntimeError(".dev/env has no REDIS_URL")


@pytest.fixture(scope="session")
def database_url(admin_url: str) -> Iterator[str]:
    """A fresh database for this test session, migrated, dropped at the end.

    Named after the process so that two test runs against one cluster do not collide.
    """
    name = f"gateway_test_{os.getpid()}"
    url = _with_db(admin_url, name)
    asyncio.run(_recreate(admin_url, name))
    asyncio.run(migrate(url))
    yield url
    asyncio.run(_drop(admin_url, name))


async def _drop(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("procs")


@pytest.fixture(scope="session")
def simulator(session_tmp: Path) -> Iterator[Proc]:
    proc = start_simulator(session_tmp, "--model", "facebook/opt-125m", "--model", "other-model")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def gateway(session_tmp: Path, database_url: str, simulator: Proc) -> Iterator[Proc]:
    proc = start_gateway(session_tmp, database_url, simulator.url,
                         MODEL_REWRITES="gpt-alias:facebook/opt-125m")
    yield proc
    proc.stop()


@pytest.fixture
def tenant() -> tuple[str, str]:
    """An organization and instance no other test uses, so rows can be found by them."""
    tag = uuid.uuid4().hex[:12]
    return f"org-{tag}", f"inst-{tag}"
