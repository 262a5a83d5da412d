"""``POST /v1/chat/completions`` and ``/v1/chat/completions/batch``, shaped as vLLM's."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from inference_gateway.simulator import tokens, usage
from inference_gateway.simulator.engine import YIELD_EVERY, Engine, new_id, sse
from inference_gateway.simulator.sampling import Generation, Sampling, plan, read_seed
from inference_gateway.simulator.validation import (
    Fields,
    SimError,
    checked,
    json_response,
    problem,
)

EMPTY_CONVERSATION = ("Cannot apply chat template to an empty conversation. Provide at least "
                      "one message.")


@dataclass
class ChatRequest:
    messages: list[Any] | None
    sampling: Sampling
    stream: bool
    options: dict[str, Any] | None
    return_token_ids: bool


def read(body: dict[str, Any], fields: Fields, messages: list[Any] | None) -> ChatRequest:
    """The members after ``messages``, in the order vLLM's request model declares them."""
    sampling = Sampling()
    fields.string("model")
    sampling.frequency_penalty = fields.number("frequency_penalty")
    logprobs = fields.flag("logprobs")
    top_logprobs = fields.integer("top_logprobs")
    sampling.max_tokens = fields.integer("max_tokens")
    completion_cap = fields.integer("max_completion_tokens")
    sampling.n = fields.integer("n")
    sampling.presence_penalty = fields.number("presence_penalty")
    read_seed(fields)
    stream = fields.flag("stream") is True
    options = fields.mapping("stream_options")
    sampling.read_common(fields)
    return_token_ids = fields.flag("return_token_ids") is True
    fields.done()
    if top_logprobs is not None and not logprobs:
        raise checked("when using `top_logprobs`, `logprobs` must be set to true.",
                      "top_logprobs")
    if logprobs:
        sampling.logprobs = top_logprobs or 0
    if completion_cap is not None:
        sampling.max_tokens, sampling.max_tokens_key = completion_cap, "max_completion_tokens"
    return ChatRequest(messages, sampling, stream, options, return_token_ids)


def conversation(messages: list[Any] | None) -> list[int]:
    if messages is None:  # vLLM lets a null through its validation and fails rendering it
        raise SimError(400, "'NoneType' object is not iterable", "BadRequestError")
    if not messages:
        raise SimError(400, EMPTY_CONVERSATION, "BadRequestError")
    return tokens.chat_prompt_ids(messages)


async def chat(engine: Engine, request: web.Request) -> web.StreamResponse:
    try:
        body = await engine.body(request)
        fields = Fields(body)
        messages = fields.items("messages", required=body.get("messages", []) is not None)
        req = read(body, fields, messages)
        gen = plan(engine, body, req.sampling, lambda: [conversation(req.messages)],
                   stream=req.stream, options=req.options,
                   return_token_ids=req.return_token_ids)
    except SimError as exc:
        return exc.response()
    rid, created = new_id("chatcmpl-"), int(time.time())
    if gen.stream:
        return await _stream(engine, request, gen, rid, created)
    await engine.pace_all(gen.max_tokens)
    choices = [await _choice(gen, i, gen.max_tokens) for i in range(gen.n)]
    details = engine.details(gen.cache[0])
    return json_response(_completion(engine, gen, rid, created, choices,
                                     usage.whole(gen.prompts[0], gen.max_tokens * gen.n,
                                                 details, chat=True)))


async def batch(engine: Engine, request: web.Request) -> web.StreamResponse:
    """One completion per conversation; vLLM reads ``stream`` but still answers in one piece."""
    try:
        body = await engine.body(request)
        fields = Fields(body)
        conversations = fields.items("messages", required=True)
        if conversations is not None:
            _check_conversations(conversations, fields)
        turns = conversations or []
        req = read(body, fields, turns)
        if (req.sampling.n or 1) > 1:
            raise checked("Batch chat completions do not support `n > 1`. Please set `n` to 1.",
                          "n", req.sampling.n)
        gen = plan(engine, body, req.sampling,
                   lambda: [tokens.chat_prompt_ids(c) for c in turns],
                   stream=False, options=req.options if not req.stream else None,
                   return_token_ids=req.return_token_ids)
    except SimError as exc:
        return exc.response()
    await engine.pace_all(gen.max_tokens)
    # With "stream": true vLLM keeps only each conversation's last step: one token of text,
    # and usage counts only those tokens.
    produced = 1 if req.stream else gen.max_tokens
    choices = [await _choice(gen, i, produced, last_only=req.stream)
               for i in range(len(gen.prompts))]
    return json_response(_completion(
        engine, gen, new_id("chatcmpl-"), int(time.time()), choices,
        usage.whole(sum(gen.prompts), produced * len(gen.prompts), None, chat=True)))


def _check_conversations(conversations: list[Any], fields: Fields) -> None:
    if not conversations:
        fields.problems.append(_too_short("body.messages", conversations))
    for i, item in enumerate(conversations):
        if not isinstance(item, list):
            fields.problems.append(problem("list_type", f"body.messages.{i}",
                                           "Input should be a valid list", item))
        elif not item:
            fields.problems.append(_too_short(f"body.messages.{i}", item))


def _too_short(loc: str, value: list[Any]) -> dict[str, Any]:
    return problem("too_short", loc, "List should have at least 1 item after validation, not 0",
                   value, {"field_type": "List", "min_length": 1, "actual_length": 0})


async def _choice(gen: Generation, index: int, produced: int,
                  last_only: bool = False) -> dict[str, Any]:
    if index and index % YIELD_EVERY == 0:
        await asyncio.sleep(0)  # a large n must not hold the event loop
    words = tokens.output_words(produced, index)
    if last_only:
        words = tokens.output_words(gen.max_tokens, index)[-1:]
    return {
        "index": index,
        "message": {"role": "assistant", "content": " ".join(words), "refusal": None,
                    "annotations": None, "audio": None, "function_call": None,
                    "reasoning": None},
        "logprobs": None,
        "finish_reason": "length",
        "stop_reason": None,
        "token_ids": [tokens.word_id(w) for w in words] if gen.return_token_ids else None,
        "routed_experts": None,
    }


def _completion(engine: Engine, gen: Generation, rid: str, created: int,
                choices: list[dict[str, Any]], use: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": gen.model,
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": engine.fingerprint,
        "usage": use,
        "prompt_logprobs": None,
        "prompt_token_ids": filler_ids(gen.prompts[0]) if gen.return_token_ids else None,
        "prompt_text": None,
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }


def filler_ids(n: int, salt: int = 0) -> list[int]:
    """Stand-in prompt token ids, ``n`` of them (already checked against the context)."""
    return [4 + (salt * 31 + i * 7) % (tokens.VOCAB_SIZE - 4) for i in range(n)]


async def _stream(engine: Engine, request: web.Request, gen: Generation, rid: str,
                  created: int) -> web.StreamResponse:
    response = await engine.open_stream(request)
    base = {"id": rid, "object": "chat.completion.chunk", "created": created,
            "model": gen.model}
    prompt = gen.prompts[0]
    await engine.pace_first()
    for i in range(gen.n):
        role: dict[str, Any] = {**base, "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}]}
        if gen.continuous:
            role["usage"] = usage.running_chat(prompt, 0)
        role["prompt_token_ids"] = filler_ids(prompt) if gen.return_token_ids else None
        role["prompt_text"] = None
        await response.write(sse(role))
    for t in range(gen.max_tokens):
        if t:
            await engine.pace_token()
        last = t == gen.max_tokens - 1
        for i in range(gen.n):
            word = tokens.output_words(1, i + t)[0]
            choice: dict[str, Any] = {"index": i, "delta": {"content": (" " if t else "") + word},
                                      "logprobs": None,
                                      "finish_reason": "length" if last else None}
            if last:
                choice["stop_reason"] = None
            choice["token_ids"] = [tokens.word_id(word)] if gen.return_token_ids else None
            chunk: dict[str, Any] = {**base, "choices": [choice]}
            if gen.continuous:
                chunk["usage"] = usage.running_chat(prompt, t + 1)
            if last and not gen.include_usage:
                chunk["system_fingerprint"] = engine.fingerprint
            await response.write(sse(chunk))
    if gen.include_usage:
        final = usage.final_chunk(prompt, gen.max_tokens * gen.n,
                                  engine.details(gen.cache[0]), chat=True)
        await response.write(sse({**base, "choices": [], "usage": final,
                                  "system_fingerprint": engine.fingerprint}))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response
