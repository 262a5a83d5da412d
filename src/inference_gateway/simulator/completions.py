"""``POST /v1/completions``, shaped as vLLM's: one choice per prompt and per ``n``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from inference_gateway.simulator import prechecks, tokens, usage
from inference_gateway.simulator.chat import filler_ids
from inference_gateway.simulator.engine import YIELD_EVERY, Engine, new_id, sse
from inference_gateway.simulator.sampling import Generation, Sampling, plan, read_seed
from inference_gateway.simulator.validation import (
    STREAM_FAILURE,
    Fields,
    SimError,
    checked,
    engine_failure,
    json_response,
    not_token_ids,
)

EMPTY_PROMPT = "The decoder prompt cannot be empty"


def read_prompt(fields: Fields) -> Any:
    """``prompt``: a string, strings, token ids, or lists of token ids; anything else is
    refused with the errors of each alternative vLLM tried, as its validation lists them."""
    value = fields.body.get("prompt")
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        for kind, msg in (("list_type", "Input should be a valid list"),
                          ("list_type", "Input should be a valid list"),
                          ("string_type", "Input should be a valid string"),
                          ("list_type", "Input should be a valid list")):
            fields.add(kind, "prompt", msg, value)
        return None
    if all(isinstance(p, str) for p in value) or all(isinstance(p, list) for p in value):
        if all(isinstance(t, int) and t >= 0 for p in value if isinstance(p, list) for t in p):
            return value
    elif all(isinstance(t, int) and t >= 0 for t in value):  # true and false count as 1 and 0
        return value
    fields.add_under("prompt", not_token_ids(value))
    fields.add("string_type", "prompt", "Input should be a valid string", value)
    return None


def render(value: Any) -> list[list[int]]:
    """Token ids of each prompt."""
    if value == []:
        raise checked("You must pass at least one prompt")
    if isinstance(value, str):
        return [tokens.text_ids(value)]
    if all(isinstance(p, int) for p in value):
        return [list(value)]
    prompts = [tokens.text_ids(p) if isinstance(p, str) else list(p) for p in value]
    if any(not p for p in prompts):
        raise SimError(400, EMPTY_PROMPT, "BadRequestError")
    return prompts


async def completions(engine: Engine, request: web.Request) -> web.StreamResponse:
    try:
        body = await engine.body(request)
        prechecks.completion(body)
        fields = Fields(body)
        sampling = Sampling()
        fields.string("model")
        prompt = read_prompt(fields)
        fields.flag("echo")
        sampling.frequency_penalty = fields.number("frequency_penalty")
        sampling.logprobs = fields.integer("logprobs")
        sampling.max_tokens = fields.integer("max_tokens")
        sampling.n = fields.integer("n", nullable=False)
        sampling.presence_penalty = fields.number("presence_penalty")
        read_seed(fields)
        fields.stop("stop")
        stream = fields.flag("stream") is True
        options = fields.mapping("stream_options")
        sampling.read_common(fields)
        return_token_ids = fields.flag("return_token_ids") is True
        fields.done()
        gen = plan(engine, body, sampling, lambda: render(prompt), stream=stream,
                   options=options, return_token_ids=return_token_ids)
    except SimError as exc:
        return exc.response()
    rid, created = new_id("cmpl-"), int(time.time())
    if gen.stream:
        return await _stream(engine, request, gen, rid, created)
    if gen.refused:
        return engine_failure().response()
    await engine.pace_all(gen.max_tokens)
    choices: list[dict[str, Any]] = []
    for p, prompt_tokens in enumerate(gen.prompts):
        for i in range(gen.n):
            index = p * gen.n + i
            if index and index % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # many choices must not hold the event loop
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
                "prompt_token_ids": filler_ids(prompt_tokens, p) if gen.return_token_ids
                else None,
                "routed_experts": None,
            })
    # vLLM reports the cache figures of one prompt only: the last one to finish.
    details = engine.details(gen.cache[-1])
    response = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": gen.model,
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": engine.fingerprint,
        "usage": usage.whole(sum(gen.prompts), gen.max_tokens * gen.choices, details,
                             chat=False),
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }
    return json_response(response)


async def _stream(engine: Engine, request: web.Request, gen: Generation, rid: str,
                  created: int) -> web.StreamResponse:
    response = await engine.open_stream(request)
    if gen.refused:
        await response.write(STREAM_FAILURE)
        await response.write_eof()
        return response
    base = {"id": rid, "object": "text_completion", "created": created, "model": gen.model}
    await engine.pace_first()
    for t in range(gen.max_tokens):
        if t:
            await engine.pace_token()
        last = t == gen.max_tokens - 1
        for index in range(gen.choices):
            prompt = gen.prompts[index // gen.n]
            word = tokens.output_words(1, index + t)[0]
            choice = {
                "index": index,
                "text": " " + word,
                "logprobs": None,
                "finish_reason": "length" if last else None,
                "stop_reason": None,
                "prompt_token_ids": filler_ids(prompt, index // gen.n)
                if gen.return_token_ids and t == 0 else None,
                "token_ids": [tokens.word_id(word)] if gen.return_token_ids else None,
            }
            chunk: dict[str, Any] = {**base, "choices": [choice]}
            if gen.continuous:
                chunk["usage"] = usage.running(prompt, t + 1)
            if last and not gen.include_usage:
                chunk["system_fingerprint"] = engine.fingerprint
            await response.write(sse(chunk))
    if gen.include_usage:
        # In a stream vLLM reports the cache figures of the first prompt it heard from.
        final = usage.final_chunk(sum(gen.prompts), gen.max_tokens * gen.choices,
                                  engine.details(gen.cache[0]), chat=False)
        await response.write(sse({**base, "choices": [], "usage": final,
                                  "system_fingerprint": engine.fingerprint}))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response
