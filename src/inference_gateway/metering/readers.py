"""Reading token counts out of model-server responses.

Everything here is a pure function of bytes so that it is cheap to test and cheap to run.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

_USAGE_KEY = b'"usage"'


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


def _as_usage(value: object) -> Usage | None:
    if not isinstance(value, dict):
        return None
    prompt = value.get("prompt_tokens")
    completion = value.get("completion_tokens", 0)
    if completion is None:
        completion = 0
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    if isinstance(prompt, bool) or isinstance(completion, bool):
        return None
    return Usage(max(prompt, 0), max(completion, 0))


def _closing_brace(data: bytes, start: int) -> int:
    """Index just past the object that opens at ``start``, or -1. Strings are honoured."""
    end = data.find(b"}", start)
    if end != -1:
        inner = data[start + 1 : end]
        # Fast path for a flat object, as usage is: the first "}" closes it when no "{" opens
        # before it and it is not inside a string (an even number of quotes, none escaped).
        if b"{" not in inner and inner.count(b'"') % 2 == 0 and b"\\" not in inner:
            return end + 1
    depth = 0
    in_string = False
    i = start
    end = len(data)
    while i < end:
        c = data[i]
        if in_string:
            if c == 0x5C:  # backslash: skip the escaped byte
                i += 1
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c == 0x7B:
            depth += 1
        elif c == 0x7D:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def usage_span(data: bytes) -> tuple[int, int, Usage | None] | None:
    """Locate the top-level ``"usage": {...}`` of a JSON object without parsing all of it.

    Returns ``(key_start, value_end, usage)``. A JSON string cannot hold an unescaped quote, so
    the last ``"usage"`` followed by a colon is a key; model servers put it after the choices,
    which is why searching from the end finds the top-level one. Returns None when absent.
    """
    key = data.rfind(_USAGE_KEY)
    while key != -1:
        i = key + len(_USAGE_KEY)
        while i < len(data) and data[i] in b" \t\r\n":
            i += 1
        if i < len(data) and data[i] == 0x3A:  # ':'
            i += 1
            while i < len(data) and data[i] in b" \t\r\n":
                i += 1
            if data.startswith(b"null", i):
                return key, i + 4, None
            if i < len(data) and data[i] == 0x7B:
                end = _closing_brace(data, i)
                if end == -1:
                    return None
                try:
                    return key, end, _as_usage(orjson.loads(data[i:end]))
                except orjson.JSONDecodeError:
                    return None
        key = data.rfind(_USAGE_KEY, 0, key)
    return None


def read_usage(body: bytes) -> Usage | None:
    """Token counts of a whole (non-streamed) response body, or None if it has none."""
    span = usage_span(body)
    if span is not None:
        return span[2]
    return None
