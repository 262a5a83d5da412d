"""State every endpoint shares: the configuration, the prefix cache, pacing and streaming.

The handlers of each endpoint family take one ``Engine``; it plays the part of vLLM's engine
(what was cached, how long a token takes) and of its web layer (how a body is read, which
models exist).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from inference_gateway.simulator.cache import CacheUse, PrefixCache
from inference_gateway.simulator.config import SimConfig
from inference_gateway.simulator.validation import SimError, dump, not_found_model, parse_body

ERROR_HEADER = "X-Simulate-Error"  # force an error status for fault tests
VLLM_VERSION = "0.32.0"
SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
YIELD_EVERY = 256  # choices or events built between two turns of the event loop


def new_id(prefix: str) -> str:
    """An id as vLLM makes them: a prefix and 16 hex digits."""
    return f"{prefix}{uuid.uuid4().hex[:16]}"


def sse(obj: Any) -> bytes:
    return b"data: " + dump(obj) + b"\n\n"


def typed_sse(event: str, obj: Any) -> bytes:
    """An event of the Responses and Messages streams: the type on its own line."""
    return b"event: " + event.encode() + b"\ndata: " + dump(obj) + b"\n\n"


class Engine:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(0)
        self.started = int(time.time())
        self.fingerprint = f"vllm-{VLLM_VERSION}-{uuid.uuid4().hex[:8]}"
        self.cache = PrefixCache(config.block_size, config.cache_blocks)

    async def body(self, request: web.Request) -> dict[str, Any]:
        """The JSON body, validated the way vLLM's web layer does before any handler runs."""
        forced = request.headers.get(ERROR_HEADER, "")
        if forced.isdigit() and 400 <= int(forced) <= 599:
            status = int(forced)
            raise SimError(status, f"simulated error {status}",
                           "BadRequestError" if status < 500 else "InternalServerError")
        if self.config.error_rate and self.rng.random() < self.config.error_rate:
            raise SimError(500, "simulated internal error", "InternalServerError")
        raw = await request.read()
        return parse_body(raw, request.headers.get("Content-Type"),
                          self.config.check_content_type)

    def model(self, body: dict[str, Any]) -> str:
        """The served model a generation request names; the first one when it names none."""
        model = body.get("model")
        if model is None or model == "":
            return self.config.models[0]
        if model not in self.config.models:
            raise not_found_model(model, self.config.models)
        return str(model)

    def pooling_model(self, body: dict[str, Any]) -> str:
        """As ``model``, but vLLM's pooling endpoints word the 404 without aliases or param."""
        try:
            return self.model(body)
        except SimError:
            raise SimError(404, f"The model `{body.get('model')}` does not exist.",
                           "NotFoundError") from None

    def cache_use(self, model: str, prompt: Sequence[int]) -> CacheUse:
        return self.cache.use(model, prompt)

    def details(self, use: CacheUse) -> CacheUse | None:
        """The cache figures a usage reports: only with --enable-prompt-tokens-details."""
        return use if self.config.prompt_tokens_details else None

    async def pace_first(self) -> None:
        if self.config.ttft_ms:
            await asyncio.sleep(self.config.ttft_ms / 1000)

    async def pace_token(self) -> None:
        if self.config.tpot_ms:
            await asyncio.sleep(self.config.tpot_ms / 1000)

    async def pace_all(self, tokens: int) -> None:
        """The time a whole generation of ``tokens`` takes, for answers sent in one piece."""
        await self.pace_first()
        if self.config.tpot_ms and tokens > 1:
            await asyncio.sleep(self.config.tpot_ms * (tokens - 1) / 1000)

    async def open_stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": SSE_CONTENT_TYPE})
        await response.prepare(request)
        return response
