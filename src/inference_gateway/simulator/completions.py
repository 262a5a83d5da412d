"""``POST /v1/completions``, shaped as vLLM's: one choice per prompt and per ``n``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from inference_gateway.simulator import prechecks, tokens
from inference_gateway.simulator.answer import Form, prompt_ids, respond, token_ids
from inference_gateway.simulator.engine import Engine
from inference_gateway.simulator.sampling import Generation, Sampling, plan, read_seed
from inference_gateway.simulator.validation import Fields, SimError, checked

EMPTY_PROMPT = "The decoder prompt cannot be empty"


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
        prompt = fields.prompt("prompt")
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
    return await respond(engine, request, gen, COMPLETION)


def _choice(gen: Generation, index: int, words: list[str]) -> dict[str, Any]:
    return {
        "index": index,
        "text": " " + " ".join(words),
        "logprobs": None,
        "finish_reason": "length",
        "stop_reason": None,
        "token_ids": token_ids(gen, words),
        "prompt_logprobs": None,
        "prompt_token_ids": prompt_ids(gen, index // gen.n),
        "routed_experts": None,
    }


def _delta(gen: Generation, index: int, step: int, word: str, last: bool) -> dict[str, Any]:
    return {
        "index": index,
        "text": " " + word,
        "logprobs": None,
        "finish_reason": "length" if last else None,
        "stop_reason": None,
        "prompt_token_ids": None if step else prompt_ids(gen, index // gen.n),
        "token_ids": token_ids(gen, [word]),
    }


COMPLETION = Form(chat=False, choice=_choice, delta=_delta)
