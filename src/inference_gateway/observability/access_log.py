"""``ACCESS_LOG=json``: one JSON line per request on standard output.

The request path only puts a tuple on a queue; a thread of its own formats the lines and writes
them, so a slow or blocked standard output never holds up the event loop. Lines not yet written
when the process stops are written by ``close``.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson

from inference_gateway.errors import GatewayError
from inference_gateway.metering.record import UsageRecord
from inference_gateway.observability.offload import Offload
from inference_gateway.proxy.relay import Outcome


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def finished_line(instance: str, record: UsageRecord, sent: float | None,
                  first_chunk: float | None, done: float | None, offset: float) -> bytes:
    """A forwarded request; monotonic times become Unix time with ``offset``."""
    start = record.started_at - offset  # the monotonic clock when it arrived
    line = {
        "time": _time(record.completed_at), "kind": "request", "request_id": record.request_id,
        "organization_id": record.organization_id, "instance_id": record.instance_id,
        "model": record.model, "requested_model": record.requested_model,
        "endpoint": record.endpoint, "status": record.status, "streamed": record.streamed,
        "disconnected": record.disconnected, "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens, "cached_tokens": record.cached_tokens,
        "duration_ms": _ms(record.completed_at - record.started_at),
        "ttfb_ms": record.ttfb_ms,
        "ttft_ms": _ms(None if first_chunk is None else first_chunk - start),
        "upstream_ms": _ms(None if sent is None or done is None else done - sent),
        "replica": record.replica, "gateway": instance,
    }
    return orjson.dumps(line) + b"\n"


def refused_line(instance: str, at: float, path: str, status: int, code: str | None) -> bytes:
    """A request the gateway answered itself (no usage row)."""
    return orjson.dumps({"time": _time(at), "kind": "refused", "endpoint": path,
                         "status": status, "code": code, "gateway": instance}) + b"\n"


class AccessLog(Offload):
    """An ``Observer`` that hands each request to the writing thread."""

    def __init__(self, fd: int | None = None, instance: str = "") -> None:
        super().__init__("access-log")
        self._fd = sys.stdout.fileno() if fd is None else fd
        self._instance = instance or f"{os.uname().nodename}:{os.getpid()}"

    # -- the Observer (request path: one queue put) ---------------------------------------------

    def started(self) -> None:
        return

    def refused(self, path: str, error: GatewayError) -> None:
        self.put((time.time(), path, error.status, error.code))

    def finished(self, record: UsageRecord, outcome: Outcome) -> None:
        self.put((record, outcome.sent_at, outcome.first_chunk_at, outcome.upstream_done_at,
                  time.time() - time.monotonic()))

    # -- the writing thread ---------------------------------------------------------------------

    def handle(self, items: list[tuple[Any, ...]]) -> None:
        self._write(b"".join(self._line(item) for item in items))

    def _line(self, item: tuple[Any, ...]) -> bytes:
        if isinstance(item[0], UsageRecord):
            return finished_line(self._instance, *item)
        return refused_line(self._instance, *item)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except InterruptedError:
                continue
            except OSError:
                return  # standard output is gone: nothing to write to
            view = view[written:]
