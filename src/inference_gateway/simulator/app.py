"""HTTP handlers of the simulator, shaped like vLLM 0.32's OpenAI-compatible server.

Every JSON body, stream chunk and error has the members of vLLM 0.32.0's, in the same order
(``tests/e2e/test_simulator_conformance.py`` checks this against the real server). What differs
is the text, the token counts (see ``tokens``) and one default: without ``max_tokens`` the
simulator generates ``default_max_tokens`` tokens, where vLLM fills the context.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from inference_gateway.simulator import tokens

ERROR_HEADER = "X-Simulate-Error"  # force an error status for fault tests
VLLM_VERSION = "0.32.0"
SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
_UNSET = object()


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

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.err_type, "param": self.param,
                          "code": self.status}}
        return web.Response(status=self.status, body=orjson.dumps(body),
                            content_type="application/json")


def _checked(message: str, param: str, value: object = _UNSET) -> SimError:
    """vLLM's own argument checks: the parameter (and value) are appended to the message."""
    suffix = f"parameter={param}" if value is _UNSET else f"parameter={param}, value={value}"
    return SimError(400, f"{message} ({suffix})", "BadRequestError", param)


def _input(value: object) -> object:
    """How vLLM's request validation shows the offending input."""
    if isinstance(value, dict):
        return f"<dict of {len(value)} items>"
    if isinstance(value, list):
        return f"<list of {len(value)} items>"
    if value is None:
        return "None"
    return value


def _invalid(loc: str, kind: str, msg: str, value: object,
             ctx: dict[str, str] | None = None) -> SimError:
    """A request-validation error, worded as vLLM's FastAPI layer words it."""
    detail: dict[str, object] = {"type": kind, "loc": loc, "msg": msg, "input": _input(value)}
    if ctx is not None:
        detail["ctx"] = ctx
    return SimError(400, f"1 validation error:\n  {detail!r}", "Bad Request", loc)


def _int_field(body: dict[str, Any], name: str) -> int | None:
    """An optional integer member, converted as vLLM's validation converts it."""
    value = body.get(name)
    loc = f"body.{name}"
    if value is None or isinstance(value, bool | int):
        return None if value is None else int(value)
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise _invalid(loc, "int_from_float",
                       "Input should be a valid integer, got a number with a fractional part",
                       value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise _invalid(loc, "int_parsing",
                           "Input should be a valid integer, unable to parse string as an "
                           "integer", value) from None
    raise _invalid(loc, "int_type", "Input should be a valid integer", value)


def _bool_field(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None or isinstance(value, bool):
        return value is True
    if isinstance(value, int) and value in (0, 1):
        return value == 1
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise _invalid(f"body.{name}", "bool_parsing",
                   "Input should be a valid boolean, unable to interpret input", value)


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    """``usage`` of a whole response."""
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion,
            "completion_tokens": completion, "prompt_tokens_details": None,
            "completion_tokens_details": None}


def _stream_usage(prompt: int, completion: int) -> dict[str, Any]:
    """``usage`` of the final usage-only chunk, and of completion chunks."""
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion,
            "completion_tokens": completion}


def _chat_chunk_usage(prompt: int, completion: int) -> dict[str, Any]:
    """``usage`` of a chat chunk with ``continuous_usage_stats``."""
    return {**_stream_usage(prompt, completion), "completion_tokens_details": None}


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _filler_ids(n: int, salt: int = 0) -> list[int]:
    return [4 + (salt * 31 + i * 7) % (tokens.VOCAB_SIZE - 4) for i in range(n)]


@dataclass
class Generation:
    """What one request asked for, once validated."""

    model: str
    prompts: list[int]  # prompt tokens of each prompt (one for chat)
    max_tokens: int
    n: int
    stream: bool
    include_usage: bool
    continuous: bool
    return_token_ids: bool

    @property
    def choices(self) -> int:
        return self.n * len(self.prompts)


class Simulator:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(0)
        self.started = int(time.time())
        self.fingerprint = f"vllm-{VLLM_VERSION}-{uuid.uuid4().hex[:8]}"

    # -- common ---------------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict[str, Any]:
        """The JSON body, validated the way vLLM validates it before looking at the model."""
        forced = request.headers.get(ERROR_HEADER)
        if forced:
            status = int(forced)
            raise SimError(status, f"simulated error {status}",
                           "BadRequestError" if status < 500 else "InternalServerError")
        if self.config.error_rate and self.rng.random() < self.config.error_rate:
            raise SimError(500, "simulated internal error", "InternalServerError")
        raw = await request.read()
        if not raw:
            raise _invalid("body", "missing", "Field required", None)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            try:  # for the position and wording vLLM reports, which are the json module's
                json.loads(raw)
            except json.JSONDecodeError as exc:
                raise _invalid(f"body.{exc.pos}", "json_invalid", "JSON decode error", {},
                               {"error": exc.msg}) from None
            except UnicodeDecodeError:
                pass
            raise _invalid("body", "json_invalid", "JSON decode error", {},
                           {"error": "Invalid JSON"}) from None
        if not isinstance(body, dict):
            raise _invalid("body", "model_attributes_type",
                           "Input should be a valid dictionary or object to extract fields from",
                           body)
        return body

    def _model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if model is None or model == "":
            return self.config.models[0]  # vLLM serves its model when none is named
        if model not in self.config.models:
            raise SimError(
                404,
                f"The model `{model}` does not exist. "
                f"Valid aliases: {', '.join(self.config.models)}.",
                "NotFoundError",
                "model",
            )
        return str(model)

    def _generation(self, body: dict[str, Any], prompts: list[int], chat: bool) -> Generation:
        """Check the sampling members against the prompt, in the order vLLM checks them."""
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None \
            else "max_tokens"
        requested = _int_field(body, key)
        n = _int_field(body, "n")
        stream = _bool_field(body, "stream")
        options = body.get("stream_options")
        if options is not None and not stream:
            raise _checked("Stream options can only be defined when `stream=True`.",
                           "stream_options")
        model = self._model(body)
        limit = self.config.max_model_len
        if requested is not None and requested > limit:
            raise _checked(f"{key}={requested} cannot be greater than max_model_len={limit}. "
                           "Please request fewer output tokens.", key, requested)
        if chat and not body.get("messages"):
            raise SimError(400, "Cannot apply chat template to an empty conversation. Provide "
                           "at least one message.", "BadRequestError")
        for prompt in prompts:
            if prompt > limit:
                # vLLM stops tokenizing one token past the limit, hence "at least".
                raise _checked(
                    f"This model's maximum context length is {limit} tokens. However, your "
                    f"prompt contains at least {limit + 1} input tokens, which exceeds this "
                    "limit even without any output tokens. Please reduce the length of the "
                    "input prompt.", "input_tokens", limit + 1)
        wanted = self.config.default_max_tokens if requested is None else requested
        max_tokens = min(wanted, limit - max(prompts))  # generation stops at the context end
        if max_tokens < 1:
            raise _checked(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens",
                           max_tokens)
        n = 1 if n is None else n
        if n < 1:
            raise _checked(f"n must be at least 1, got {n}.", "n", n)
        temperature = body.get("temperature")
        if n > 1 and isinstance(temperature, int | float) and temperature == 0:
            raise SimError(400, f"n must be 1 when using greedy sampling, got {n}.",
                           "BadRequestError")
        options = options if isinstance(options, dict) else {}
        include_usage = stream and options.get("include_usage") is True
        return Generation(
            model=model, prompts=prompts, max_tokens=max_tokens, n=n, stream=stream,
            include_usage=include_usage,
            continuous=include_usage and options.get("continuous_usage_stats") is True,
            return_token_ids=body.get("return_token_ids") is True,
        )

    async def _pace_first(self) -> None:
        if self.config.ttft_ms:
            await asyncio.sleep(self.config.ttft_ms / 1000)

    async def _pace_token(self) -> None:
        if self.config.tpot_ms:
            await asyncio.sleep(self.config.tpot_ms / 1000)

    async def _pace_all(self, gen: Generation) -> None:
        await self._pace_first()
        for _ in range(gen.max_tokens - 1):
            await self._pace_token()

    async def _open_stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": SSE_CONTENT_TYPE})
        await response.prepare(request)
        return response

    def _final_chunk(self, base: dict[str, Any], gen: Generation) -> dict[str, Any]:
        """The usage-only chunk that closes a stream with ``include_usage``."""
        return {**base, "choices": [],
                "usage": _stream_usage(sum(gen.prompts), gen.max_tokens * gen.choices),
                "system_fingerprint": self.fingerprint}

    # -- chat -----------------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request)
            messages = body.get("messages", _UNSET)
            if messages is _UNSET:
                raise _invalid("body.messages", "missing", "Field required", body)
            if not isinstance(messages, list):
                raise _invalid("body.messages", "list_type", "Input should be a valid list",
                               messages)
            gen = self._generation(body, [tokens.chat_prompt_tokens(messages)], chat=True)
        except SimError as exc:
            return exc.response()
        rid = f"chatcmpl-{uuid.uuid4().hex[:16]}"
        created = int(time.time())
        if gen.stream:
            return await self._chat_stream(request, gen, rid, created)
        await self._pace_all(gen)
        prompt = gen.prompts[0]
        choices: list[dict[str, Any]] = []
        for i in range(gen.n):
            words = tokens.output_words(gen.max_tokens, i)
            choices.append({
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": " ".join(words),
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "reasoning": None,
                },
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "token_ids": [tokens.word_id(w) for w in words] if gen.return_token_ids
                else None,
                "routed_experts": None,
            })
        response = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": gen.model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": self.fingerprint,
            "usage": _usage(prompt, gen.max_tokens * gen.n),
            "prompt_logprobs": None,
            "prompt_token_ids": _filler_ids(prompt) if gen.return_token_ids else None,
            "prompt_text": None,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }
        return web.Response(body=orjson.dumps(response), content_type="application/json")

    async def _chat_stream(self, request: web.Request, gen: Generation, rid: str,
                           created: int) -> web.StreamResponse:
        response = await self._open_stream(request)
        base = {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": gen.model}
        prompt = gen.prompts[0]
        await self._pace_first()
        for i in range(gen.n):
            role: dict[str, Any] = {**base, "choices": [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}]}
            if gen.continuous:
                role["usage"] = _chat_chunk_usage(prompt, 0)
            role["prompt_token_ids"] = _filler_ids(prompt) if gen.return_token_ids else None
            role["prompt_text"] = None
            await response.write(_sse(role))
        words = [tokens.output_words(gen.max_tokens, i) for i in range(gen.n)]
        for t in range(gen.max_tokens):
            if t:
                await self._pace_token()
            last = t == gen.max_tokens - 1
            for i in range(gen.n):
                word = words[i][t]
                choice: dict[str, Any] = {"index": i,
                                          "delta": {"content": (" " if t else "") + word},
                                          "logprobs": None,
                                          "finish_reason": "length" if last else None}
                if last:
                    choice["stop_reason"] = None
                choice["token_ids"] = [tokens.word_id(word)] if gen.return_token_ids else None
                chunk: dict[str, Any] = {**base, "choices": [choice]}
                if gen.continuous:
                    chunk["usage"] = _chat_chunk_usage(prompt, t + 1)
                if last and not gen.include_usage:
                    chunk["system_fingerprint"] = self.fingerprint
                await response.write(_sse(chunk))
        if gen.include_usage:
            await response.write(_sse(self._final_chunk(base, gen)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # -- completions ----------------------------------------------------------------------------

    @staticmethod
    def _prompts(body: dict[str, Any]) -> list[int]:
        """Prompt tokens of each prompt: a string, strings, token ids, or lists of token ids."""
        value = body.get("prompt")
        missing = _checked("Either prompt or prompt_embeds must be provided and non-empty.",
                           "prompt")
        if value is None or value == "" or value == []:
            raise missing
        if isinstance(value, str):
            return [max(tokens.count(value), 1)]
        if isinstance(value, list):
            if all(isinstance(p, int) and not isinstance(p, bool) for p in value):
                return [len(value)]
            if all(isinstance(p, str) for p in value):
                return [max(tokens.count(p), 1) for p in value]
            if all(isinstance(p, list) and p for p in value):
                return [len(p) for p in value]
        raise _invalid("body.prompt", "string_type", "Input should be a valid string", value)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request)
            gen = self._generation(body, self._prompts(body), chat=False)
        except SimError as exc:
            return exc.response()
        rid = f"cmpl-{uuid.uuid4().hex[:16]}"
        created = int(time.time())
        if gen.stream:
            return await self._completion_stream(request, gen, rid, created)
        await self._pace_all(gen)
        choices: list[dict[str, Any]] = []
        for p, prompt in enumerate(gen.prompts):
            for i in range(gen.n):
                index = p * gen.n + i
                words = tokens.output_words(gen.max_tokens, index)
                choices.append({
                    "index": index,
                    "text": " " + " ".join(words),
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                    "token_ids": [tokens.word_id(w) for w in words] if gen.return_token_ids
                    else None,
                    "prompt_logprobs": None,
                    "prompt_token_ids": _filler_ids(prompt, p) if gen.return_token_ids
                    else None,
                    "routed_experts": None,
                })
        response = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": gen.model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": self.fingerprint,
            "usage": _usage(sum(gen.prompts), gen.max_tokens * gen.choices),
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }
        return web.Response(body=orjson.dumps(response), content_type="application/json")

    async def _completion_stream(self, request: web.Request, gen: Generation, rid: str,
                                 created: int) -> web.StreamResponse:
        response = await self._open_stream(request)
        base = {"id": rid, "object": "text_completion", "created": created, "model": gen.model}
        words = [tokens.output_words(gen.max_tokens, i) for i in range(gen.choices)]
        await self._pace_first()
        for t in range(gen.max_tokens):
            if t:
                await self._pace_token()
            last = t == gen.max_tokens - 1
            for index in range(gen.choices):
                prompt = gen.prompts[index // gen.n]
                word = words[index][t]
                choice = {
                    "index": index,
                    "text": " " + word,
                    "logprobs": None,
                    "finish_reason": "length" if last else None,
                    "stop_reason": None,
                    "prompt_token_ids": _filler_ids(prompt, index // gen.n)
                    if gen.return_token_ids and t == 0 else None,
                    "token_ids": [tokens.word_id(word)] if gen.return_token_ids else None,
                }
                chunk: dict[str, Any] = {**base, "choices": [choice]}
                if gen.continuous:
                    chunk["usage"] = _stream_usage(prompt, t + 1)
                if last and not gen.include_usage:
                    chunk["system_fingerprint"] = self.fingerprint
                await response.write(_sse(chunk))
        if gen.include_usage:
            await response.write(_sse(self._final_chunk(base, gen)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # -- embeddings and the rest ----------------------------------------------------------------

    async def embeddings(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            model = self._model(body)
            items = body.get("input")
            inputs = items if isinstance(items, list) else [items]
            if items is None or not all(isinstance(x, str) for x in inputs):
                raise _invalid("body.input", "missing", "Field required", body)
        except SimError as exc:
            return exc.response()
        prompt = sum(max(tokens.count(str(x)), 1) for x in inputs)
        dim = self.config.embedding_dim
        data: list[dict[str, Any]] = [
            {"index": i, "object": "embedding",
             "embedding": [round(((i + 1) * (j + 1) % 97) / 97, 6) for j in range(dim)]}
            for i in range(len(inputs))
        ]
        response = {
            "id": f"embd-{uuid.uuid4().hex[:16]}",
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt, "completion_tokens": 0,
                      "prompt_tokens_details": None},
        }
        return web.Response(body=orjson.dumps(response), content_type="application/json")

    async def models(self, request: web.Request) -> web.Response:
        data: list[dict[str, Any]] = [
            {"id": m, "object": "model", "created": self.started, "owned_by": "vllm",
             "root": m, "parent": None, "max_model_len": self.config.max_model_len,
             "permission": [{
                 "id": f"modelperm-{uuid.uuid4().hex[:16]}", "object": "model_permission",
                 "created": self.started, "allow_create_engine": False,
                 "allow_sampling": True, "allow_logprobs": True,
                 "allow_search_indices": False, "allow_view": True,
                 "allow_fine_tuning": False, "organization": "*", "group": None,
                 "is_blocking": False,
             }]}
            for m in self.config.models
        ]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}),
                            content_type="application/json")

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            self._model(body)
        except SimError as exc:
            return exc.response()
        if isinstance(body.get("messages"), list):
            ids = _filler_ids(tokens.chat_prompt_tokens(body["messages"]))
        else:
            ids = tokens.ids(str(body.get("prompt", "")))
        return web.Response(
            body=orjson.dumps({"count": len(ids), "max_model_len": self.config.max_model_len,
                               "tokens": ids, "token_strs": None}),
            content_type="application/json")

    async def version(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"version": VLLM_VERSION}),
                            content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def not_found(self, request: web.Request) -> web.Response:
        """FastAPI's answers for unknown paths and for known paths with another method."""
        if request.path in ROUTES:
            return web.Response(status=405, body=b'{"detail":"Method Not Allowed"}',
                                content_type="application/json")
        return web.Response(status=404, body=b'{"detail":"Not Found"}',
                            content_type="application/json")


ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
          "/tokenize", "/version", "/health")


def create_app(config: SimConfig) -> web.Application:
    sim = Simulator(config)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", sim.chat)
    app.router.add_post("/v1/completions", sim.completions)
    app.router.add_post("/v1/embeddings", sim.embeddings)
    app.router.add_get("/v1/models", sim.models)
    app.router.add_post("/tokenize", sim.tokenize)
    app.router.add_get("/version", sim.version)
    app.router.add_get("/health", sim.health)
    app.router.add_route("*", "/{tail:.*}", sim.not_found)
    return app
