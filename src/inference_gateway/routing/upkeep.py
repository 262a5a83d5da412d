"""Keeping the replica sets true, in the background: health probes, load scrapes, DNS.

* Every ``HEALTH_INTERVAL_SEC`` each replica's ``/health`` is probed: a failure takes it out
  of rotation, a pass after a failure brings it back with a growing share (see ``replicas``).
* Every ``SCRAPE_INTERVAL_SEC`` each replica's ``/metrics`` gives its running and waiting
  requests and its KV cache use: the load the rest of the fleet puts on it; and its token
  counters, which ``/metrics`` of the gateway sets beside the tokens it billed.
* Every ``DNS_INTERVAL_SEC`` the DNS names are resolved again; replicas follow the addresses.
* Drained replicas with no request left are retired.

The I/O is the caller's (``fetch``), so routing needs no HTTP client of its own.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from inference_gateway.background import stop
from inference_gateway.routing.replicas import Replica
from inference_gateway.routing.router import DNS_PREFIX, Router

log = logging.getLogger(__name__)

HEALTH_INTERVAL_SEC = 2.0
SCRAPE_INTERVAL_SEC = 1.0
DNS_INTERVAL_SEC = 5.0
PROBE_TIMEOUT_SEC = 2.0
_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
_KV_CACHE = "vllm:kv_cache_usage_perc"
_LOAD = (_RUNNING, _WAITING, _KV_CACHE)
# Exactly these: vLLM also has vllm:prompt_tokens_cached_total and others of the same stem.
PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"
_WANTED = frozenset((*_LOAD, PROMPT_TOKENS, GENERATION_TOKENS))

# (base URL, path, timeout) → (status, body); raises OSError or TimeoutError when unreachable.
Fetch = Callable[[str, str, float], Awaitable[tuple[int, bytes]]]
Resolve = Callable[[str, int], Awaitable[set[str]]]


def read_samples(text: bytes) -> dict[str, float]:
    """The samples the router keeps from a vLLM ``/metrics`` page, each summed over its label
    sets (one per engine); a name the page does not have is not in the result."""
    found: dict[str, float] = {}
    for raw in text.splitlines():
        if not raw.startswith(b"vllm:"):
            continue
        line = raw.decode("utf-8", "replace")
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in _WANTED:
            try:
                found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            except (ValueError, IndexError):
                continue
    return found


def _load(found: dict[str, float]) -> tuple[float, float, float] | None:
    if not any(name in found for name in _LOAD):
        return None
    return (found.get(_RUNNING, 0.0), found.get(_WAITING, 0.0),
            min(max(found.get(_KV_CACHE, 0.0), 0.0), 1.0))


def read_load(text: bytes) -> tuple[float, float, float] | None:
    """Running and waiting requests and KV cache use from a vLLM ``/metrics`` page."""
    return _load(read_samples(text))


async def resolve_all(host: str, port: int) -> set[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return {str(info[4][0]) for info in infos}


class Upkeep:
    """The background loops of one process's router."""

    def __init__(self, router: Router, fetch: Fetch, resolve: Resolve = resolve_all,
                 scrape: bool = True) -> None:
        self.router = router
        self._fetch = fetch
        self._resolve = resolve
        self._scrape = scrape
        self._tasks: list[asyncio.Task[None]] = []
        # Each replica's vllm:prompt_tokens_total and vllm:generation_tokens_total, by URL.
        self.vllm_tokens: dict[str, tuple[float, float]] = {}

    def start(self) -> None:
        loops: list[tuple[str, Callable[[], Awaitable[None]], float]] = [
            ("health probes", self.probe_all, HEALTH_INTERVAL_SEC),
            ("replica sets", self.refresh_sets, DNS_INTERVAL_SEC),
        ]
        if self._scrape:
            loops.append(("load scrapes", self.scrape_all, SCRAPE_INTERVAL_SEC))
        for name, work, interval in loops:
            self._tasks.append(asyncio.create_task(self._every(name, work, interval),
                                                   name=name))

    async def close(self) -> None:
        await stop(self._tasks)
        self._tasks.clear()

    async def _every(self, name: str, work: Callable[[], Awaitable[None]],
                     interval: float) -> None:
        while True:
            try:
                await work()
            except Exception as exc:  # the loop must go on; a failure is one replica's
                log.warning("%s: %s: %s", name, type(exc).__name__, exc)
            await asyncio.sleep(interval)

    # -- the work -------------------------------------------------------------------------------

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(r) for r in list(self.router.replicas())))

    async def probe(self, replica: Replica) -> None:
        try:
            status, _ = await self._fetch(replica.url, "/health", PROBE_TIMEOUT_SEC)
            ok = status == 200
        except (OSError, TimeoutError):
            ok = False
        if ok and not replica.healthy:
            log.info("replica %s is healthy again", replica.url)
            # Back from down: what failed while it was gone is forgiven, and it ramps up.
            replica.back_at = time.monotonic()
            replica.failures = 0
            replica.ejected_until = 0.0
        elif not ok and replica.healthy:
            log.warning("replica %s failed its health probe", replica.url)
        replica.healthy = ok

    async def scrape_all(self) -> None:
        await asyncio.gather(*(self.scrape(r) for r in list(self.router.replicas())
                               if r.healthy))

    async def scrape(self, replica: Replica) -> None:
        try:
            status, body = await self._fetch(replica.url, "/metrics", PROBE_TIMEOUT_SEC)
        except (OSError, TimeoutError):
            return
        found = read_samples(body) if status == 200 else {}
        if PROMPT_TOKENS in found and GENERATION_TOKENS in found:
            self.vllm_tokens[replica.url] = (found[PROMPT_TOKENS], found[GENERATION_TOKENS])
        load = _load(found)
        if load is None:
            return
        replica.remote_running, replica.remote_waiting, replica.kv_cache = load
        replica.own_at_scrape = replica.in_flight
        replica.scraped_at = time.monotonic()

    async def refresh_sets(self) -> None:
        for model, names in self.router.dns.items():
            urls: set[str] = set()
            for name in names:
                parts = urlsplit(name.removeprefix(DNS_PREFIX))
                assert parts.hostname is not None and parts.port is not None
                try:
                    addresses = await self._resolve(parts.hostname, parts.port)
                except OSError as exc:
                    log.warning("cannot resolve %s (%s); keeping its replicas", name, exc)
                    urls |= {r.url for r in self.router.sets[model].replicas}
                    continue
                for address in addresses:
                    host = f"[{address}]" if ":" in address else address
                    urls.add(f"{parts.scheme}://{host}:{parts.port}{parts.path.rstrip('/')}")
            self.router.discovered(model, urls)
        for url in self.router.retire_drained():
            self.vllm_tokens.pop(url, None)
            log.info("replica %s is drained and retired", url)
