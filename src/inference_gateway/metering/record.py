"""The usage record: one metered request, as it is spooled and stored in ``inference.requests``.

The dataclass is the one list of the record's fields: the spool's JSON, the table's column list
and the row given to COPY all follow it. A field added later has a default, so that records
spooled by an older gateway still load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any

import orjson


@dataclass(slots=True)  # never changed once made; not frozen, whose __init__ costs 1.7x
class UsageRecord:
    """One metered request; each field is a column of ``inference.requests`` of the same name."""

    request_id: str
    organization_id: str
    instance_id: str
    model: str  # the served name, after MODEL_REWRITES
    requested_model: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    status: int
    streamed: bool
    disconnected: bool
    duration_ms: int
    ttfb_ms: int | None
    started_at: float  # seconds since the epoch
    completed_at: float
    cached_tokens: int = 0  # of prompt_tokens, those read from vLLM's prefix cache
    upstream_id: str | None = None  # the model server's id of its answer (resp_..., chatcmpl-...)
    replica: str | None = None  # the model server that answered (its base URL)
    api_key_id: int | None = None  # the key that named the tenant (inference.api_keys.id)

    def to_json(self) -> bytes:
        return orjson.dumps(self)  # orjson serialises dataclasses natively, and fast

    @classmethod
    def from_json(cls, data: bytes) -> UsageRecord:
        members: dict[str, Any] = orjson.loads(data)
        return cls(**members)


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(UsageRecord))

# The record's values in the order of COLUMNS, as one C call.
values: attrgetter[tuple[Any, ...]] = attrgetter(*COLUMNS)


class _RandomIds:
    """Random (version 4) UUIDs from random bytes fetched 4 KiB at a time: one system call per
    256 ids rather than one each (about 3 us an id with ``uuid.uuid4`` here, 1 us so)."""

    SIZE = 4096

    def __init__(self) -> None:
        self._bytes = b""
        self._at = self.SIZE
        # A forked worker must never hand out its parent's bytes.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._bytes, self._at = b"", self.SIZE

    def next(self) -> str:
        at = self._at
        if at >= self.SIZE:
            self._bytes, at = os.urandom(self.SIZE), 0
        self._at = at + 16
        raw = bytearray(self._bytes[at:at + 16])
        raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
        raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 4122 variant
        h = raw.hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


new_request_id = _RandomIds().next
