"""Counting tokens with the model server's own tokenizer, for streams that ended without usage.

A Responses or Messages stream reports its usage only at the end. When the client goes away
first (vLLM then aborts the generation), the gateway bills what the client was sent: the
relayed text, counted by vLLM's ``/tokenize``, and the prompt, which a Messages stream states in
its first event and a Responses prompt gets counted the same way, through the chat template
vLLM applies to it. Re-tokenizing generated text gives the generated count for ordinary text;
a prompt that continues a stored response (``previous_response_id``) is counted without the
stored part, which the gateway never sees.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

from inference_gateway.proxy.upstream import Pool, UpstreamError

log = logging.getLogger(__name__)

TIMEOUT_SEC = 5.0
_HEADERS = [("Content-Type", "application/json"), ("Accept-Encoding", "identity")]


def _text(content: object) -> str:
    """The text of a message's content: a string, or a list of parts with ``text``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part["text"] for part in content
                       if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def responses_messages(fields: dict[str, Any]) -> list[dict[str, str]]:
    """A Responses request's prompt as chat messages, the way vLLM builds it."""
    messages: list[dict[str, str]] = []
    instructions = fields.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    value = fields.get("input")
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and isinstance(item.get("role"), str):
                role = "system" if item["role"] == "developer" else item["role"]
                messages.append({"role": role, "content": _text(item.get("content"))})
    return messages


async def count(pool: Pool, model: str, request: dict[str, Any]) -> int | None:
    """vLLM's token count for a ``/tokenize`` request; None when it cannot be had."""
    body = orjson.dumps({"model": model, **request})
    try:
        async with asyncio.timeout(TIMEOUT_SEC):
            answer = await pool.post("/tokenize", body, _HEADERS)
            try:
                data = await answer.read()
            finally:
                answer.release()
    except (UpstreamError, TimeoutError) as exc:
        log.warning("cannot count tokens with the model server: %s", exc)
        return None
    if answer.status != 200:
        log.warning("the model server's /tokenize answered %d", answer.status)
        return None
    try:
        value = orjson.loads(data).get("count")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, int) and value >= 0 else None


async def count_text(pool: Pool, model: str, text: str) -> int | None:
    if not text:
        return 0
    return await count(pool, model, {"prompt": text, "add_special_tokens": False})


def relayed_tokens(deltas: int, most: int, counted: int | None,
                   fields: dict[str, Any] | None) -> int:
    """What to bill for ``deltas`` text events relayed, which ``/tokenize`` ``counted``.

    Re-tokenized text can come out a few tokens longer than what was generated (the tokenizer
    merges what the model produced apart), so the count is kept within what the events can
    hold (``most``) and never below one token an event. Stop strings make vLLM hold ASCII text
    back too, and then only the lower bound applies.
    """
    if counted is None:
        return deltas
    if fields and (fields.get("stop") or fields.get("stop_sequences")):
        return max(deltas, counted)
    return max(deltas, min(counted, most))


async def count_messages(pool: Pool, model: str, messages: list[dict[str, str]]) -> int | None:
    if not messages:
        return 0
    return await count(pool, model, {"messages": messages})
