"""The answer to a planned chat or completions request: in one piece, or as a stream of chunks.

vLLM paces, counts and closes both families' answers alike; they differ in the members of each
choice. A ``Form`` supplies those, so that the order of chunks, usage and fingerprints, which
the conformance tests compare with vLLM's, is kept in one place.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from inference_gateway.simulator import tokens, usage
from inference_gateway.simulator.engine import YIELD_EVERY, Engine, new_id, sse
from inference_gateway.simulator.sampling import Generation
from inference_gateway.simulator.validation import STREAM_FAILURE, engine_failure, json_response

Json = dict[str, Any]


def every_word(gen: Generation, index: int) -> list[str]:
    return tokens.output_words(gen.max_tokens, index)


def no_opening(gen: Generation, base: Json) -> Iterator[Json]:
    return iter(())


@dataclass(frozen=True)
class Form:
    """What one family's answers hold that the other's do not."""

    chat: bool  # chat's object names, usage members and prompt members
    choice: Callable[[Generation, int, list[str]], Json]  # a whole answer's: index, its words
    delta: Callable[[Generation, int, int, str, bool], Json]  # a chunk's: index, step, word, last
    opening: Callable[[Generation, Json], Iterator[Json]] = no_opening  # before the first token
    words: Callable[[Generation, int], list[str]] = every_word  # what choice ``index`` says
    details: bool = True  # whether a whole answer's usage may report the prefix cache


def token_ids(gen: Generation, words: list[str]) -> list[int] | None:
    return [tokens.word_id(w) for w in words] if gen.return_token_ids else None


def prompt_ids(gen: Generation, prompt: int) -> list[int] | None:
    """The ids of prompt number ``prompt``, when the client asked for token ids."""
    return tokens.filler_ids(gen.prompts[prompt], prompt) if gen.return_token_ids else None


def chunk(gen: Generation, base: Json, choice: Json, index: int, produced: int,
          chat: bool) -> Json:
    """A chunk of choice ``index``; with continuous usage, its prompt's after ``produced``."""
    out = {**base, "choices": [choice]}
    if gen.continuous:
        running = usage.running_chat if chat else usage.running
        out["usage"] = running(gen.prompts[index // gen.n], produced)
    return out


async def respond(engine: Engine, request: web.Request, gen: Generation,
                  form: Form) -> web.StreamResponse:
    rid, created = new_id("chatcmpl-" if form.chat else "cmpl-"), int(time.time())
    if gen.stream:
        return await _stream(engine, request, gen, form, rid, created)
    if gen.refused:
        return engine_failure().response()
    async with engine.run(request, gen.model, gen.job, gen.cached) as run:
        await run.generate()
    choices, produced = await _choices(gen, form)
    # vLLM reports the cache figures of one sequence only: the last one to finish.
    details = engine.details(gen.cache[-1]) if form.details else None
    answer: Json = {
        "id": rid,
        "object": "chat.completion" if form.chat else "text_completion",
        "created": created,
        "model": gen.model,
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": engine.fingerprint,
        "usage": usage.whole(sum(gen.prompts), produced, details, chat=form.chat),
    }
    if form.chat:
        answer |= {"prompt_logprobs": None, "prompt_token_ids": prompt_ids(gen, 0),
                   "prompt_text": None}
    answer |= {"kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}
    return json_response(answer)


async def _choices(gen: Generation, form: Form) -> tuple[list[Json], int]:
    """Every choice of a whole answer, and the tokens they hold together."""
    choices: list[Json] = []
    produced = 0
    for index in range(gen.choices):
        if index and index % YIELD_EVERY == 0:
            await asyncio.sleep(0)  # many choices must not hold the event loop
        words = form.words(gen, index)
        choices.append(form.choice(gen, index, words))
        produced += len(words)
    return choices, produced


async def _stream(engine: Engine, request: web.Request, gen: Generation, form: Form, rid: str,
                  created: int) -> web.StreamResponse:
    response = await engine.open_stream(request)
    if gen.refused:
        await response.write(STREAM_FAILURE)
        await response.write_eof()
        return response
    base = {"id": rid, "object": "chat.completion.chunk" if form.chat else "text_completion",
            "created": created, "model": gen.model}
    async with engine.run(request, gen.model, gen.job, gen.cached) as run:
        for t in range(gen.max_tokens):
            await run.advance()
            if not t:
                for opening in form.opening(gen, base):
                    await response.write(sse(opening))
            await _step(engine, response, gen, form, base, t)
    if gen.include_usage:
        # In a stream vLLM reports the cache figures of the first sequence it heard from.
        final = usage.final_chunk(sum(gen.prompts), gen.max_tokens * gen.choices,
                                  engine.details(gen.cache[0]), chat=form.chat)
        await response.write(sse({**base, "choices": [], "usage": final,
                                  "system_fingerprint": engine.fingerprint}))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _step(engine: Engine, response: web.StreamResponse, gen: Generation, form: Form,
                base: Json, t: int) -> None:
    """The chunks of token ``t``, one per choice."""
    last = t == gen.max_tokens - 1
    for index in range(gen.choices):
        word = tokens.output_words(1, index + t)[0]
        out = chunk(gen, base, form.delta(gen, index, t, word, last), index, t + 1, form.chat)
        if last and not gen.include_usage:
            out["system_fingerprint"] = engine.fingerprint
        await response.write(sse(out))
