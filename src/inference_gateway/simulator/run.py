"""One generation request in the engine: admitted, paced, counted, and broken where asked.

A request joins the scheduler when its first token is wanted, so one refused before that
(vLLM's engine failing on it) never counts. From admission its tokens are due on a clock:
the first after ``--ttft-ms``, each next one ``--tpot-ms`` later, as vLLM generates them
whether or not the client keeps up; the clock stands still while a fault stalls the answer.
A client that leaves cancels the handler, and with it the request, which frees its place and
counts the tokens due by then, as vLLM aborts a request whose client has gone.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from aiohttp import web

from inference_gateway.simulator.config import SimConfig
from inference_gateway.simulator.faults import (
    FAULT,
    NONE,
    PAUSED,
    BrokenOff,
    Faults,
    reset_connection,
)
from inference_gateway.simulator.load import Job
from inference_gateway.simulator.metrics import Core


class Run:
    def __init__(self, core: Core, job: Job, cached: int, config: SimConfig, faults: Faults,
                 request: web.BaseRequest | None) -> None:
        self.core, self.job, self.cached, self.config = core, job, cached, config
        self.faults, self.request = faults, request
        self.fault = request.get(FAULT, NONE) if request is not None else NONE
        self.started: float | None = None  # the loop's time at admission

    async def __aenter__(self) -> Run:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self.started is not None:
            if exc is not None and not isinstance(exc, BrokenOff):  # the client left
                self._count_due()
            self.core.scheduler.release(self.job)

    @property
    def paused(self) -> float:
        return self.request.get(PAUSED, 0.0) if self.request is not None else 0.0

    def _since_first_token(self) -> float:
        """Milliseconds since the first token was due (negative before it)."""
        assert self.started is not None
        now = asyncio.get_running_loop().time()
        return (now - self.started - self.paused) * 1000 - self.config.ttft_ms

    def _count_due(self) -> None:
        """Count the tokens made by now, for a request that ends before its answer is out."""
        elapsed, job, tpot = self._since_first_token(), self.job, self.config.tpot_ms
        if elapsed < 0:
            return
        due = job.max_tokens if not tpot else min(job.max_tokens, int(elapsed // tpot) + 1)
        if due > job.produced:
            self.core.generated((due - job.produced) * job.seqs)
            job.produced = due

    async def _admit(self) -> None:
        await self.core.scheduler.admit(self.job)
        job = self.job
        self.core.prefill(sum(job.prompts) * job.n, self.cached)
        self.started = asyncio.get_running_loop().time() - self.paused

    async def advance(self, tokens: int = 1) -> None:
        """Wait until each sequence's next ``tokens`` tokens are due, then count them."""
        if self.started is None:
            await self._admit()
        if tokens <= 0:
            return
        job = self.job
        target = job.produced + tokens
        delay = ((target - 1) * self.config.tpot_ms - self._since_first_token()) / 1000
        if delay > 0:
            await asyncio.sleep(delay)
        self.core.generated(tokens * job.seqs)
        job.produced = target

    async def generate(self) -> None:
        """Every token of an answer sent whole. With time per token, in steps of a KV block, so
        the cache fills as it goes; a fault breaks or stalls it after its number of tokens."""
        job, fault = self.job, self.fault
        marks = {min(n, job.max_tokens) for n in (fault.break_after, fault.stall_after)
                 if n is not None}
        step = self.core.scheduler.block_size if self.config.tpot_ms else job.max_tokens
        for mark in sorted({*marks, job.max_tokens}):
            while job.produced < mark or self.started is None:
                await self.advance(min(step, mark - job.produced))
            if mark == fault.stall_after and self.request is not None:
                await self.faults.stall(self.request)
            if mark == fault.break_after and self.request is not None:
                raise await reset_connection(self.request)
