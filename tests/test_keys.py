"""API keys end to end: created with the CLI, used by the OpenAI SDK alone, revoked."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import openai
import pytest

from harness import Proc, start_gateway, wait_rows

REFRESH_SEC = 0.5
# How long to wait for a reload to show, before failing. How soon it shows is the reload
# interval's business: tests/test_tenancy.py::test_each_cache_is_reloaded_every_its_own_interval.
DEADLINE_SEC = 20.0


def cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inference_gateway", *args],
        env={**os.environ, "DATABASE_URL": database_url, "LOG_LEVEL": "WARNING"},
        capture_output=True, text=True, timeout=30, check=False,
    )


def create_key(database_url: str, org: str, inst: str) -> str:
    result = cli(database_url, "keys", "create", "--org", org, "--instance", inst)
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key.startswith("igw_") and len(key) == 47
    assert key[:12] in result.stderr and key not in result.stderr
    return key


def sdk(gateway: Proc, key: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0,
                         default_headers=headers or None)


def chat(client: openai.OpenAI) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model="facebook/opt-125m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)


def fetchrow(database_url: str, query: str, *args: object) -> asyncpg.Record | None:
    async def run() -> asyncpg.Record | None:
        conn = await asyncpg.connect(database_url)
        try:
            return await conn.fetchrow(query, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def either(session_tmp: Path, database_url: str, simulator: Proc) -> Iterator[Proc]:
    proc = start_gateway(session_tmp, database_url, simulator.url,
                         API_KEY_CACHE_REFRESH_INTERVAL_SEC=str(REFRESH_SEC))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def keys_only(session_tmp: Path, database_url: str, simulator: Proc) -> Iterator[Proc]:
    proc = start_gateway(session_tmp, database_url, simulator.url, AUTH_MODE="keys",
                         API_KEY_CACHE_REFRESH_INTERVAL_SEC=str(REFRESH_SEC))
    yield proc
    proc.stop()


def wait_usable(client: openai.OpenAI, within: float = DEADLINE_SEC) -> None:
    """A new key works once the gateway's next reload has seen it."""
    deadline = time.monotonic() + within
    while True:
        try:
            chat(client)
            return
        except openai.AuthenticationError:
            assert time.monotonic() < deadline, "the key never started working"
            time.sleep(0.05)


def test_key_alone_names_the_tenant(
    either: Proc, database_url: str, tenant: tuple[str, str]
) -> None:
    org, inst = tenant
    key = create_key(database_url, org, inst)
    client = sdk(either, key)  # no tenant headers at all
    wait_usable(client)
    response = chat(client)
    assert response.usage is not None
    rows = asyncio.run(wait_rows(database_url, "organization_id = $1", (org,), 2))
    assert len(rows) == 2  # the request that found the key usable, and this one
    assert {(r["organization_id"], r["instance_id"]) for r in rows} == {(org, inst)}
    assert rows[-1]["completion_tokens"] == response.usage.completion_tokens


def test_key_is_stored_hashed_and_last_use_is_recorded(
    either: Proc, database_url: str, tenant: tuple[str, str]
) -> None:
    key = create_key(database_url, *tenant)
    row = fetchrow(database_url, "SELECT * FROM inference.api_keys WHERE prefix = $1", key[:12])
    assert row is not None
    assert bytes(row["key_hash"]) == hashlib.sha256(key.encode()).digest()
    assert key not in {str(v) for v in dict(row).values()}
    assert row["last_used_at"] is None and row["revoked_at"] is None
    wait_usable(sdk(either, key))
    deadline = time.monotonic() + DEADLINE_SEC
    while (row := fetchrow(database_url, "SELECT last_used_at FROM inference.api_keys "
                           "WHERE prefix = $1", key[:12]))["last_used_at"] is None:  # type: ignore[index]
        assert time.monotonic() < deadline, "last_used_at was never written"
        time.sleep(0.05)
    listing = cli(database_url, "keys", "list", "--org", tenant[0]).stdout
    assert key[:12] in listing and key not in listing


def test_revoked_key_gets_401(
    either: Proc, database_url: str, tenant: tuple[str, str]
) -> None:
    key = create_key(database_url, *tenant)
    client = sdk(either, key)
    wait_usable(client)
    revoke = cli(database_url, "keys", "revoke", key[:12])
    assert revoke.returncode == 0, revoke.stderr
    deadline = time.monotonic() + DEADLINE_SEC
    while True:
        try:
            chat(client)
        except openai.AuthenticationError as err:
            assert err.code == "invalid_api_key"
            break
        assert time.monotonic() < deadline, "the revoked key still works"
        time.sleep(0.05)
    assert cli(database_url, "keys", "revoke", key[:12]).returncode == 1  # already revoked
    listing = cli(database_url, "keys", "list", "--org", tenant[0]).stdout
    line = next(line for line in listing.splitlines() if line.startswith(key[:12]))
    assert line.split("\t")[-1] != "-"  # revoked_at


def test_unknown_key_401(either: Proc) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        chat(sdk(either, "igw_" + "x" * 43, **{"X-TEMBO-ORG": "o", "X-TEMBO-INSTANCE": "i"}))
    assert err.value.code == "invalid_api_key"


def test_mismatched_headers_403(either: Proc, database_url: str, tenant: tuple[str, str]) -> None:
    org, inst = tenant
    key = create_key(database_url, org, inst)
    wait_usable(sdk(either, key))
    assert chat(sdk(either, key, **{"X-TEMBO-ORG": org, "X-TEMBO-INSTANCE": inst})).usage
    for headers in ({"X-TEMBO-ORG": "someone-else"},
                    {"X-TEMBO-ORG": org, "X-TEMBO-INSTANCE": "another-instance"}):
        with pytest.raises(openai.PermissionDeniedError) as err:
            chat(sdk(either, key, **headers))
        assert err.value.code == "tenant_mismatch"


def test_either_mode_keeps_the_header_flow(either: Proc, tenant: tuple[str, str]) -> None:
    org, inst = tenant
    assert chat(sdk(either, "unused", **{"X-TEMBO-ORG": org, "X-TEMBO-INSTANCE": inst})).usage


def test_keys_mode_refuses_headers_alone(
    keys_only: Proc, database_url: str, tenant: tuple[str, str]
) -> None:
    org, inst = tenant
    for token in ("unused", "sk-proj-not-ours"):
        with pytest.raises(openai.AuthenticationError):
            chat(sdk(keys_only, token, **{"X-TEMBO-ORG": org, "X-TEMBO-INSTANCE": inst}))
    key = create_key(database_url, org, inst)
    wait_usable(sdk(keys_only, key))
    assert chat(sdk(keys_only, key)).usage


def test_create_rejects_bad_ids(database_url: str) -> None:
    result = cli(database_url, "keys", "create", "--org", "", "--instance", "i")
    assert result.returncode == 2 and "organization" in result.stderr
    assert cli(database_url, "keys", "revoke", f"igw_{uuid.uuid4().hex[:8]}").returncode == 1
