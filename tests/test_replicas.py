"""Several simulator replicas behind one model name: how the gateway shares the load."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from harness import Proc, start_gateway, start_simulator, wait_rows

MODEL = "facebook/opt-125m"
CONNECTIONS = 32


async def _load(gateway: Proc | list[Proc], tenant: tuple[str, str], requests: int,
                body: dict[str, object]) -> list[str]:
    """``requests`` requests over ``CONNECTIONS`` connections (spread over the gateways);
    their request ids."""
    ids: list[str] = []
    queue = iter(range(requests))
    headers = {"X-TEMBO-ORG": tenant[0], "X-TEMBO-INSTANCE": tenant[1]}
    gateways = gateway if isinstance(gateway, list) else [gateway]

    async def client(session: aiohttp.ClientSession, url: str) -> None:
        for _ in queue:
            async with session.post(f"{url}/v1/chat/completions", json=body,
                                    headers=headers) as response:
                assert response.status == 200, await response.text()
                await response.read()
                ids.append(response.headers["X-Request-Id"])

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session, gateways[i % len(gateways)].url)
                               for i in range(CONNECTIONS)))
    return ids


async def _shares(database_url: str, tenant: tuple[str, str], count: int) -> Counter[str]:
    rows = await wait_rows(database_url, "organization_id = $1", (tenant[0],), count)
    assert len(rows) == count
    return Counter(r["replica"] for r in rows)


def _stack(tmp: Path, database_url: str, tpot_ms: list[float]) -> tuple[Proc, list[Proc]]:
    sims = [start_simulator(tmp, "--model", MODEL, "--tpot-ms", str(t), "--ttft-ms", str(t))
            for t in tpot_ms]
    urls = "|".join(s.url for s in sims)
    gateway = start_gateway(tmp, database_url, sims[0].url,
                            MODEL_SERVICE_PORT_MAP=f"{MODEL}={urls}")
    return gateway, sims


def _fleet(tmp: Path, database_url: str, sims: list[Proc]) -> list[Proc]:
    """Two gateway instances of two workers each: four processes, each with its own counts."""
    urls = "|".join(s.url for s in sims)
    return [start_gateway(tmp, database_url, sims[0].url, WEBSERVER_WORKERS="2",
                          MODEL_SERVICE_PORT_MAP=f"{MODEL}={urls}") for _ in range(2)]


BODY = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


async def test_a_slow_replica_gets_less(session_tmp: Path, database_url: str,
                                        tenant: tuple[str, str]) -> None:
    gateway, sims = _stack(session_tmp, database_url, [5, 5, 20])  # the third is 4x slower
    try:
        ids = await _load(gateway, tenant, 600, BODY)
        shares = await _shares(database_url, tenant, len(ids))
    finally:
        gateway.stop()
        for sim in sims:
            sim.stop()
    fast = [shares[sims[0].url], shares[sims[1].url]]
    slow = shares[sims[2].url]
    assert sum(shares.values()) == 600 and slow > 0, shares
    assert slow <= min(fast) / 3, shares


async def test_equal_replicas_get_equal_shares(session_tmp: Path, database_url: str,
                                               tenant: tuple[str, str]) -> None:
    gateway, sims = _stack(session_tmp, database_url, [5, 5, 5])
    try:
        ids = await _load(gateway, tenant, 900, BODY)
        shares = await _shares(database_url, tenant, len(ids))
    finally:
        gateway.stop()
        for sim in sims:
            sim.stop()
    counts = [shares[s.url] for s in sims]
    # Equal in expectation: each within three deviations of a fair three-way split of 900
    # (42 requests). The simulators share the machine's cores with the test, and the balancer
    # rightly sends less to one that a busy moment slowed (283 against 315 came up).
    fair, deviation = len(ids) / 3, (len(ids) * (1 / 3) * (2 / 3)) ** 0.5
    assert all(abs(count - fair) <= 3 * deviation for count in counts), shares


async def test_the_balance_holds_across_workers_and_gateways(
    session_tmp: Path, database_url: str, tenant: tuple[str, str]
) -> None:
    """Each of four processes knows only its own requests in flight; what the replicas' /metrics
    say of the others' makes them share the load as one process would."""
    sims = [start_simulator(session_tmp, "--model", MODEL, "--tpot-ms", str(t), "--ttft-ms",
                            str(t)) for t in (5, 5, 20)]  # the third is 4x slower
    gateways = _fleet(session_tmp, database_url, sims)
    try:
        ids = await _load(gateways, tenant, 900, BODY)
        shares = await _shares(database_url, tenant, len(ids))
    finally:
        for proc in [*gateways, *sims]:
            proc.stop()
    fast = [shares[sims[0].url], shares[sims[1].url]]
    slow = shares[sims[2].url]
    assert sum(shares.values()) == 900 and slow > 0, shares
    # A third of a fast one's share, give or take four deviations of a fair count (127 against
    # 400 and 373 came up); a balancer that ignored load would give it as many as the others.
    assert slow <= sum(fast) / 6 + 4 * slow ** 0.5, shares
    # Four processes choosing on their own see ties the same and break them at random: the two
    # fast replicas split like fair coins at best (the difference's deviation is the square
    # root of their sum), so they may differ by four deviations, about 28% here, and no more.
    assert abs(fast[0] - fast[1]) <= 4 * sum(fast) ** 0.5, shares


async def test_a_busy_replica_is_skipped_and_the_request_served_once(
    session_tmp: Path, database_url: str, tenant: tuple[str, str]
) -> None:
    """A replica that answers 503 (busy, draining) before any byte: the request goes to the
    other one, is generated once and stored once, and the busy one is left alone for a while."""
    gateway, sims = _stack(session_tmp, database_url, [0, 0])
    busy, other = sims
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{busy.url}/simulate/faults", json={"status": 503}) as r:
                assert r.status == 200
            ids = await _load(gateway, tenant, 40, BODY)
        shares = await _shares(database_url, tenant, len(ids))
        assert shares == Counter({other.url: 40}), shares
    finally:
        gateway.stop()
        for sim in sims:
            sim.stop()


def test_operators_see_the_replicas(session_tmp: Path, database_url: str) -> None:
    import os
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    token = "t" * 40
    sims = [start_simulator(session_tmp, "--model", MODEL) for _ in range(2)]
    urls = "|".join(s.url for s in sims)
    gateway = start_gateway(session_tmp, database_url, sims[0].url, ADMIN_TOKEN=token,
                            MODEL_SERVICE_PORT_MAP=f"{MODEL}={urls}")

    def command() -> str:
        result = subprocess.run(
            [sys.executable, "-m", "inference_gateway", "replicas", "--url", gateway.url],
            env={**os.environ, "ADMIN_TOKEN": token}, capture_output=True, text=True,
            timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout

    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{gateway.url}/status/replicas")
        assert refused.value.code == 401
        table = command()
        assert all(f"{s.url}  up" in table for s in sims), table
        sims[1].stop()
        deadline = time.monotonic() + 10
        while f"{sims[1].url}  down" not in (table := command()):
            assert time.monotonic() < deadline, table
            time.sleep(0.2)
        assert f"{sims[0].url}  up" in table
    finally:
        gateway.stop()
        for sim in sims:
            sim.stop()
