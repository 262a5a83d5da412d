"""Reads a client's JSON request body: which model, whether it streams, what to change upstream.

The body is forwarded byte for byte unless the gateway has to change it: a model alias is
rewritten to the served name, and a stream is asked to report usage so it can be metered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from inference_gateway.proxy.errors import GatewayError


@dataclass(frozen=True, slots=True)
class Payload:
    model: str
    stream: bool
    # What the client itself asked of a stream; the gateway hides the rest from it.
    client_usage: bool
    client_continuous_usage: bool
    fields: dict[str, Any]


def parse(raw: bytes) -> Payload:
    """Validate the parts the gateway relies on; 400 with a clear message otherwise."""
    if not raw:
        raise GatewayError(400, "request body is empty; expected a JSON object",
                           code="invalid_json")
    try:
        fields = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(400, f"request body is not valid JSON: {exc}",
                           code="invalid_json") from None
    if not isinstance(fields, dict):
        raise GatewayError(400, "request body must be a JSON object", code="invalid_json")
    model = fields.get("model")
    if model is None:
        raise GatewayError(400, "you must provide a model parameter", param="model",
                           code="missing_model")
    if not isinstance(model, str) or not model:
        raise GatewayError(400, "model must be a non-empty string", param="model",
                           code="invalid_model")
    stream = fields.get("stream") is True
    options = fields.get("stream_options")
    client_usage = client_continuous = False
    if isinstance(options, dict):
        client_usage = options.get("include_usage") is True
        client_continuous = options.get("continuous_usage_stats") is True
    return Payload(model, stream, client_usage, client_continuous, fields)


def upstream_body(raw: bytes, payload: Payload, served_model: str) -> bytes:
    """The body to send upstream: the client's own bytes when nothing has to change."""
    changes: dict[str, Any] = {}
    if served_model != payload.model:
        changes["model"] = served_model
    if payload.stream and not (payload.client_usage and payload.client_continuous_usage):
        options = payload.fields.get("stream_options")
        if options is None or isinstance(options, dict):
            changes["stream_options"] = {
                **(options or {}),
                "include_usage": True,
                "continuous_usage_stats": True,
            }
    if not changes:
        return raw
    return orjson.dumps({**payload.fields, **changes})
