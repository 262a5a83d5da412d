"""``POST /v1/chat/completions`` and ``/v1/chat/completions/batch``, shaped as vLLM's."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from inference_gateway.simulator import prechecks, tokens, usage
from inference_gateway.simulator.engine import YIELD_EVERY, Engine, new_id, sse
from inference_gateway.simulator.sampling import Generation, Sampling, plan, read_seed
from inference_gateway.simulator.validation import (
    STREAM_FAILURE,
    Fields,
    SimError,
    engine_failure,
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


def read(body: dict[str, Any], fields: Fields, messages: list[Any] | None,
         batch: bool = False) -> ChatRequest:
    """The members after ``messages``, in the order vLLM's request model declares them (a
    batch request declares fewer)."""
    sampling = Sampling()
    fields.string("model")
    sampling.frequency_penalty = fields.number("frequency_penalty")
    logprobs = fields.flag("logprobs")
    top_logprobs = fields.integer("top_logprobs", nullable=False)
    sampling.max_tokens = fields.integer("max_tokens")
    completion_cap = fields.integer("max_completion_tokens")
    sampling.n = fields.integer("n")
    sampling.presence_penalty = fields.number("presence_penalty")
    fields.stop("stop")
    read_seed(fields)
    stream = not batch and fields.flag("stream") is True
    options = None if batch else fields.mapping("stream_options")
    sampling.read_common(fields, engine_members=not batch)
    fields.flag("echo", nullable=False)
    return_token_ids = fields.flag("return_token_ids", nullable=not batch) is True
    fields.done()
    if logprobs:
        sampling.logprobs = top_logprobs or 0
    if completion_cap is not None:
        sampling.max_tokens, sampling.max_tokens_key = completion_cap, "max_completion_tokens"
    return ChatRequest(messages, sampling, stream, options, return_token_ids)


MESSAGE_KINDS = ("ChatCompletionDeveloperMessageParam", "ChatCompletionSystemMessageParam",
                 "ChatCompletionUserMessageParam", "ChatCompletionAssistantMessageParam",
                 "ChatCompletionToolMessageParam", "ChatCompletionFunctionMessageParam",
                 "CustomChatCompletionMessageParam", "Message")


def check_messages(fields: Fields, name: str, messages: list[Any]) -> None:
    """Each message must be an object, and one with a textual role; vLLM reports a failure
    against the first kind of message it tried."""
    for i, message in enumerate(messages):
        where = f"{name}.{i}.{MESSAGE_KINDS[0]}"
        if not isinstance(message, dict):
            for kind in MESSAGE_KINDS:
                fields.add("dict_type", f"{name}.{i}.{kind}", "Input should be a valid "
                           "dictionary", message)
        elif message.get("content") is not None \
                and not isinstance(message["content"], str | list):
            fields.add("string_type", f"{where}.content", "Input should be a valid string",
                       message["content"])
            fields.add("iterable_type", f"{where}.content", "Input should be iterable",
                       message["content"])
        elif not message or ("role" in message and not isinstance(message["role"], str)):
            if "content" not in message:
                fields.add("missing", f"{where}.content", "Field required", message)
            if "role" in message:
                fields.add("literal_error", f"{where}.role", "Input should be 'developer'",
                           message["role"], {"expected": "'developer'"})
            else:
                fields.add("missing", f"{where}.role", "Field required", message)


def conversation(messages: list[Any] | None) -> list[int]:
    if not messages:
        raise SimError(400, EMPTY_CONVERSATION, "BadRequestError")
    return tokens.chat_prompt_ids(messages)


async def chat(engine: Engine, request: web.Request) -> web.StreamResponse:
    try:
        body = await engine.body(request)
        prechecks.chat(body)
        fields = Fields(body)
        messages = fields.items("messages", required=True)
        check_messages(fields, "messages", messages or [])
        req = read(body, fields, messages)
        gen = plan(engine, body, req.sampling, lambda: [conversation(req.messages)],
                   stream=req.stream, options=req.options,
                   return_token_ids=req.return_token_ids)
    except SimError as exc:
        return exc.response()
    rid, created = new_id("chatcmpl-"), int(time.time())
    if gen.stream:
        return await _stream(engine, request, gen, rid, created)
    if gen.refused:
        return engine_failure().response()
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
        prechecks.batch(body)
        fields = Fields(body)
        conversations = fields.items("messages", required=True)
        if conversations is not None:
            _check_conversations(conversations, fields)
        turns = conversations or []
        req = read(body, fields, turns, batch=True)
        stream = Fields({"stream": body.get("stream")}).flag("stream") is True

        engine.model(body)
        prechecks.conversation_members(body)  # as vLLM renders each conversation
        req.sampling.min_tokens = Fields(body).integer("min_tokens")
        gen = plan(engine, body, req.sampling,
                   lambda: [tokens.chat_prompt_ids(c) for c in turns], stream=False, options=None,
                   return_token_ids=req.return_token_ids)
    except SimError as exc:
        return exc.response()
    if gen.refused:
        return engine_failure().response()
    await engine.pace_all(gen.max_tokens)
    # With "stream": true vLLM keeps only each conversation's last step: one token of text,
    # and usage counts only those tokens.
    produced = 1 if stream else gen.max_tokens
    choices = [await _choice(gen, i, produced, last_only=stream)
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
        else:
            check_messages(fields, f"messages.{i}", item)


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
    if gen.refused:
        await response.write(STREAM_FAILURE)
        await response.write_eof()
        return response
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
