"""The events of a streamed Responses API answer, in vLLM's order and shapes.

``response.created`` and ``response.in_progress`` carry the response as it starts; one message
item with one text part follows, its text in one ``response.output_text.delta`` per token; the
closing ``response.completed`` carries the finished response with its ``usage`` (vLLM sends
``response.completed`` even when the status is ``incomplete``). Every event has a
``sequence_number``, counted from 0.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Any

from inference_gateway.simulator.engine import new_id
from inference_gateway.simulator.run import Run


async def stream_events(run: Run, started: dict[str, Any], words: list[str],
                        finish: Callable[[str], dict[str, Any]],
                        ) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
    """``(type, event)`` pairs; ``finish(item_id)`` builds the finished response."""
    sequence = 0

    def event(kind: str, members: dict[str, Any],
              after: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """vLLM's members are in alphabetical order, hence ``after`` the sequence number."""
        nonlocal sequence
        out = {**members, "sequence_number": sequence, **(after or {}), "type": kind}
        sequence += 1
        return kind, out

    yield event("response.created", {"response": started})
    yield event("response.in_progress", {"response": started})
    await run.advance()  # the message item opens with the first token
    item_id = new_id("msg_")
    yield event("response.output_item.added", {
        "item": {"id": item_id, "content": [], "role": "assistant", "status": "in_progress",
                 "type": "message", "phase": None},
        "output_index": 0})
    yield event("response.content_part.added", {
        "content_index": 0, "item_id": item_id, "output_index": 0,
        "part": {"annotations": [], "text": "", "type": "output_text", "logprobs": []}})
    for t, word in enumerate(words):
        if t:
            await run.advance()
        yield event("response.output_text.delta", {
            "content_index": 0, "delta": (" " if t else "") + word, "item_id": item_id,
            "logprobs": [], "output_index": 0})
    text = " ".join(words)
    part: dict[str, Any] = {"annotations": [], "text": text, "type": "output_text",
                            "logprobs": None}
    yield event("response.output_text.done", {
        "content_index": 0, "item_id": item_id, "logprobs": [], "output_index": 0},
        {"text": text})
    yield event("response.content_part.done", {
        "content_index": 0, "item_id": item_id, "output_index": 0, "part": part})
    yield event("response.output_item.done", {
        "item": {"id": item_id, "content": [part], "role": "assistant", "status": "completed",
                 "type": "message", "phase": None},
        "output_index": 0})
    yield event("response.completed", {"response": finish(item_id)})
