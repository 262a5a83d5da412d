"""The Anthropic Messages API as vLLM serves it: ``/v1/messages`` and ``.../count_tokens``.

vLLM answers in two shapes here. A body its request model refuses (a missing ``max_tokens``, a
wrong type) gets the OpenAI error shape, as on every other endpoint; anything found after that
(an unknown model, a prompt too long, a bad temperature) gets Anthropic's
``{"type": "error", "error": {"type", "message"}}`` with the same status.

Usage follows Anthropic's arithmetic when --enable-prompt-tokens-details is on:
``input_tokens`` is the prompt minus the cached and the newly cached tokens, which are reported
as ``cache_read_input_tokens`` and ``cache_creation_input_tokens``. A stream's
``message_start`` still counts the whole prompt as ``input_tokens``; its closing
``message_delta`` carries the final usage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from inference_gateway.simulator import tokens
from inference_gateway.simulator.cache import CacheUse
from inference_gateway.simulator.chat import EMPTY_CONVERSATION
from inference_gateway.simulator.engine import Engine, new_id, typed_sse
from inference_gateway.simulator.faults import FaultError
from inference_gateway.simulator.load import Job
from inference_gateway.simulator.run import Run
from inference_gateway.simulator.sampling import (
    Sampling,
    check_max_tokens,
    check_prompt,
    output_budget,
    verify,
)
from inference_gateway.simulator.validation import Fields, SimError, engine_failure, json_response


@dataclass
class Message:
    model: str
    prompt: list[int]
    max_tokens: int
    cache: CacheUse
    refused: bool  # the engine fails once the request is accepted (see Sampling)

    @property
    def job(self) -> Job:
        return Job([len(self.prompt)], 1, self.max_tokens)


# What vLLM sends when its engine fails during a stream: its own converter's complaint about
# the OpenAI error chunk it was handed.
STREAM_FAILURE = (
    "2 validation errors for ChatCompletionStreamResponse\nmodel\n  Field required "
    "[type=missing, input_value={'error': {'message': '',...am': None, 'code': 500}}, "
    "input_type=dict]\n    For further information visit "
    "https://errors.pydantic.dev/2.14/v/missing\nchoices\n  Field required [type=missing, "
    "input_value={'error': {'message': '',...am': None, 'code': 500}}, input_type=dict]\n"
    "    For further information visit https://errors.pydantic.dev/2.14/v/missing")


def anthropic_error(exc: SimError) -> web.Response:
    return json_response({"type": "error", "error": {"type": exc.err_type,
                                                     "message": exc.message}}, exc.status)


def _refused(exc: SimError) -> web.Response:
    """Request validation answers in OpenAI's shape; a simulated fault, as vLLM's handler
    would, in Anthropic's."""
    return anthropic_error(exc) if isinstance(exc, FaultError) else exc.response()


ROLES = ("user", "assistant", "system")
BLOCKS = ("text", "image", "tool_use", "tool_result", "tool_reference", "thinking",
          "redacted_thinking", "tool_addition", "tool_removal")


def _content(fields: Fields, name: str, value: Any) -> None:
    """A string, or content blocks each with a known ``type``."""
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        fields.add("string_type", name, "Input should be a valid string", value)
        fields.add("list_type", name, "Input should be a valid list", value)
        return
    found = Fields({})
    for i, block in enumerate(value):
        if not isinstance(block, dict):
            found.add("model_attributes_type", f"{name}.{i}", "Input should be a valid "
                      "dictionary or object to extract fields from", block)
        elif "type" not in block:
            found.add("missing", f"{name}.{i}.type", "Field required", block)
        elif block["type"] not in BLOCKS:
            expected = ", ".join(f"'{b}'" for b in BLOCKS[:-1]) + f" or '{BLOCKS[-1]}'"
            found.add("literal_error", f"{name}.{i}.type", f"Input should be {expected}",
                      block["type"], {"expected": expected})
    if found.problems:
        fields.add("string_type", name, "Input should be a valid string", value)
        fields.problems += found.problems


def _read_prompt(fields: Fields) -> list[Any]:
    """``model`` and ``messages``, checked as vLLM's request model checks them."""
    model = fields.string("model", required=True)
    if model == "":
        fields.add("value_error", "model", "Value error, Model is required", model,
                   {"error": ValueError("Model is required")})
    messages = fields.items("messages", required=True) or []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            fields.add("model_attributes_type", f"messages.{i}", "Input should be a valid "
                       "dictionary or object to extract fields from", message)
            continue
        if "role" not in message:
            fields.add("missing", f"messages.{i}.role", "Field required", message)
        elif message["role"] not in ROLES:
            fields.add("literal_error", f"messages.{i}.role",
                       "Input should be 'user', 'assistant' or 'system'", message["role"],
                       {"expected": "'user', 'assistant' or 'system'"})
        if "content" not in message:
            fields.add("missing", f"messages.{i}.content", "Field required", message)
        else:
            _content(fields, f"messages.{i}.content", message["content"])
    return messages


def _system(fields: Fields) -> list[dict[str, Any]]:
    system = fields.body.get("system")
    if system is None:
        return []
    _content(fields, "system", system)
    return [{"role": "system", "content": system}]


def _render(engine: Engine, system: list[dict[str, Any]], messages: list[Any]) -> list[int]:
    """The prompt as the chat template renders it."""
    if not messages:
        raise SimError(400, EMPTY_CONVERSATION, "BadRequestError")
    prompt = tokens.chat_prompt_ids(system + messages)
    check_prompt(len(prompt), engine.config.max_model_len)
    return prompt


async def messages(engine: Engine, request: web.Request) -> web.StreamResponse:
    try:
        body = await engine.body(request)
        fields = Fields(body)
        conversation = _read_prompt(fields)
        sampling = Sampling(max_tokens_key="max_completion_tokens")
        sampling.max_tokens = fields.integer("max_tokens", required=True)
        if sampling.max_tokens is not None and sampling.max_tokens <= 0:
            fields.add("value_error", "max_tokens", "Value error, max_tokens must be positive",
                       sampling.max_tokens, {"error": ValueError("max_tokens must be positive")})
        fields.mapping("metadata")
        fields.stop("stop_sequences", text_allowed=False)
        stream = fields.flag("stream") is True
        system = _system(fields)
        sampling.temperature = fields.number("temperature")
        sampling.top_k = fields.integer("top_k")
        sampling.top_p = fields.number("top_p")
        fields.done()
    except SimError as exc:
        return _refused(exc)
    try:
        message = _plan(engine, body, sampling, system, conversation)
    except SimError as exc:
        return anthropic_error(exc)
    rid = new_id("chatcmpl-")
    words = tokens.output_words(message.max_tokens)
    final_usage = _usage(engine, message, len(words))
    if not stream and message.refused:
        return anthropic_error(engine_failure())
    if not stream:
        async with engine.run(request, message.model, message.job, message.cache.cached) as run:
            await run.generate()
        return json_response({
            "id": rid, "type": "message", "role": "assistant",
            "content": [{"type": "text", "text": " ".join(words)}], "model": message.model,
            "stop_reason": "max_tokens", "usage": final_usage})
    response = await engine.open_stream(request)
    if message.refused:
        await response.write(typed_sse("error", {"type": "error", "error": {
            "type": "internal_error", "message": STREAM_FAILURE}}))
        await response.write_eof()
        return response
    async with engine.run(request, message.model, message.job, message.cache.cached) as run:
        await _text(run, response, rid, message, words)
    await response.write(typed_sse("content_block_stop",
                                   {"type": "content_block_stop", "index": 0}))
    await response.write(typed_sse("message_delta", {
        "type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
        "usage": final_usage}))
    await response.write(typed_sse("message_stop", {"type": "message_stop"}))
    await response.write_eof()
    return response


async def _text(run: Run, response: web.StreamResponse, rid: str, message: Message,
                words: list[str]) -> None:
    """The stream's opening events once the first token is made, then one delta per token."""
    await run.advance()
    await response.write(typed_sse("message_start", {"type": "message_start", "message": {
        "id": rid, "type": "message", "role": "assistant", "content": [],
        "model": message.model, "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": len(message.prompt), "output_tokens": 0}}}))
    await response.write(typed_sse("content_block_start", {
        "type": "content_block_start", "content_block": {"type": "text", "text": ""},
        "index": 0}))
    for t, word in enumerate(words):
        if t:
            await run.advance()
        await response.write(typed_sse("content_block_delta", {
            "type": "content_block_delta",
            "delta": {"type": "text_delta", "text": (" " if t else "") + word}, "index": 0}))


def _plan(engine: Engine, body: dict[str, Any], sampling: Sampling,
          system: list[dict[str, Any]], conversation: list[Any]) -> Message:
    limit = engine.config.max_model_len
    model = engine.model(body)
    check_max_tokens(sampling, limit)
    prompt = _render(engine, system, conversation)
    budget = output_budget(sampling, len(prompt), limit, engine.config.default_max_tokens)
    verify(sampling, budget)
    return Message(model, prompt, budget, engine.cache_use(model, prompt),
                   sampling.engine_refuses)


def _usage(engine: Engine, message: Message, output: int) -> dict[str, Any]:
    prompt = len(message.prompt)
    details = engine.details(message.cache)
    if details is None:
        return {"input_tokens": prompt, "output_tokens": output}
    return {"input_tokens": max(0, prompt - details.cached - details.created),
            "output_tokens": output, "cache_creation_input_tokens": details.created,
            "cache_read_input_tokens": details.cached}


async def count_tokens(engine: Engine, request: web.Request) -> web.Response:
    try:
        body = await engine.body(request)
        fields = Fields(body)
        conversation = _read_prompt(fields)
        system = _system(fields)
        fields.done()
    except SimError as exc:
        return _refused(exc)
    try:
        engine.model(body)
        prompt = _render(engine, system, conversation)
    except SimError as exc:
        return anthropic_error(exc)
    count = len(prompt)
    return json_response({"input_tokens": count,
                          "context_management": {"original_input_tokens": count}})

