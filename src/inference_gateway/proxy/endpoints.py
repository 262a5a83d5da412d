"""Which ``/v1`` paths the gateway forwards: exactly those whose usage it can read.

A path vLLM serves but the gateway cannot meter would be served for free, and vLLM's
management paths (loading LoRA adapters, say) must never be reachable by a tenant; so the
gateway forwards an allow-list, not a prefix. ``FORWARDED_ENDPOINTS`` narrows it; it cannot
widen it, since every entry here has a usage reader and a test against the real vLLM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from inference_gateway.errors import Dialect, GatewayError
from inference_gateway.metering.readers import Shape
from inference_gateway.settings import ConfigError

RoutedBy = Literal["model", "response"]
RESPONSE_ID = "{id}"  # stands for a stored response's id in a path
_RESPONSE_ID_CHARS = re.compile(r"[A-Za-z0-9_\-]{1,128}")


@dataclass(frozen=True, slots=True)
class Endpoint:
    path: str  # as vLLM serves it; RESPONSE_ID stands for a response id
    method: str
    shape: Shape  # how the usage in its answers reads
    dialect: Dialect  # how the gateway's own errors read
    streams: bool  # a request may ask for server-sent events
    bills: bool  # the usage in its answer is billed (not when it only counts or reads back)
    routed_by: RoutedBy  # the body's model, or the stored response the path names
    generates: bool  # it generates tokens (what a request reserves against token limits)


def _ep(path: str, shape: Shape = "openai", *, method: str = "POST", streams: bool = False,
        bills: bool = True, dialect: Dialect = "openai", routed_by: RoutedBy = "model",
        generates: bool = True) -> Endpoint:
    return Endpoint(path, method, shape, dialect, streams, bills, routed_by,
                    generates and bills)


ENDPOINTS: tuple[Endpoint, ...] = (
    _ep("/v1/chat/completions", streams=True),
    _ep("/v1/chat/completions/batch"),
    _ep("/v1/completions", streams=True),
    _ep("/v1/embeddings", generates=False),
    _ep("/v1/score", generates=False),
    _ep("/v1/rerank", generates=False),
    _ep("/v1/responses", "responses", streams=True),
    _ep("/v1/responses/{id}", "responses", method="GET", bills=False, routed_by="response"),
    _ep("/v1/responses/{id}/cancel", "responses", bills=False, routed_by="response"),
    _ep("/v1/messages", "anthropic", streams=True, dialect="anthropic"),
    _ep("/v1/messages/count_tokens", "anthropic", bills=False, dialect="anthropic"),
)
KNOWN_PATHS: tuple[str, ...] = tuple(e.path for e in ENDPOINTS)


def dialect_of(path: str) -> Dialect:
    """The error dialect of a path, also for paths that are not forwarded at all."""
    return "anthropic" if path == "/v1/messages" or path.startswith("/v1/messages/") \
        else "openai"


def is_normal(raw_path: str) -> bool:
    """Whether a request path, as sent, names itself plainly.

    The router sees the decoded, normalized path, so ``/v1/../x`` or ``/v1/chat%2Fcompletions``
    would otherwise be taken for another path than the client wrote.
    """
    path = raw_path.partition("?")[0]
    if path[:1] == "/" and "/." not in path and "%" not in path and "\\" not in path:
        return True  # every segment follows a slash: none is a dot segment, nothing encoded
    lowered = path.lower()
    if "%2f" in lowered or "%5c" in lowered or "%2e" in lowered or "\\" in path:
        return False
    return not any(segment in (".", "..") for segment in path.split("/"))


def not_normal() -> GatewayError:
    return GatewayError(400, "the path must be plain: no dot segments, encoded slashes or "
                        "encoded dots", code="invalid_path")


def check_forwarded(paths: tuple[str, ...] | None) -> None:
    """``FORWARDED_ENDPOINTS`` may only name endpoints the gateway can meter."""
    unknown = [p for p in paths or () if p not in KNOWN_PATHS]
    if unknown:
        raise ConfigError(f"invalid FORWARDED_ENDPOINTS: {', '.join(unknown)}: not an endpoint "
                          f"the gateway can meter; choose from {', '.join(KNOWN_PATHS)}")


class EndpointTable:
    """The forwarded endpoints, looked up by method and path on every request."""

    def __init__(self, paths: tuple[str, ...] | None = None) -> None:
        check_forwarded(paths)
        chosen = [e for e in ENDPOINTS if paths is None or e.path in paths]
        self._exact = {(e.method, e.path): e for e in chosen if RESPONSE_ID not in e.path}
        self._by_id = {(e.method, e.path.replace(RESPONSE_ID, "", 1)): e
                       for e in chosen if RESPONSE_ID in e.path}
        self.paths = tuple(e.path for e in chosen)
        self.exact = tuple(self._exact)  # (method, path) of those without a response id

    def match(self, method: str, path: str) -> tuple[Endpoint, str | None] | None:
        """The endpoint for a request and the response id its path names, or None."""
        endpoint = self._exact.get((method, path))
        if endpoint is not None:
            return endpoint, None
        if not self._by_id or not path.startswith("/v1/responses/"):
            return None
        rest = path[len("/v1/responses/"):]
        response_id, slash, tail = rest.partition("/")
        if not _RESPONSE_ID_CHARS.fullmatch(response_id):
            return None
        key = (method, "/v1/responses/" + slash + tail)
        endpoint = self._by_id.get(key)
        return None if endpoint is None else (endpoint, response_id)
