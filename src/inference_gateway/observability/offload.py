"""Work the request path hands to a thread of its own: one queue put, nothing that waits.

The thread takes what has queued up, in batches, and hands it to ``handle``. ``close`` lets it
finish what was queued before it returns (for at most ``CLOSE_TIMEOUT_SEC``).
"""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from typing import Any

log = logging.getLogger(__name__)

BATCH = 256
CLOSE_TIMEOUT_SEC = 5.0


class Offload(ABC):
    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def put(self, item: tuple[Any, ...]) -> None:
        """The request path's one call."""
        self._queue.put(item)

    @abstractmethod
    def handle(self, items: list[tuple[Any, ...]]) -> None:
        """What the thread does with a batch (each observer its own)."""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(CLOSE_TIMEOUT_SEC)
            self._thread = None

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            items = [item for item in batch if item is not None]
            if items:
                try:
                    self.handle(items)
                except Exception:  # one bad batch must not stop the thread
                    log.exception("%s: could not handle %d items", self._name, len(items))
            if len(items) < len(batch):
                return
