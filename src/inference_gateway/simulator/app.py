"""HTTP handlers of the simulator, shaped like vLLM 0.32's OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from inference_gateway.simulator import tokens

ERROR_HEADER = "X-Simulate-Error"  # force an error status for fault tests


@dataclass
class SimConfig:
    models: list[str] = field(default_factory=lambda: ["facebook/opt-125m"])
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    max_model_len: int = 2048
    default_max_tokens: int = 16
    error_rate: float = 0.0
    embedding_dim: int = 16


class SimError(Exception):
    def __init__(self, status: int, message: str, err_type: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.err_type, self.param = status, message, err_type, param


def _error(status: int, message: str, err_type: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _usage(prompt: int, completion: int | None) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": prompt, "total_tokens": prompt + (completion or 0)}
    usage["completion_tokens"] = completion if completion is not None else 0
    usage["prompt_tokens_details"] = None
    return usage


def _stream_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion,
            "completion_tokens": completion}


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class Simulator:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(0)

    # -- common ---------------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict[str, Any]:
        forced = request.headers.get(ERROR_HEADER)
        if forced:
            status = int(forced)
            raise SimError(status, f"simulated error {status}",
                           "BadRequestError" if status < 500 else "InternalServerError")
        if self.config.error_rate and self.rng.random() < self.config.error_rate:
            raise SimError(500, "simulated internal error", "InternalServerError")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise SimError(400, f"JSON decode error: {exc}", "Bad Request", "body") from None
        if not isinstance(body, dict):
            raise SimError(400, "Input should be a valid dictionary", "Bad Request", "body")
        model = body.get("model")
        if model not in self.config.models:
            raise SimError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        options = body.get("stream_options")
        if options is not None and body.get("stream") is not True:
            raise SimError(400, "Stream options can only be defined when `stream=True`.",
                           "BadRequestError")
        return body

    def _max_tokens(self, body: dict[str, Any], prompt_tokens: int, key: str) -> int:
        value = body.get(key)
        if value is None and key == "max_completion_tokens":
            value = body.get("max_tokens")
        if value is None:
            value = self.config.default_max_tokens
        if not isinstance(value, int) or value < 1:
            raise SimError(400, f"{key} must be at least 1, got {value}.", "BadRequestError")
        if prompt_tokens + value > self.config.max_model_len:
            raise SimError(
                400,
                f"'max_tokens' or 'max_completion_tokens' is too large: {value}. This model's "
                f"maximum context length is {self.config.max_model_len} tokens and your request "
                f"has {prompt_tokens} input tokens ({value} > {self.config.max_model_len} - "
                f"{prompt_tokens}).",
                "BadRequestError",
            )
        return value

    async def _pace_first(self) -> None:
        if self.config.ttft_ms:
            await asyncio.sleep(self.config.ttft_ms / 1000)

    async def _pace_token(self) -> None:
        if self.config.tpot_ms:
            await asyncio.sleep(self.config.tpot_ms / 1000)

    # -- chat -----------------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise SimError(400, "Field required", "Bad Request", "body.messages")
            prompt = tokens.chat_prompt_tokens(messages)
            max_tokens = self._max_tokens(body, prompt, "max_completion_tokens")
            n = int(body.get("n") or 1)
        except SimError as exc:
            return _error(exc.status, exc.message, exc.err_type, exc.param)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        model = body["model"]
        if body.get("stream") is True:
            return await self._chat_stream(request, body, rid, created, model, prompt,
                                           max_tokens, n)
        await self._pace_first()
        for _ in range(max_tokens - 1):
            await self._pace_token()
        choices: list[dict[str, Any]] = [
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": " ".join(tokens.output_words(max_tokens, i)),
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "tool_calls": [],
                    "reasoning": None,
                    "reasoning_content": None,
                },
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "token_ids": None,
            }
            for i in range(n)
        ]
        response = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": None,
            "usage": _usage(prompt, max_tokens * n),
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "kv_transfer_params": None,
        }
        return web.Response(body=orjson.dumps(response), content_type="application/json")

    async def _chat_stream(
        self, request: web.Request, body: dict[str, Any], rid: str, created: int, model: str,
        prompt: int, max_tokens: int, n: int,
    ) -> web.StreamResponse:
        options = body.get("stream_options") or {}
        include_usage = options.get("include_usage") is True
        continuous = include_usage and options.get("continuous_usage_stats") is True
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}

        def chunk(choice: dict[str, Any], completion: int) -> dict[str, Any]:
            obj = {**base, "choices": [choice]}
            if continuous:
                obj["usage"] = _stream_usage(prompt, completion)
            return obj

        await self._pace_first()
        for i in range(n):
            first = {"index": i, "delta": {"role": "assistant", "content": ""},
                     "logprobs": None, "finish_reason": None}
            await response.write(_sse(chunk(first, 0)))
        words = [tokens.output_words(max_tokens, i) for i in range(n)]
        for t in range(max_tokens):
            if t:
                await self._pace_token()
            for i in range(n):
                last = t == max_tokens - 1
                choice: dict[str, Any] = {
                    "index": i,
                    "delta": {"content": (" " if t else "") + words[i][t]},
                    "logprobs": None,
                    "finish_reason": "length" if last else None,
                }
                if last:
                    choice["stop_reason"] = None
                await response.write(_sse(chunk(choice, t + 1)))
        if include_usage:
            final = {**base, "choices": [], "usage": _stream_usage(prompt, max_tokens * n)}
            await response.write(_sse(final))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # -- completions ----------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request)
            prompt_field = body.get("prompt")
            prompts = prompt_field if isinstance(prompt_field, list) else [prompt_field]
            if prompt_field is None or not all(isinstance(p, str) for p in prompts):
                raise SimError(400, "Field required", "Bad Request", "body.prompt")
            prompt_counts = [max(tokens.count(str(p)), 1) for p in prompts]
            max_tokens = self._max_tokens(body, max(prompt_counts), "max_tokens")
            n = int(body.get("n") or 1)
        except SimError as exc:
            return _error(exc.status, exc.message, exc.err_type, exc.param)
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        model = body["model"]
        prompt = sum(prompt_counts)
        total_choices = n * len(prompts)
        if body.get("stream") is True:
            return await self._completion_stream(request, body, rid, created, model, prompt,
                                                 max_tokens, total_choices)
        await self._pace_first()
        for _ in range(max_tokens - 1):
            await self._pace_token()
        choices = [
            {
                "index": i,
                "text": " " + " ".join(tokens.output_words(max_tokens, i)),
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "token_ids": None,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
            }
            for i in range(total_choices)
        ]
        response = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": None,
            "usage": _usage(prompt, max_tokens * total_choices),
            "kv_transfer_params": None,
        }
        return web.Response(body=orjson.dumps(response), content_type="application/json")

    async def _completion_stream(
        self, request: web.Request, body: dict[str, Any], rid: str, created: int, model: str,
        prompt: int, max_tokens: int, n: int,
    ) -> web.StreamResponse:
        options = body.get("stream_options") or {}
        include_usage = options.get("include_usage") is True
        continuous = include_usage and options.get("continuous_usage_stats") is True
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        base = {"id": rid, "object": "text_completion", "created": created, "model": model}
        words = [tokens.output_words(max_tokens, i) for i in range(n)]
        await self._pace_first()
        for t in range(max_tokens):
            if t:
                await self._pace_token()
            for i in range(n):
                last = t == max_tokens - 1
                choice = {
                    "index": i,
                    "text": " " + words[i][t],
                    "logprobs": None,
                    "finish_reason": "length" if last else None,
                    "stop_reason": None,
                }
                obj: dict[str, Any] = {**base, "choices": [choice]}
                if continuous:
                    obj["usage"] = _stream_usage(prompt, t + 1)
                await response.write(_sse(obj))
        if include_usage:
            final = {**base, "choices": [], "usage": _stream_usage(prompt, max_tokens * n)}
            await response.write(_sse(final))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # -- embeddings and the rest ----------------------------------------------------------------

    async def embeddings(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            items = body.get("input")
            inputs = items if isinstance(items, list) else [items]
            if items is None or not all(isinstance(x, str) for x in inputs):
                raise SimError(400, "Field required", "Bad Request", "body.input")
        except SimError as exc:
            return _error(exc.status, exc.message, exc.err_type, exc.param)
        prompt = sum(max(tokens.count(str(x)), 1) for x in inputs)
        dim = self.config.embedding_dim
        data: list[dict[str, Any]] = [
            {"index": i, "object": "embedding",
             "embedding": [round(((i + 1) * (j + 1) % 97) / 97, 6) for j in range(dim)]}
            for i in range(len(inputs))
        ]
        response = {
            "id": f"embd-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": body["model"],
            "data": data,
            "usage": _usage(prompt, 0),
        }
        return web.Response(body=orjson.dumps(response), content_type="application/json")

    async def models(self, request: web.Request) -> web.Response:
        data: list[dict[str, Any]] = [
            {"id": m, "object": "model", "created": int(time.time()), "owned_by": "vllm",
             "root": m, "parent": None, "max_model_len": self.config.max_model_len,
             "permission": []}
            for m in self.config.models
        ]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}),
                            content_type="application/json")

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
        except SimError as exc:
            return _error(exc.status, exc.message, exc.err_type, exc.param)
        if "messages" in body:
            count = tokens.chat_prompt_tokens(body["messages"])
        else:
            count = tokens.count(str(body.get("prompt", "")))
        return web.json_response({"count": count, "max_model_len": self.config.max_model_len,
                                  "tokens": list(range(count)), "token_strs": None})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def not_found(self, request: web.Request) -> web.Response:
        return web.json_response({"detail": "Not Found"}, status=404)


def create_app(config: SimConfig) -> web.Application:
    sim = Simulator(config)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", sim.chat)
    app.router.add_post("/v1/completions", sim.completions)
    app.router.add_post("/v1/embeddings", sim.embeddings)
    app.router.add_get("/v1/models", sim.models)
    app.router.add_post("/tokenize", sim.tokenize)
    app.router.add_get("/health", sim.health)
    app.router.add_route("*", "/{tail:.*}", sim.not_found)
    return app
