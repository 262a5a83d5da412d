"""The Responses API: ``POST /v1/responses``, ``GET /v1/responses/{id}`` and ``.../cancel``.

Without the store (vLLM's default) nothing is kept: ``background`` is refused and every lookup
is a 404. With it, responses are kept (see ``store``), and a background response answers
``queued`` at once, is generated afterwards and stays ``queued`` until it is done, as in vLLM.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from inference_gateway.simulator import tokens
from inference_gateway.simulator.cache import CacheUse
from inference_gateway.simulator.chat import EMPTY_CONVERSATION
from inference_gateway.simulator.engine import Engine, new_id, typed_sse
from inference_gateway.simulator.load import Job
from inference_gateway.simulator.response_events import stream_events
from inference_gateway.simulator.run import Run
from inference_gateway.simulator.sampling import (
    Sampling,
    check_max_tokens,
    check_prompt,
    output_budget,
    read_seed,
    verify,
)
from inference_gateway.simulator.store import ResponseStore, Stored
from inference_gateway.simulator.validation import (
    Fields,
    SimError,
    checked,
    engine_failure,
    invalid,
    json_response,
)

# vLLM lets "background": null through, then fails to build the response object from it.
NULL_BACKGROUND = (
    "1 validation error for ResponsesResponse\nbackground\n  Input should be a valid boolean "
    "[type=bool_type, input_value=None, input_type=NoneType]\n    For further information "
    "visit https://errors.pydantic.dev/2.14/v/bool_type")
NO_STORE = ("This vLLM engine does not support `store=True` and therefore does not support the "
            "background mode. To enable these features, set the environment variable "
            "`VLLM_ENABLE_RESPONSES_API_STORE=1` when launching the vLLM server.")


@dataclass
class Turn:
    """One validated ``POST /v1/responses``: what to generate and what to echo back."""

    rid: str
    created: int
    model: str
    echo: dict[str, Any]  # request members the response object repeats
    prompt: list[int]
    max_tokens: int
    incomplete: bool  # cut by the output budget rather than ended by the model
    cache: CacheUse
    stream: bool
    background: bool
    store: bool
    refused: bool  # the engine fails once the request is accepted (see Sampling)

    def output_words(self) -> list[str]:
        return tokens.output_words(self.max_tokens)


def read_input(fields: Fields) -> list[Any] | None:
    """``input``: a string or a list of messages, refused as vLLM's validation refuses it."""
    value = fields.body.get("input")
    if "input" not in fields.body:
        fields.add("missing", "input", "Field required", fields.body)
        return None
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, dict):  # vLLM takes a mapping for the list of its keys
        value = list(value)
    if isinstance(value, list):
        bad = [i for i, m in enumerate(value) if not isinstance(m, dict) or "content" not in m]
        if not bad:
            return value
        fields.add("string_type", "input", "Input should be a valid string", value)
        for i in bad[:1]:
            item = value[i]
            if isinstance(item, dict):
                fields.add("missing", f"input.{i}.EasyInputMessageParam.content",
                           "Field required", item)
            else:
                fields.add("dict_type", f"input.{i}.EasyInputMessageParam",
                           "Input should be a valid dictionary", item)
        return None
    fields.add("string_type", "input", "Input should be a valid string", value)
    fields.add("list_type", "input", "Input should be a valid list", value)
    return None


class Responses:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.store = ResponseStore(engine.config.store_size)

    async def create(self, request: web.Request) -> web.StreamResponse:
        try:
            turn = self._turn(await self.engine.body(request))
        except SimError as exc:
            return exc.response()
        if turn.background:
            return await self._background(request, turn)
        if turn.stream:
            stream = await self._follow(request, self._generate(turn, request),
                                        end=not turn.refused)
            if turn.refused and request.transport is not None:
                request.transport.close()  # vLLM's stream breaks off without its last chunk
            return stream
        if turn.refused:
            return engine_failure().response()
        async with self._run(turn, request) as run:
            await run.generate()
        return json_response(self._final(turn))

    def _turn(self, body: dict[str, Any]) -> Turn:
        fields = Fields(body)
        sampling = Sampling(max_tokens_key="max_output_tokens")
        background = fields.flag("background") is True
        messages = read_input(fields)
        instructions = fields.string("instructions")
        sampling.max_tokens = fields.integer("max_output_tokens")
        fields.mapping("metadata")
        fields.string("model")
        previous_id = fields.string("previous_response_id")
        store = fields.flag("store") is not False  # the Responses API stores by default
        stream = fields.flag("stream") is True
        sampling.temperature = fields.number("temperature")
        fields.integer("top_logprobs", nullable=False)
        sampling.top_p = fields.number("top_p")
        sampling.top_k = fields.integer("top_k")
        sampling.min_p = fields.number("min_p")
        sampling.presence_penalty = fields.number("presence_penalty")
        sampling.frequency_penalty = fields.number("frequency_penalty")
        sampling.repetition_penalty = fields.number("repetition_penalty")
        read_seed(fields)
        fields.flag("ignore_eos", nullable=False)
        fields.done()
        if background and not store:
            raise checked("background can only be used when `store` is true", "background")
        engine = self.engine
        model = engine.model(body)
        if background and not engine.config.enable_store:
            raise SimError(400, NO_STORE, "invalid_request_error", "background")
        store = store and engine.config.enable_store
        earlier: array[int] = array("H")
        if previous_id is not None:
            found = self.store.get(previous_id) if engine.config.enable_store else None
            if found is None:
                raise not_found(previous_id)
            earlier = found.conversation
        limit = engine.config.max_model_len
        check_max_tokens(sampling, limit)
        system = [{"role": "system", "content": instructions}] if instructions else []
        if not messages and not system and not earlier:
            raise SimError(400, EMPTY_CONVERSATION, "BadRequestError")
        prompt = [*earlier, *tokens.chat_prompt_ids(system + (messages or []))]
        check_prompt(len(prompt), limit)
        if len(prompt) == limit:
            raise SimError(400, f"The engine prompt length {limit} exceeds the max_model_len "
                           f"{limit}. Please reduce prompt.", "invalid_request_error", "input")
        budget = output_budget(sampling, len(prompt), limit, engine.config.default_max_tokens)
        verify(sampling, budget)
        if "background" in body and body["background"] is None:
            raise SimError(400, NULL_BACKGROUND, "BadRequestError")
        echo = {"instructions": instructions, "metadata": body.get("metadata"),
                "temperature": 1.0 if sampling.temperature is None else sampling.temperature,
                "top_p": 1.0 if sampling.top_p is None else sampling.top_p,
                "background": background, "max_output_tokens": sampling.max_tokens,
                "previous_response_id": previous_id, "top_logprobs": body.get("top_logprobs"),
                "user": body.get("user")}
        return Turn(
            rid=new_id("resp_"), created=int(time.time()), model=model, echo=echo,
            prompt=prompt, max_tokens=budget,
            incomplete=sampling.max_tokens is not None
            or budget < engine.config.default_max_tokens,
            cache=engine.cache_use(model, prompt), stream=stream, background=background,
            store=store, refused=sampling.engine_refuses)

    def _run(self, turn: Turn, request: web.Request | None) -> Run:
        job = Job([len(turn.prompt)], 1, turn.max_tokens)
        return self.engine.run(request, turn.model, job, turn.cache.cached)

    async def _generate(self, turn: Turn,
                        request: web.Request | None) -> AsyncGenerator[bytes, None]:
        """The events of a streamed response; the last one is stored when the turn is."""
        async with self._run(turn, request) as run:
            events = stream_events(run, self._object(turn, "in_progress"),
                                   turn.output_words(), lambda item: self._final(turn, item))
            async with aclosing(events):
                async for kind, event in events:
                    yield typed_sse(kind, event)
                    if turn.refused and kind == "response.in_progress":
                        return  # vLLM's stream ends here when its engine fails

    def _final(self, turn: Turn, item_id: str | None = None) -> dict[str, Any]:
        """The finished response object; kept in the store when the turn asks for it."""
        words = turn.output_words()
        text = " ".join(words)
        message: dict[str, Any] = {"id": item_id or new_id("msg_"),
                   "content": [{"annotations": [], "text": text, "type": "output_text",
                                "logprobs": None}],
                   "role": "assistant", "status": "completed", "type": "message", "phase": None}
        final = self._object(turn, "incomplete" if turn.incomplete else "completed", [message],
                          response_usage(len(turn.prompt), len(words), turn.cache))
        if turn.store:
            conversation = array("H", turn.prompt)
            conversation.extend(tokens.word_id(w) for w in words)
            self.store.update(turn.rid, final, conversation)
        return final

    def _object(self, turn: Turn, status: str, output: list[Any] | None = None,
             use: dict[str, Any] | None = None) -> dict[str, Any]:
        """A response object, members in vLLM's order."""
        done = status in ("completed", "incomplete")
        return {
            "id": turn.rid, "created_at": turn.created,
            "incomplete_details": {"reason": "max_output_tokens"}
            if done and status == "incomplete" else None,
            "instructions": turn.echo["instructions"], "metadata": turn.echo["metadata"],
            "model": turn.model, "object": "response", "output": output or [],
            "parallel_tool_calls": True, "temperature": turn.echo["temperature"],
            "tool_choice": "none", "tools": [], "top_p": turn.echo["top_p"],
            "background": turn.echo["background"],
            "max_output_tokens": turn.echo["max_output_tokens"], "max_tool_calls": None,
            "previous_response_id": turn.echo["previous_response_id"], "prompt": None,
            "reasoning": None, "service_tier": "auto", "status": status, "text": None,
            "top_logprobs": turn.echo["top_logprobs"], "truncation": "disabled",
            "usage": use, "user": turn.echo["user"], "presence_penalty": 0.0,
            "frequency_penalty": 0.0, "kv_transfer_params": None, "ec_transfer_params": None,
            "input_messages": None, "output_messages": None,
        }

    async def _background(self, request: web.Request, turn: Turn) -> web.StreamResponse:
        """Answer at once; generate in a task whose result the store receives."""
        queued = self._object(turn, "queued")
        stored = Stored(queued)
        self.store.put(turn.rid, stored)
        if not turn.stream:
            async def generate() -> None:
                if turn.refused:  # a failed engine leaves the response queued, as in vLLM
                    return
                async with self._run(turn, None) as run:
                    await run.generate()
                self._final(turn)

            stored.task = asyncio.create_task(generate())
            return json_response(queued)
        log = self.store.new_log(turn.rid)

        async def run_stream() -> None:
            try:
                async with aclosing(self._generate(turn, None)) as events:
                    async for event in events:
                        log.append(event)
            finally:
                log.finish()

        stored.task = asyncio.create_task(run_stream())
        return await self._follow(request, log.follow())

    async def _follow(self, request: web.Request, events: AsyncGenerator[bytes, None],
                      end: bool = True) -> web.StreamResponse:
        stream = await self.engine.open_stream(request)
        async with aclosing(events):  # a client that leaves ends the generation at once
            async for event in events:
                await stream.write(event)
        if end:
            await stream.write_eof()
        return stream

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        rid = request.match_info["response_id"]
        query = Fields(dict(request.query))
        after = query.integer("starting_after")
        wants_stream = query.flag("stream") is True
        if query.problems:  # FastAPI names query parameters "query.<name>"
            return invalid([{**p, "loc": "query" + p["loc"][4:]}
                            for p in query.problems]).response()
        stored = self.store.get(rid) if self.engine.config.enable_store else None
        if stored is None:
            return not_found(rid).response()
        if not wants_stream:
            return json_response(stored.response)
        log = self.store.log(rid)
        if log is None:  # vLLM fails inside the stream it has already started: it ends empty
            return await self._follow(request, _nothing())
        return await self._follow(request, log.follow(0 if after is None else max(0, after + 1)))

    async def cancel(self, request: web.Request) -> web.Response:
        rid = request.match_info["response_id"]
        stored = self.store.get(rid) if self.engine.config.enable_store else None
        if stored is None:
            return not_found(rid).response()
        if stored.response["status"] not in ("queued", "in_progress"):
            return SimError(400, "Cannot cancel a synchronous response.",
                            "invalid_request_error", "response_id").response()
        stored.response["status"] = "cancelled"
        if stored.task is not None:
            stored.task.cancel()
        return json_response(stored.response)


async def _nothing() -> AsyncGenerator[bytes, None]:
    return
    yield b""  # pragma: no cover


def not_found(response_id: str) -> SimError:
    return SimError(404, f"Response with id '{response_id}' not found.",
                    "invalid_request_error", "response_id")


def response_usage(prompt: int, output: int, cache: CacheUse) -> dict[str, Any]:
    """Responses usage: vLLM reports the cached prompt tokens here with or without the flag."""
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cache.cached,
                                 "cache_write_tokens": cache.created,
                                 "input_tokens_per_turn": [], "cached_tokens_per_turn": []},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0,
                                  "output_tokens_per_turn": [],
                                  "tool_output_tokens_per_turn": []},
        "total_tokens": prompt + output,
    }

