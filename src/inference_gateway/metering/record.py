"""The usage record: one metered request, as it is spooled and stored in ``inference.requests``."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One metered request, as it is spooled and stored in ``inference.requests``."""

    request_id: str
    organization_id: str
    instance_id: str
    model: str
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

    def to_json(self) -> bytes:
        return orjson.dumps(self)  # orjson serialises dataclasses natively, and fast

    @classmethod
    def from_json(cls, data: bytes) -> UsageRecord:
        fields: dict[str, Any] = orjson.loads(data)
        return cls(**fields)


COLUMNS = (
    "request_id",
    "organization_id",
    "instance_id",
    "model",
    "requested_model",
    "endpoint",
    "prompt_tokens",
    "completion_tokens",
    "status",
    "streamed",
    "disconnected",
    "duration_ms",
    "ttfb_ms",
    "started_at",
    "completed_at",
)


def new_request_id() -> str:
    return str(uuid.uuid4())
