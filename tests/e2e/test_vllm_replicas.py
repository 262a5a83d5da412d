"""Two real vLLM servers behind one model name: both serve, every record equals vLLM's usage,
and prefix affinity keeps prompts that share a long beginning on the replica that cached it.
"""

from __future__ import annotations

import asyncio
import random
import re
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import SERVED_MODEL, VllmServer, async_sdk, row_async

from harness import Proc, start_gateway

WORDS = ("river", "stone", "cloud", "lamp", "orbit", "maple", "quartz", "harbor", "violet",
         "ember", "canyon", "meadow", "signal", "timber", "copper", "lantern")


def _pair(session_tmp: Path, database_url: str, first: VllmServer, second: VllmServer,
          **env: str) -> Proc:
    return start_gateway(session_tmp, database_url, first.url,
                         MODEL_SERVICE_PORT_MAP=f"{SERVED_MODEL}={first.url}|{second.url}",
                         **env)


@pytest.fixture(scope="module")
def pair(session_tmp: Path, database_url: str, vllm: VllmServer,
         vllm_second: VllmServer) -> Iterator[Proc]:
    proc = _pair(session_tmp, database_url, vllm, vllm_second)
    yield proc
    proc.stop()


def _counter(server: VllmServer, name: str) -> float:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(re.escape(name) + r"\{[^}]*\} (\S+)",
                                                      text))


async def test_both_replicas_serve_and_records_equal_vllms_usage(
    pair: Proc, database_url: str, tenant: tuple[str, str], vllm: VllmServer,
    vllm_second: VllmServer,
) -> None:
    async with async_sdk(pair.url, tenant) as client:
        limit = asyncio.Semaphore(6)

        async def one(i: int) -> tuple[str, tuple[int, int]]:
            async with limit:
                if i % 2:
                    raw = await client.chat.completions.with_raw_response.create(
                        model=SERVED_MODEL, max_tokens=3 + i % 4, temperature=0,
                        messages=[{"role": "user", "content": "Hello! " * (1 + i % 3)}],
                        extra_body={"ignore_eos": True})
                else:
                    raw = await client.completions.with_raw_response.create(
                        model=SERVED_MODEL, max_tokens=3 + i % 4, temperature=0,
                        prompt="The quick brown fox " * (1 + i % 3),
                        extra_body={"ignore_eos": True})
                usage = raw.parse().usage
                assert usage is not None
                return raw.headers["X-Request-Id"], (usage.prompt_tokens, usage.completion_tokens)

        answers = await asyncio.gather(*(one(i) for i in range(24)))
        rows = await row_async(database_url, [request_id for request_id, _ in answers])
        for (_, usage), stored in zip(answers, rows, strict=True):
            assert (stored["prompt_tokens"], stored["completion_tokens"]) == usage
    served = Counter(r["replica"] for r in rows)
    assert set(served) == {vllm.url, vllm_second.url}, served


async def _prefix_hits(gateway: Proc, tenant: tuple[str, str], servers: list[VllmServer],
                       seed: int) -> tuple[float, float]:
    """Six prompt beginnings of about 300 tokens, four requests each, one at a time: the hits
    and queries of the prefix cache they caused on the two servers together."""
    rng = random.Random(seed)
    prefixes = [" ".join(rng.choice(WORDS) for _ in range(80)) for _ in range(6)]
    before = [(_counter(s, "vllm:prefix_cache_hits_total"),
               _counter(s, "vllm:prefix_cache_queries_total")) for s in servers]
    async with async_sdk(gateway.url, tenant) as client:
        for round_ in range(4):
            for prefix in prefixes:
                await client.completions.create(model=SERVED_MODEL, max_tokens=1,
                                                prompt=f"{prefix} question {round_}")
    await asyncio.sleep(1)  # vLLM's counters are updated a little after it answers
    after = [(_counter(s, "vllm:prefix_cache_hits_total"),
              _counter(s, "vllm:prefix_cache_queries_total")) for s in servers]
    hits = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    queries = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    return hits, queries


async def test_prefix_affinity_raises_cache_hits(
    pair: Proc, session_tmp: Path, database_url: str, tenant: tuple[str, str],
    vllm: VllmServer, vllm_second: VllmServer,
) -> None:
    servers = [vllm, vllm_second]
    plain_hits, plain_queries = await _prefix_hits(pair, tenant, servers, seed=1)
    affine = _pair(session_tmp, database_url, vllm, vllm_second, PREFIX_AFFINITY_CHARS="300")
    try:
        affine_hits, affine_queries = await _prefix_hits(affine, tenant, servers, seed=2)
    finally:
        affine.stop()
    plain, with_affinity = plain_hits / plain_queries, affine_hits / affine_queries
    print(f"\nprefix cache hit rate over both replicas: {plain:.1%} without affinity, "
          f"{with_affinity:.1%} with it ({plain_hits:.0f} and {affine_hits:.0f} tokens of "
          f"{plain_queries:.0f} and {affine_queries:.0f} queried)")
    assert with_affinity > plain
