"""Reads a client's JSON request body: which model, whether it streams, what to change upstream.

The body is forwarded byte for byte unless the gateway has to change it: a model alias is
rewritten to the served name, and a chat or completions stream is asked to report usage so it
can be metered. What the gateway cannot meter or must not pass on is refused here, with a 400
that says why, before anything is forwarded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from inference_gateway.errors import GatewayError
from inference_gateway.proxy.endpoints import Endpoint

# Members that ask for a number of tokens to generate, by endpoint family.
_TOKEN_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# vLLM accepts a top_k of any size and its engine then fails with a 500; no vocabulary is larger.
MAX_TOP_K = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Caps:
    """The operator's ceilings on what one request may ask for (None: no ceiling)."""

    max_n: int | None = None
    max_tokens: int | None = None


@dataclass(slots=True)  # never changed once made; not frozen: 1.0 us to make, plain 0.2
class Payload:
    model: str
    stream: bool
    # What the client itself asked of a chat or completions stream; the rest is hidden from it.
    client_usage: bool
    client_continuous_usage: bool
    previous_response_id: str | None
    fields: dict[str, Any]


def _as_int(value: object) -> int | None:
    """A number as vLLM's validation reads it (ints, integral floats, numeric strings)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def choices(fields: dict[str, Any]) -> int:
    """How many answers a request asks for (``n``): vLLM counts its prompt once for each."""
    n = _as_int(fields.get("n"))
    return n if n is not None and n > 1 else 1


def _check_caps(fields: dict[str, Any], caps: Caps) -> None:
    top_k = _as_int(fields.get("top_k"))
    if top_k is not None and not -1 <= top_k <= MAX_TOP_K:
        raise GatewayError(400, f"top_k must be -1 (off) or from 0 to {MAX_TOP_K}, got {top_k}",
                           param="top_k", code="invalid_value")
    n = _as_int(fields.get("n"))
    if caps.max_n is not None and n is not None and n > caps.max_n:
        raise GatewayError(400, f"n must be at most {caps.max_n}, got {n}", param="n",
                           code="n_too_large")
    if caps.max_tokens is None:
        return
    for name in _TOKEN_LIMITS:
        value = _as_int(fields.get(name))
        if value is not None and value > caps.max_tokens:
            raise GatewayError(400, f"{name} must be at most {caps.max_tokens}, got {value}",
                               param=name, code="max_tokens_too_large")


def _check_responses(fields: dict[str, Any]) -> str | None:
    """Refuse what would escape metering or tenancy; return ``previous_response_id``."""
    if fields.get("background") not in (None, False):
        raise GatewayError(
            400, "background responses are not supported by this gateway: their usage could "
            "not be metered; send the request without `background`",
            param="background", code="unsupported_parameter")
    if "request_id" in fields:
        raise GatewayError(
            400, "request_id is chosen by the model server; it names stored responses, so a "
            "client may not set it", param="request_id", code="unsupported_parameter")
    previous = fields.get("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or not previous):
        raise GatewayError(400, "previous_response_id must be a non-empty string",
                           param="previous_response_id", code="invalid_type")
    return previous


def parse(raw: bytes, endpoint: Endpoint, caps: Caps = Caps()) -> Payload:
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
    stream_value = fields.get("stream")
    if stream_value is not None and not isinstance(stream_value, bool):
        raise GatewayError(400, "stream must be true or false", param="stream",
                           code="invalid_type")
    if stream_value is True and not endpoint.streams:
        # vLLM would answer the chat batch with one body whose usage undercounts the choices.
        raise GatewayError(400, f"{endpoint.path} does not stream; send it without `stream`",
                           param="stream", code="unsupported_parameter")
    _check_caps(fields, caps)
    previous = _check_responses(fields) if endpoint.shape == "responses" else None
    stream = stream_value is True
    options = fields.get("stream_options")
    client_usage = client_continuous = False
    if isinstance(options, dict):
        client_usage = options.get("include_usage") is True
        client_continuous = options.get("continuous_usage_stats") is True
    return Payload(model, stream, client_usage, client_continuous, previous, fields)


def asks_for_usage(endpoint: Endpoint, payload: Payload) -> bool:
    """Whether the gateway must ask for a stream's usage: vLLM adds none to a chat or
    completions stream unless asked (the other families always report theirs)."""
    return (payload.stream and endpoint.shape == "openai"
            and not (payload.client_usage and payload.client_continuous_usage))


def upstream_body(raw: bytes, endpoint: Endpoint, payload: Payload, served_model: str) -> bytes:
    """The body to send upstream: the client's own bytes when nothing has to change."""
    changes: dict[str, Any] = {}
    if served_model != payload.model:
        changes["model"] = served_model
    if asks_for_usage(endpoint, payload):
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
