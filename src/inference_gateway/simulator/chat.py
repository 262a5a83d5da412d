"""``POST /v1/chat/completions`` and ``/v1/chat/completions/batch``, shaped as vLLM's."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from inference_gateway.simulator import prechecks, tokens
from inference_gateway.simulator.answer import Form, chunk, prompt_ids, respond, token_ids
from inference_gateway.simulator.engine import Engine
from inference_gateway.simulator.sampling import Generation, Sampling, plan, read_seed
from inference_gateway.simulator.validation import Fields, SimError, problem

EMPTY_CONVERSATION = ("Cannot apply chat template to an empty conversation. Provide at least "
                      "one message.")


@dataclass
class ChatRequest:
    messages: list[Any] | None
    sampling: Sampling
    stream: bool
    options: dict[str, Any] | None
    return_token_ids: bool


def read(body: dict[str, Any], batch: bool = False) -> ChatRequest:
    """The request as vLLM's request model reads it: the checks on the raw body, then the
    members in the order the model declares them (a batch request declares fewer)."""
    (prechecks.batch if batch else prechecks.chat)(body)
    fields = Fields(body)
    messages = _messages(fields, batch)
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


def _messages(fields: Fields, batch: bool) -> list[Any] | None:
    """One conversation, or a batch's list of them (an empty one when it is missing)."""
    messages = fields.items("messages", required=True)
    if not batch:
        check_messages(fields, "messages", messages or [])
        return messages
    if messages is not None:
        _check_conversations(messages, fields)
    return messages or []


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
        req = read(body)
        gen = plan(engine, body, req.sampling, lambda: [conversation(req.messages)],
                   stream=req.stream, options=req.options,
                   return_token_ids=req.return_token_ids)
    except SimError as exc:
        return exc.response()
    return await respond(engine, request, gen, CHAT)


async def batch(engine: Engine, request: web.Request) -> web.StreamResponse:
    """One completion per conversation; vLLM reads ``stream`` but still answers in one piece."""
    try:
        body = await engine.body(request)
        req = read(body, batch=True)
        stream = Fields({"stream": body.get("stream")}).flag("stream") is True

        engine.model(body)
        prechecks.conversation_members(body)  # as vLLM renders each conversation
        req.sampling.min_tokens = Fields(body).integer("min_tokens")
        gen = plan(engine, body, req.sampling,
                   lambda: [tokens.chat_prompt_ids(c) for c in req.messages or []],
                   stream=False, options=None, return_token_ids=req.return_token_ids)
    except SimError as exc:
        return exc.response()
    return await respond(engine, request, gen, LAST_STEPS if stream else BATCH)


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


def _choice(gen: Generation, index: int, words: list[str]) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": " ".join(words), "refusal": None,
                    "annotations": None, "audio": None, "function_call": None,
                    "reasoning": None},
        "logprobs": None,
        "finish_reason": "length",
        "stop_reason": None,
        "token_ids": token_ids(gen, words),
        "routed_experts": None,
    }


def _delta(gen: Generation, index: int, step: int, word: str, last: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "delta": {"content": (" " if step else "") + word},
                              "logprobs": None, "finish_reason": "length" if last else None}
    if last:
        choice["stop_reason"] = None
    choice["token_ids"] = token_ids(gen, [word])
    return choice


def _roles(gen: Generation, base: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """vLLM opens each choice of a stream with the assistant's role and no text."""
    for index in range(gen.n):
        role = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}
        yield {**chunk(gen, base, role, index, 0, chat=True),
               "prompt_token_ids": prompt_ids(gen, 0), "prompt_text": None}


def _last_step(gen: Generation, index: int) -> list[str]:
    """With "stream": true a batch keeps only each conversation's last step: one token of text,
    and usage counts only those tokens."""
    return tokens.output_words(gen.max_tokens, index)[-1:]


CHAT = Form(chat=True, choice=_choice, delta=_delta, opening=_roles)
# A batch is never streamed, and its usage never reports the prefix cache.
BATCH = Form(chat=True, choice=_choice, delta=_delta, details=False)
LAST_STEPS = replace(BATCH, words=_last_step)
