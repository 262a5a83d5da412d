"""The simulator answers like the real vLLM server: same JSON structure, SSE framing and errors.

Each request goes to vLLM and to the simulator directly. Text and token counts may differ; the
members of every JSON object (names and order, at every level), the types of their values, the
sequence of stream events, the status codes and the error ``type``/``param``/``code`` may not.
When this fails, the simulator is what needs fixing.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from e2e_support import HELLO, SERVED_MODEL, TEXT_PROMPT, VllmServer, events, shape

from harness import Proc, start_simulator

MAX_MODEL_LEN = 512  # the tiny model's context, given to the simulator too
HEX = re.compile(r"[0-9a-f]")


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: bytes | dict[str, Any] | list[Any] | None = None  # None: a GET
    method: str | None = None


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": SERVED_MODEL, "messages": HELLO, "max_tokens": 4, **fields}


def text(**fields: Any) -> dict[str, Any]:
    return {"model": SERVED_MODEL, "prompt": TEXT_PROMPT, "max_tokens": 4, **fields}


STREAM_OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {"stream": True},
    "usage": {"stream": True, "stream_options": {"include_usage": True}},
    "continuous": {"stream": True,
                   "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    "continuous-only": {"stream": True, "stream_options": {"continuous_usage_stats": True}},
}

CASES = [
    Case("health", "/health"),
    Case("models", "/v1/models"),
    Case("version", "/version"),
    Case("tokenize-prompt", "/tokenize", {"model": SERVED_MODEL, "prompt": TEXT_PROMPT}),
    Case("tokenize-messages", "/tokenize", {"model": SERVED_MODEL, "messages": HELLO}),
    Case("chat", "/v1/chat/completions", chat()),
    Case("chat-n2", "/v1/chat/completions", chat(n=2)),
    Case("chat-no-model", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2}),
    Case("chat-token-ids", "/v1/chat/completions", chat(return_token_ids=True)),
    *(Case(f"chat-stream-{k}", "/v1/chat/completions", chat(**v))
      for k, v in STREAM_OPTIONS.items()),
    Case("chat-stream-n2", "/v1/chat/completions", chat(n=2, **STREAM_OPTIONS["plain"])),
    Case("chat-stream-n2-usage", "/v1/chat/completions", chat(n=2, **STREAM_OPTIONS["usage"])),
    Case("chat-stream-token-ids", "/v1/chat/completions",
         chat(return_token_ids=True, **STREAM_OPTIONS["plain"])),
    Case("text", "/v1/completions", text()),
    Case("text-n2", "/v1/completions", text(n=2)),
    Case("text-two-prompts", "/v1/completions", text(prompt=["a b", "c"])),
    Case("text-token-ids", "/v1/completions", text(return_token_ids=True)),
    *(Case(f"text-stream-{k}", "/v1/completions", text(**v)) for k, v in STREAM_OPTIONS.items()),
    Case("text-stream-n2", "/v1/completions", text(n=2, **STREAM_OPTIONS["plain"])),
    Case("text-stream-n2-usage", "/v1/completions", text(n=2, **STREAM_OPTIONS["usage"])),
    # Errors.
    Case("unknown-model", "/v1/chat/completions", chat(model="no-such-model")),
    Case("unknown-model-text-stream", "/v1/completions",
         text(model="no-such-model", stream=True)),
    Case("unknown-model-tokenize", "/tokenize", {"model": "no-such-model", "prompt": "x"}),
    Case("max-tokens-too-large", "/v1/chat/completions", chat(max_tokens=100_000)),
    Case("max-tokens-too-large-stream", "/v1/chat/completions",
         chat(max_tokens=100_000, stream=True)),
    Case("max-tokens-too-large-text", "/v1/completions", text(max_tokens=100_000)),
    Case("max-tokens-context-plus-one", "/v1/chat/completions",
         chat(max_tokens=MAX_MODEL_LEN + 1)),
    Case("max-completion-tokens-too-large", "/v1/chat/completions",
         {"model": SERVED_MODEL, "messages": HELLO, "max_completion_tokens": 600}),
    Case("max-tokens-zero", "/v1/chat/completions", chat(max_tokens=0)),
    Case("prompt-too-long", "/v1/completions", text(prompt="hello world " * 400)),
    Case("malformed-json", "/v1/chat/completions",
         b'{"model": "facebook/opt-125m", "messages": ['),
    Case("empty-body", "/v1/chat/completions", b""),
    Case("body-not-an-object", "/v1/chat/completions", [1, 2]),
    Case("missing-messages", "/v1/chat/completions", {"model": SERVED_MODEL}),
    Case("messages-not-a-list", "/v1/chat/completions", chat(messages="hi")),
    Case("empty-messages", "/v1/chat/completions", chat(messages=[])),
    Case("max-tokens-not-a-number", "/v1/chat/completions", chat(max_tokens="lots")),
    Case("missing-prompt", "/v1/completions", {"model": SERVED_MODEL, "max_tokens": 2}),
    Case("stream-options-without-stream", "/v1/chat/completions",
         chat(stream_options={"include_usage": True})),
    Case("n2-greedy", "/v1/chat/completions", chat(n=2, temperature=0)),
    Case("unknown-route", "/v1/nope"),
    Case("unknown-route-post", "/v1/nope", {}),
    Case("wrong-method", "/v1/chat/completions", method="GET"),
]


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str | None
    body: bytes


def send(base_url: str, case: Case) -> Answer:
    data: bytes | None
    if case.body is None:
        data = None
    elif isinstance(case.body, bytes):
        data = case.body
    else:
        data = json.dumps(case.body).encode()
    request = urllib.request.Request(
        base_url + case.path, data=data, method=case.method or ("GET" if data is None else "POST"),
        headers={} if data is None else {"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return Answer(response.status, response.headers.get("Content-Type"), response.read())
    except urllib.error.HTTPError as err:
        return Answer(err.code, err.headers.get("Content-Type"), err.read())


@pytest.fixture(scope="module")
def simulator_like_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    proc = start_simulator(tmp_path_factory.mktemp("conformance"), "--model", SERVED_MODEL,
                           "--max-model-len", str(MAX_MODEL_LEN))
    yield proc
    proc.stop()


def collapse(shapes: list[Any]) -> list[Any]:
    """Runs of events of one shape as one: the number of text chunks is not structure."""
    out: list[Any] = []
    for s in shapes:
        if not out or out[-1] != s:
            out.append(s)
    return out


def assert_same_ids(real: dict[str, Any], simulated: dict[str, Any]) -> None:
    """``id`` and ``system_fingerprint`` look alike: same prefix, same number of hex digits."""
    for member in ("id", "system_fingerprint"):
        if isinstance(real.get(member), str):
            assert HEX.sub("x", simulated[member]) == HEX.sub("x", real[member]), member


def assert_same_stream(real: bytes, simulated: bytes, n: int) -> None:
    real_events, sim_events = events(real), events(simulated)  # framing, [DONE] last
    assert_same_ids(json.loads(real_events[0]), json.loads(sim_events[0]))
    assert_same_ids(json.loads(real_events[-2]), json.loads(sim_events[-2]))
    want = [shape(json.loads(e)) for e in real_events[:-1]]
    got = [shape(json.loads(e)) for e in sim_events[:-1]]
    assert got[0] == want[0], "first event"
    assert got[-1] == want[-1], "last event before [DONE]"
    assert set(got) == set(want), "kinds of event"
    if n == 1:
        assert collapse(got) == collapse(want), "sequence of events"
    else:
        # Choices interleave as they are generated: compare each choice's own sequence.
        for index in range(n):
            def of(evs: list[bytes], i: int = index) -> list[Any]:
                return collapse([shape(json.loads(e)) for e in evs[:-1]
                                 if json.loads(e)["choices"]
                                 and json.loads(e)["choices"][0]["index"] == i])
            assert of(sim_events) == of(real_events), f"sequence of events of choice {index}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_simulator_answers_like_vllm(case: Case, vllm: VllmServer,
                                     simulator_like_vllm: Proc) -> None:
    real = send(vllm.url, case)
    simulated = send(simulator_like_vllm.url, case)
    assert simulated.status == real.status
    assert simulated.content_type == real.content_type
    if not real.body:
        assert simulated.body == real.body
        return
    if real.content_type and real.content_type.startswith("text/event-stream"):
        body = case.body if isinstance(case.body, dict) else {}
        assert_same_stream(real.body, simulated.body, int(body.get("n") or 1))
        return
    want, got = json.loads(real.body), json.loads(simulated.body)
    assert shape(got) == shape(want)
    if isinstance(want, dict):
        assert_same_ids(want, got)
    if "error" in want:
        for member in ("type", "param", "code"):
            assert got["error"][member] == want["error"][member], member
