"""The load model: which requests generate at once, which wait, and how full the KV cache is.

vLLM's scheduler counts sequences, not requests: one request with ``n`` = 3 over two prompts
shows as six running requests in its metrics, and a request that does not fit shows as that
many waiting (measured on vLLM 0.32). Here at most ``--max-num-seqs`` sequences run; a request
that does not fit waits, in arrival order, until enough have finished. Unlike vLLM, a request
is admitted whole, never some of its choices first; one alone always runs, however large.

Each sequence holds KV-cache blocks for its prompt and what it has generated so far; the full
blocks of a prompt are held once for all choices of a request, as vLLM's prefix cache shares
them. A request also waits while the blocks it will need at its end do not fit beside what the
running ones will need at theirs, so a replica with a small cache queues rather than fails.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass


@dataclass(eq=False)
class Job:
    """One request as the scheduler sees it."""

    prompts: list[int]  # prompt tokens of each prompt
    n: int  # choices per prompt
    max_tokens: int  # tokens each sequence generates at most
    produced: int = 0  # tokens each sequence has generated so far

    @property
    def seqs(self) -> int:
        return self.n * len(self.prompts)

    def blocks(self, size: int, produced: int | None = None) -> int:
        """KV-cache blocks held after ``produced`` tokens (by default, those made so far)."""
        made = self.produced if produced is None else produced
        total = 0
        for prompt in self.prompts:
            shared = prompt // size
            total += shared + self.n * (-(-(prompt + made) // size) - shared)
        return total


class Scheduler:
    def __init__(self, max_seqs: int, blocks: int, block_size: int) -> None:
        self.max_seqs = max(1, max_seqs)
        self.capacity = max(1, blocks)
        self.block_size = max(1, block_size)
        self.running: list[Job] = []
        self.running_seqs = 0
        self._reserved = 0  # blocks the running jobs will hold at their end
        self._queue: deque[tuple[Job, asyncio.Future[None]]] = deque()

    @property
    def waiting_seqs(self) -> int:
        return sum(job.seqs for job, _ in self._queue)

    def usage(self) -> float:
        """``vllm:kv_cache_usage_perc``: the share of the cache's blocks now held."""
        held = sum(job.blocks(self.block_size) for job in self.running)
        return min(1.0, held / self.capacity)

    async def admit(self, job: Job) -> None:
        """Return once ``job`` runs; wait behind earlier requests while it does not fit."""
        if not self._queue and self._fits(job):
            self._start(job)
            return
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((job, ticket))
        try:
            await ticket
        except asyncio.CancelledError:  # the client left, or a background response was cancelled
            if ticket.done() and not ticket.cancelled():
                self.release(job)
            else:
                self._queue.remove((job, ticket))
                self._wake()
            raise

    def release(self, job: Job) -> None:
        self.running.remove(job)
        self.running_seqs -= job.seqs
        self._reserved -= self._final_blocks(job)
        self._wake()

    def _final_blocks(self, job: Job) -> int:
        return job.blocks(self.block_size, job.max_tokens)

    def _fits(self, job: Job) -> bool:
        if not self.running:
            return True
        return (self.running_seqs + job.seqs <= self.max_seqs
                and self._reserved + self._final_blocks(job) <= self.capacity)

    def _start(self, job: Job) -> None:
        self.running.append(job)
        self.running_seqs += job.seqs
        self._reserved += self._final_blocks(job)

    def _wake(self) -> None:
        """Start the requests at the head of the queue, in order, while they fit."""
        while self._queue and self._fits(self._queue[0][0]):
            job, ticket = self._queue.popleft()
            if ticket.cancelled():
                continue
            self._start(job)
            ticket.set_result(None)
