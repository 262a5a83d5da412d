"""Streams of named events (the Responses API, the Anthropic Messages API): relayed unchanged,
usage read on the way.

Unlike chat streams, these always carry their usage, once, near the end: the Responses API in
``response.completed`` (or ``.incomplete`` / ``.failed``), the Messages API in ``message_start``
(the prompt) and the cumulative ``message_delta``. Nothing is rewritten. The event that ends the
answer is held back until the caller has recorded the usage, so that the record cannot be lost to
a crash after the client was answered. The generated text that was relayed is kept, so that a
stream the client abandons can still be billed for what it was sent (see ``tokenize``).
"""

from __future__ import annotations

from typing import Any

import orjson

from inference_gateway.metering.readers import Shape, Usage, anthropic_usage, responses_usage
from inference_gateway.proxy.sse import take_events

_EVENT = b"event: "
_DATA = b"data: "
MAX_TEXT_CHARS = 4 * 1024 * 1024  # keep at most this much relayed text per stream
_RESPONSES_END = frozenset(("response.completed", "response.incomplete", "response.failed"))


def _split(event: bytes) -> tuple[str, bytes]:
    """An event's type (its ``event:`` line) and its ``data:`` payload."""
    kind = ""
    data = b""
    for line in event.split(b"\n"):
        if line.startswith(_EVENT):
            kind = line[len(_EVENT):].strip().decode("ascii", "replace")
        elif line.startswith(_DATA):
            data = line[len(_DATA):]
    return kind, data


def _json(data: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class EventStream:
    """Splits a stream of named events, notes usage, id and relayed text, holds back the end."""

    __slots__ = ("_buffer", "_held", "_shape", "_text", "_text_chars", "deltas", "final",
                 "most_tokens", "upstream_id", "usage")

    def __init__(self, shape: Shape) -> None:
        self._shape = shape
        self._buffer = b""
        self._held = b""  # the event that ends the answer, and whatever follows it
        self._text: list[str] = []
        self._text_chars = 0
        self.usage: Usage | None = None
        self.final = False  # the answer's own complete usage arrived
        self.upstream_id: str | None = None
        self.deltas = 0  # events that carried generated text
        # The most tokens those events can hold: vLLM sends a token's text as soon as it is
        # whole, so a delta of ASCII text is one token; only a token that ends inside a
        # multi-byte character is held back and sent with the next, each at least one byte.
        self.most_tokens = 0

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to send to the client now: the complete events that arrived, up to the end."""
        complete, self._buffer = take_events(self._buffer, chunk)
        if not complete:
            return b""
        if self._held:
            self._held += complete
            return b""
        at = 0
        for event in complete.split(b"\n\n")[:-1]:
            if self._observe(event):
                self._held = complete[at:]
                return complete[:at]
            at += len(event) + 2
        return complete

    def finish(self) -> bytes:
        """Whatever is left when the upstream closes, except the held-back end."""
        rest, self._buffer = self._buffer, b""
        if not rest.strip():
            return b""
        if self._held:
            self._held += rest
            return b""
        if self._observe(rest.rstrip(b"\n")):
            self._held = rest
            return b""
        return rest

    def tail(self) -> bytes:
        """The held-back end of the answer, to send once its usage is recorded."""
        held, self._held = self._held, b""
        return held

    def relayed_text(self) -> str:
        """The generated text the client was sent (at most MAX_TEXT_CHARS of it)."""
        return "".join(self._text)

    def error_event(self, message: str, code: str) -> bytes:
        """An in-band error in this stream's own dialect, for a model server that broke off."""
        body: dict[str, object]
        if self._shape == "anthropic":
            body = {"type": "error", "error": {"type": "api_error", "message": message}}
        else:
            body = {"type": "error", "code": code, "message": message, "param": None}
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"

    # -- reading events -------------------------------------------------------------------------

    def _observe(self, event: bytes) -> bool:
        """Note what the event says; True when it ends the answer."""
        kind, data = _split(event)
        if self._shape == "anthropic":
            return self._anthropic(kind, data)
        return self._responses(kind, data)

    def _keep_text(self, text: object) -> None:
        if isinstance(text, str) and text:
            self.deltas += 1
            self.most_tokens += 1 if text.isascii() else len(text.encode())
            if self._text_chars < MAX_TEXT_CHARS:
                self._text.append(text)
                self._text_chars += len(text)

    def _responses(self, kind: str, data: bytes) -> bool:
        if kind.endswith(".delta"):
            value = _json(data)
            if value is not None:
                self._keep_text(value.get("delta"))
            return False
        if kind == "response.created":
            value = _json(data)
            response = value.get("response") if value else None
            if isinstance(response, dict) and isinstance(response.get("id"), str):
                self.upstream_id = response["id"]
            return False
        if kind in _RESPONSES_END:
            value = _json(data)
            response = value.get("response") if value else None
            if isinstance(response, dict):
                usage = responses_usage(response.get("usage"))
                if usage is not None:
                    self.usage, self.final = usage, True
            return True
        return False

    def _anthropic(self, kind: str, data: bytes) -> bool:
        if kind == "content_block_delta":
            value = _json(data)
            delta = value.get("delta") if value else None
            if isinstance(delta, dict):
                for key in ("text", "thinking", "partial_json"):
                    if key in delta:
                        self._keep_text(delta[key])
                        break
            return False
        if kind == "message_start":
            value = _json(data)
            message = value.get("message") if value else None
            if isinstance(message, dict):
                if isinstance(message.get("id"), str):
                    self.upstream_id = message["id"]
                usage = anthropic_usage(message.get("usage"))
                if usage is not None:
                    self.usage = usage  # the prompt; nothing generated yet
            return False
        if kind == "message_delta":
            value = _json(data)
            usage = anthropic_usage(value.get("usage")) if value else None
            if usage is not None:
                self.usage, self.final = usage, True
            return False
        return kind == "message_stop"
