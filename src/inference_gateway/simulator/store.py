"""The Responses API store: what ``VLLM_ENABLE_RESPONSES_API_STORE=1`` keeps, but bounded.

vLLM keeps every stored response, its conversation and, for a streamed background response, all
its events, for as long as the server runs. Here only the last ``capacity`` responses are kept
(a background response dropped while running is cancelled), and the events of only the last
``STREAM_LOGS`` background streams.
"""

from __future__ import annotations

import asyncio
from array import array
from collections import OrderedDict
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

STREAM_LOGS = 100


@dataclass
class Stored:
    response: dict[str, Any]  # the object GET answers with
    conversation: array[int] = field(default_factory=lambda: array("H"))  # prompt and output ids
    task: asyncio.Task[None] | None = None  # the generation of a background response


class EventLog:
    """The events of one background stream, for its first reader and for later ones."""

    def __init__(self) -> None:
        self.events: list[bytes] = []
        self.finished = False
        self._changed = asyncio.Event()

    def append(self, event: bytes) -> None:
        self.events.append(event)
        self._wake()

    def finish(self) -> None:
        self.finished = True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def follow(self, start: int = 0) -> AsyncGenerator[bytes, None]:
        """Every event from ``start`` on, waiting for new ones until the stream ends."""
        index = start
        while True:
            changed = self._changed
            while index < len(self.events):
                yield self.events[index]
                index += 1
            if self.finished:
                return
            await changed.wait()


class ResponseStore:
    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._responses: OrderedDict[str, Stored] = OrderedDict()
        self._streams: OrderedDict[str, EventLog] = OrderedDict()

    def get(self, response_id: str) -> Stored | None:
        return self._responses.get(response_id)

    def put(self, response_id: str, stored: Stored) -> None:
        self._responses[response_id] = stored
        self._responses.move_to_end(response_id)
        while len(self._responses) > self.capacity:
            _, dropped = self._responses.popitem(last=False)
            if dropped.task is not None and not dropped.task.done():
                dropped.task.cancel()

    def update(self, response_id: str, response: dict[str, Any],
               conversation: array[int]) -> None:
        """Record a finished response, unless it was cancelled (or dropped) meanwhile."""
        stored = self._responses.get(response_id)
        if stored is not None and stored.response["status"] == "cancelled":
            return
        task = stored.task if stored is not None else None
        self.put(response_id, Stored(response, conversation, task))

    def new_log(self, response_id: str) -> EventLog:
        log = self._streams[response_id] = EventLog()
        while len(self._streams) > STREAM_LOGS:
            self._streams.popitem(last=False)
        return log

    def log(self, response_id: str) -> EventLog | None:
        return self._streams.get(response_id)
