"""Helpers of the real-vLLM suite: SDK clients, raw streams, comparing events, stored rows."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import openai

from harness import wait_rows

SERVED_MODEL = "facebook/opt-125m"
HELLO = [{"role": "user", "content": "Hello!"}]
TEXT_PROMPT = "The quick brown fox"
# Request fields that are vLLM's own, not the OpenAI API's: the SDK sends them as extra_body.
VLLM_FIELDS = ("ignore_eos", "return_token_ids")

Endpoint = Literal["chat", "completions"]
DONE = b"data: [DONE]\n\n"

_ID = re.compile(rb'"id":"(?:chatcmpl|cmpl)-[0-9a-f]+"')
_CREATED = re.compile(rb'"created":\d+')


@dataclass(frozen=True)
class VllmServer:
    url: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def log_lines(self, needle: str) -> list[str]:
        """The lines of the server's log that mention ``needle`` (for failure messages)."""
        return [line for line in self.log_text().splitlines() if needle in line]

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> bool:
        """True once ``needle`` is in the server's log (it is written a little after the fact)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log_text():
                return True
            time.sleep(0.05)
        return needle in self.log_text()

    def count_tokens(self, fields: dict[str, Any]) -> int:
        """vLLM's own count of a prompt (``prompt``, or ``messages`` with the chat template)."""
        request = urllib.request.Request(
            f"{self.url}/tokenize", data=json.dumps({"model": SERVED_MODEL, **fields}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            count: int = json.loads(response.read())["count"]
        return count


def sdk(base_url: str, tenant: tuple[str, str] | None = None) -> openai.OpenAI:
    """The openai SDK, for the gateway (with tenant headers) or for vLLM itself."""
    headers = {"X-TEMBO-ORG": tenant[0], "X-TEMBO-INSTANCE": tenant[1]} if tenant else {}
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", default_headers=headers,
                         max_retries=0, timeout=60)


def async_sdk(base_url: str, tenant: tuple[str, str] | None = None) -> openai.AsyncOpenAI:
    headers = {"X-TEMBO-ORG": tenant[0], "X-TEMBO-INSTANCE": tenant[1]} if tenant else {}
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused",
                              default_headers=headers, max_retries=0, timeout=120)


def sdk_args(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` as keyword arguments of ``create``: vLLM's own fields go in ``extra_body``."""
    args = {k: v for k, v in body.items() if k not in VLLM_FIELDS}
    extra = {k: body[k] for k in VLLM_FIELDS if k in body}
    if extra:
        args["extra_body"] = extra
    return args


def body_for(endpoint: Endpoint, **fields: Any) -> dict[str, Any]:
    """A request body for ``endpoint`` with the suite's default prompt."""
    body: dict[str, Any] = {"model": SERVED_MODEL}
    if endpoint == "chat":
        body["messages"] = HELLO
    else:
        body["prompt"] = TEXT_PROMPT
    body.update(fields)
    return body


@dataclass(frozen=True)
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def request_id(self) -> str:
        return self.headers["x-request-id"]


def post(client: openai.OpenAI, endpoint: Endpoint, body: dict[str, Any]) -> Raw:
    """Send ``body`` with the SDK and return the answer's exact bytes, errors included."""
    resource: Any = client.chat.completions if endpoint == "chat" else client.completions
    try:
        with resource.with_streaming_response.create(**sdk_args(body)) as response:
            data = response.read()
            return Raw(response.status_code, {k.lower(): v for k, v in response.headers.items()},
                       data)
    except openai.APIStatusError as exc:
        return Raw(exc.status_code, {k.lower(): v for k, v in exc.response.headers.items()},
                   exc.response.read())


def events(stream: bytes) -> list[bytes]:
    """The ``data:`` payloads of an SSE body, checking vLLM's framing on the way."""
    assert stream.endswith(DONE), f"the stream does not end with [DONE]: {stream[-200:]!r}"
    blocks = stream.split(b"\n\n")
    assert blocks[-1] == b"", "the stream does not end with a blank line"
    payloads = []
    for block in blocks[:-1]:
        assert block.startswith(b"data: ") and b"\n" not in block, f"not one data line: {block!r}"
        payloads.append(block[len(b"data: "):])
    assert payloads[-1] == b"[DONE]" and b"[DONE]" not in payloads[:-1]
    return payloads


def normalise(event: bytes) -> bytes:
    """An event with the per-request ``id`` and ``created`` replaced, byte for byte otherwise."""
    return _CREATED.sub(b'"created":0', _ID.sub(b'"id":"ID"', event))


def json_events(stream: bytes) -> list[dict[str, Any]]:
    return [json.loads(normalise(e)) for e in events(stream)[:-1]]


def by_choice(payloads: list[bytes]) -> dict[int | None, list[bytes]]:
    """Events grouped by the choice they carry (None: usage-only events), order kept in each."""
    groups: dict[int | None, list[bytes]] = {}
    for payload in payloads:
        if payload == b"[DONE]":
            continue
        choices = json.loads(payload)["choices"]
        key = choices[0]["index"] if choices else None
        groups.setdefault(key, []).append(normalise(payload))
    return groups


def _text_holder(choice: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """Where a stream choice keeps its generated text: ``delta.content`` or ``text``."""
    if "text" in choice:
        return choice, "text"
    delta = choice.get("delta")
    if isinstance(delta, dict) and "role" not in delta and isinstance(delta.get("content"), str):
        return delta, "content"
    return None


def text_pieces(payloads: list[bytes]) -> dict[int, list[str]]:
    """Each choice's generated text, cut where the stream cut it."""
    pieces: dict[int, list[str]] = {}
    for payload in payloads[:-1]:
        for choice in json.loads(payload)["choices"]:
            holder = _text_holder(choice)
            if holder is not None:
                pieces.setdefault(choice["index"], []).append(holder[0][holder[1]])
    return pieces


def coalesce(payloads: list[bytes]) -> dict[int | None, list[str]]:
    """Each choice's events with its text chunks merged into one, as vLLM merges them.

    vLLM merges the deltas of consecutive steps when its own consumer falls behind, so two
    runs of one request may cut the same text into different chunks. A merged chunk is the
    later chunk with the text of both; merging every text chunk of a choice gives a form that
    does not depend on that timing. Events are compared as JSON text, so member order counts.
    """
    groups: dict[int | None, list[dict[str, Any]]] = {}
    pending: dict[int, dict[str, Any]] = {}
    for payload in payloads[:-1]:
        event = json.loads(normalise(payload))
        if not event["choices"]:
            groups.setdefault(None, []).append(event)
            continue
        choice = event["choices"][0]
        index = choice["index"]
        holder = _text_holder(choice)
        if holder is None:
            groups.setdefault(index, []).append(event)
            continue
        earlier = pending.get(index)
        if earlier is not None:
            before = _text_holder(earlier["choices"][0])
            assert before is not None
            holder[0][holder[1]] = before[0][before[1]] + holder[0][holder[1]]
        pending[index] = event
    for index, event in pending.items():
        groups.setdefault(index, []).append(event)
    return {k: [json.dumps(e) for e in v] for k, v in groups.items()}


def shape(value: Any) -> Any:
    """The structure of a JSON value: member names in order, and value types, not values.

    A list is described by the distinct shapes of its elements, so lengths may differ.
    """
    if isinstance(value, dict):
        return tuple((k, shape(v)) for k, v in value.items())
    if isinstance(value, list):
        distinct: list[Any] = []
        for item in value:
            item_shape = shape(item)
            if item_shape not in distinct:
                distinct.append(item_shape)
        return ("list", tuple(distinct))
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def final_usage(stream: bytes) -> dict[str, int]:
    """The usage of a stream's usage-only chunk (``choices: []``)."""
    last = json.loads(events(stream)[-2])
    assert last["choices"] == [] and "usage" in last, f"no usage chunk at the end: {last}"
    usage: dict[str, int] = last["usage"]
    return usage


def row(database_url: str, request_id: str, timeout: float = 15) -> dict[str, Any]:
    [found] = asyncio.run(row_async(database_url, [request_id], timeout))
    return found


async def row_async(database_url: str, request_ids: list[str],
                    timeout: float = 15) -> list[dict[str, Any]]:
    """The stored records of these requests, in the same order; fails if one is missing."""
    ids = [uuid.UUID(r) for r in request_ids]
    rows = await wait_rows(database_url, "request_id = ANY($1::uuid[])", (ids,), len(ids),
                           timeout)
    found = {str(r["request_id"]): dict(r) for r in rows}
    missing = [r for r in request_ids if r not in found]
    assert not missing, f"no record stored for {missing}"
    return [found[r] for r in request_ids]


def tenant_rows(database_url: str, tenant: tuple[str, str], count: int,
                timeout: float = 15) -> list[dict[str, Any]]:
    rows = asyncio.run(wait_rows(database_url, "organization_id = $1 AND instance_id = $2",
                                 tenant, count, timeout))
    return [dict(r) for r in rows]
