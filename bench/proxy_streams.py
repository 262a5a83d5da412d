"""A small asyncio client for streamed chat completions: time to first token, total time, and
whether the events arrived one by one, for many streams at once.

Time to first token is measured from just before the request is sent to the first body bytes
(the role chunk, which vLLM sends when the first token is ready). ``reads`` counts the separate
reads the body arrived in: a proxy that buffered the stream would deliver it in a few large
reads instead of one per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp


@dataclass
class StreamSample:
    status: int
    ttft_s: float  # to the first body bytes; NaN when none arrived
    total_s: float
    events: int  # "data:" lines received
    reads: int  # separate reads the body arrived in
    done: bool  # "data: [DONE]" was seen

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done


def session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=120),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120),
        auto_decompress=False,
    )


async def one_stream(http: aiohttp.ClientSession, url: str, body: bytes,
                     headers: Mapping[str, str],
                     on_first: Callable[[], None] | None = None) -> StreamSample:
    start = time.perf_counter()
    first = float("nan")
    events = reads = 0
    tail = b""
    async with http.post(url, data=body, headers=dict(headers)) as resp:
        async for chunk in resp.content.iter_any():
            if reads == 0:
                first = time.perf_counter() - start
                if on_first is not None:
                    on_first()
            reads += 1
            # Count "data:" at line starts; an event split across two reads is counted once.
            window = tail + chunk
            events += window.count(b"\ndata:") - tail.count(b"\ndata:")
            if reads == 1 and window.startswith(b"data:"):
                events += 1
            tail = window[-16:]
        status = resp.status
    total = time.perf_counter() - start
    return StreamSample(status, first, total, events, reads, tail.endswith(b"[DONE]\n\n"))


async def sequential(url: str, body: bytes, headers: Mapping[str, str], duration: float,
                     minimum: int) -> list[StreamSample]:
    """One stream at a time until ``duration`` has passed and ``minimum`` streams were read."""
    samples: list[StreamSample] = []
    async with session() as http:
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline or len(samples) < minimum:
            samples.append(await one_stream(http, url, body, headers))
    return samples


async def rounds(url: str, body: bytes, headers: Mapping[str, str], concurrency: int,
                 duration: float, minimum_rounds: int) -> list[StreamSample]:
    """``concurrency`` streams started together, again and again until ``duration`` passed."""
    samples: list[StreamSample] = []
    async with session() as http:
        deadline = time.monotonic() + duration
        done_rounds = 0
        while time.monotonic() < deadline or done_rounds < minimum_rounds:
            results = await asyncio.gather(
                *(one_stream(http, url, body, headers) for _ in range(concurrency)),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    samples.append(StreamSample(0, float("nan"), float("nan"), 0, 0, False))
                else:
                    samples.append(result)
            done_rounds += 1
    return samples


@dataclass
class HeldStreams:
    opened: int  # streams whose first bytes arrived
    failed: int  # streams that ended or failed while they should have been open
    open_seconds: float  # how long it took until every stream was open


async def hold(url: str, body: bytes, headers: Mapping[str, str], count: int,
               while_open: Callable[[], Awaitable[None]],
               open_timeout: float = 120) -> HeldStreams:
    """Open ``count`` long streams at once, call ``while_open`` once all are flowing, hang up."""
    opened = 0
    all_open = asyncio.Event()

    def first() -> None:
        nonlocal opened
        opened += 1
        if opened == count:
            all_open.set()

    start = time.monotonic()
    async with session() as http:
        tasks = [asyncio.create_task(one_stream(http, url, body, headers, first))
                 for _ in range(count)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_open.wait(), open_timeout)
        open_seconds = time.monotonic() - start
        await while_open()
        failed = sum(1 for t in tasks if t.done())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return HeldStreams(opened, failed, round(open_seconds, 2))
