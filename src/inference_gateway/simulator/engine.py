"""State every endpoint shares: the configuration, the prefix cache, the load, the faults.

The handlers of each endpoint family take one ``Engine``; it plays the part of vLLM's engine
(what was cached, who runs and who waits, what was counted) and of its web layer (how a body
is read, which models exist, which fault a request asked for).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from inference_gateway.simulator.cache import CacheUse, PrefixCache
from inference_gateway.simulator.config import SimConfig
from inference_gateway.simulator.faults import FAULT, Faults, FaultyStream, error
from inference_gateway.simulator.load import Job, Scheduler
from inference_gateway.simulator.metrics import Core
from inference_gateway.simulator.run import Run
from inference_gateway.simulator.validation import SimError, dump, not_found_model, parse_body

ERROR_HEADER = "X-Simulate-Error"  # force an error status, for clients that can send headers
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
        self.created = time.time()  # when the counters started, for their ``_created`` gauges
        self.fingerprint = f"vllm-{VLLM_VERSION}-{uuid.uuid4().hex[:8]}"
        self.cache = PrefixCache(config.block_size, config.cache_blocks)
        self.cores = {model: Core(Scheduler(config.max_num_seqs, config.kv_blocks,
                                            config.block_size))
                      for model in config.models}
        self.faults = Faults()

    async def body(self, request: web.Request) -> dict[str, Any]:
        """The JSON body, validated the way vLLM's web layer does before any handler runs;
        the fault the request asked for is kept with it, and a status is answered at once."""
        forced = request.headers.get(ERROR_HEADER, "")
        if forced.isdigit() and 400 <= int(forced) <= 599:
            raise error(int(forced))
        if self.config.error_rate and self.rng.random() < self.config.error_rate:
            raise SimError(500, "simulated internal error", "InternalServerError")
        raw = await request.read()
        body = parse_body(raw, request.headers.get("Content-Type"),
                          self.config.check_content_type)
        fault = request[FAULT] = self.faults.of(body)
        if fault.status is not None:
            raise error(fault.status)
        return body

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

    def run(self, request: web.Request | None, model: str, job: Job, cached: int) -> Run:
        """A generation request, to be used with ``async with``; ``cached``: prompt tokens its
        sequences found in the prefix cache. A background request has no ``request``."""
        return Run(self.cores[model], job, cached, self.config, self.faults, request)

    def pooled(self, model: str, prompt_tokens: int) -> None:
        """Count a pooling request: its prompt, nothing generated."""
        self.cores[model].prefill(prompt_tokens, 0)

    async def open_stream(self, request: web.Request) -> web.StreamResponse:
        response = FaultyStream(request, self.faults, headers={"Content-Type": SSE_CONTENT_TYPE})
        await response.prepare(request)
        return response
