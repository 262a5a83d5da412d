"""W3C trace context: continue the client's trace and hand it on to the model server.

With traces on, a request's spans get their ids here, on the request path (a few random
bytes), so that the upstream request can carry a ``traceparent`` naming the gateway's
upstream span: vLLM started with ``--otlp-traces-endpoint`` then puts its own spans under it.
A client's valid ``traceparent`` makes the gateway's request span its child; without one the
gateway starts a trace. The spans themselves are made later, off the request path, with these
ids (see ``observability.tracing``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import NamedTuple

_HEX = frozenset("0123456789abcdef")


class TraceIds(NamedTuple):
    trace_id: str  # 32 hex digits
    parent_id: str | None  # the client's span (16 hex digits), if it sent one
    server_id: str  # the gateway's span for the request
    client_id: str  # the gateway's span for the upstream call: vLLM's parent
    sampled: bool

    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.client_id}-{'01' if self.sampled else '00'}"


def _hex(text: str, size: int) -> bool:
    return len(text) == size and set(text) <= _HEX and text.strip("0") != ""


def parse(value: str | None) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a valid ``traceparent``, else None (and the
    gateway starts a trace of its own, as the W3C recommendation says)."""
    if not value:
        return None
    parts = value.strip().split("-")
    if len(parts) < 4:
        return None
    version, trace_id, parent_id, flags = parts[:4]
    if len(version) != 2 or not set(version) <= _HEX or version == "ff":
        return None
    if version == "00" and len(parts) != 4:
        return None
    if not (_hex(trace_id, 32) and _hex(parent_id, 16)) or len(flags) != 2 \
            or not set(flags) <= _HEX:
        return None
    return trace_id, parent_id, bool(int(flags, 16) & 1)


Sampler = Callable[[str], bool]  # whether a trace the gateway starts is recorded, by its id


def start(headers: Mapping[str, str], sampled: Sampler) -> TraceIds:
    """The ids of one request's spans, in the client's trace if it named one (and sampled as
    the client says); otherwise in a new trace, sampled as the tracer's sampler decides."""
    found = parse(headers.get("traceparent"))
    ids = os.urandom(16).hex()
    if found is None:
        trace_id = os.urandom(16).hex()
        return TraceIds(trace_id, None, ids[:16], ids[16:], sampled(trace_id))
    trace_id, parent_id, client_sampled = found
    return TraceIds(trace_id, parent_id, ids[:16], ids[16:], client_sampled)


def upstream_headers(base: list[tuple[str, str]], ids: TraceIds,
                     headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The upstream request's headers: ``base``, the ``traceparent`` of the gateway's upstream
    span, and, in the client's trace, the client's ``tracestate`` unchanged (a new trace
    starts without one)."""
    out = [*base, ("traceparent", ids.traceparent())]
    state = headers.get("tracestate") if ids.parent_id is not None else None
    if state:
        out.append(("tracestate", state))
    return out
