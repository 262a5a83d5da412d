"""The simulator answers like the real vLLM server: same JSON structure, SSE framing and errors.

Each request goes to vLLM and to the simulator directly: generation requests to the suite's
generation server, embeddings, score and rerank to its pooling server. Text and token counts may
differ; the members of every JSON object (names and order, at every level), the types of their
values, the sequence of stream events, the status codes and the error ``type``/``param``/``code``
may not. When this fails, the simulator is what needs fixing.
"""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from e2e_support import HELLO, SERVED_MODEL, TEXT_PROMPT, VllmServer, events, shape

from harness import Proc, start_simulator

MAX_MODEL_LEN = 512  # the tiny model's context, given to the simulator too
HEX = re.compile(r"[0-9a-f]")
SAMPLES = Path(__file__).resolve().parent / "vllm_samples.md"
# The simulator runs with the flags the suite's vLLM runs with, and some time per token so that
# a background response is still queued when the test cancels it, as on the real server.
SIMULATOR_FLAGS = ("--enable-prompt-tokens-details", "--enable-store", "--check-content-type",
                   "--tpot-ms", "5")
TOO_LONG = "hello world " * 300
GIANT = 2**70  # 1180591620717411303424: larger than any integer type vLLM's engine uses


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: bytes | dict[str, Any] | list[Any] | None = None  # None: a GET
    method: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": SERVED_MODEL, "messages": HELLO, "max_tokens": 4, **fields}


def text(**fields: Any) -> dict[str, Any]:
    return {"model": SERVED_MODEL, "prompt": TEXT_PROMPT, "max_tokens": 4, **fields}


def respond(**fields: Any) -> dict[str, Any]:
    """A Responses request; ``ignore_eos`` so that vLLM, too, stops at the output limit."""
    return {"model": SERVED_MODEL, "input": "Hello!", "max_output_tokens": 3,
            "ignore_eos": True, **fields}


def message(**fields: Any) -> dict[str, Any]:
    return {"model": SERVED_MODEL, "max_tokens": 3, "messages": HELLO, **fields}


def batch(**fields: Any) -> dict[str, Any]:
    return {"model": SERVED_MODEL, "messages": [HELLO, [{"role": "user", "content": "Hi"}]],
            "max_tokens": 3, **fields}


def nested(depth: int) -> bytes:
    """A chat request with a member nested ``depth`` lists deep."""
    inner = "[" * depth + "]" * depth
    return (f'{{"model": "{SERVED_MODEL}", "max_tokens": 1, "messages": [{{"role": "user", '
            f'"content": "Hi", "extra": {inner}}}]}}').encode()


STREAM_OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {"stream": True},
    "usage": {"stream": True, "stream_options": {"include_usage": True}},
    "continuous": {"stream": True,
                   "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    "continuous-only": {"stream": True, "stream_options": {"continuous_usage_stats": True}},
}

CHAT, TEXT, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"
MESSAGES, COUNT, BATCH = "/v1/messages", "/v1/messages/count_tokens", "/v1/chat/completions/batch"

CASES = [
    Case("health", "/health"),
    Case("models", "/v1/models"),
    Case("version", "/version"),
    Case("tokenize-prompt", "/tokenize", {"model": SERVED_MODEL, "prompt": TEXT_PROMPT}),
    Case("tokenize-messages", "/tokenize", {"model": SERVED_MODEL, "messages": HELLO}),
    Case("chat", CHAT, chat()),
    Case("chat-n2", CHAT, chat(n=2)),
    Case("chat-no-model", CHAT, {"messages": HELLO, "max_tokens": 2}),
    Case("chat-token-ids", CHAT, chat(return_token_ids=True)),
    # Members vLLM does not know are ignored; an empty x_simulate asks the simulator for nothing.
    Case("chat-unknown-members", CHAT, chat(unknown_member={"a": 1}, x_simulate={})),
    Case("text-unknown-member-stream", TEXT, text(unknown_member=[1], stream=True)),
    *(Case(f"chat-stream-{k}", CHAT, chat(**v)) for k, v in STREAM_OPTIONS.items()),
    Case("chat-stream-n2", CHAT, chat(n=2, **STREAM_OPTIONS["plain"])),
    Case("chat-stream-n2-usage", CHAT, chat(n=2, **STREAM_OPTIONS["usage"])),
    Case("chat-stream-token-ids", CHAT, chat(return_token_ids=True, **STREAM_OPTIONS["plain"])),
    Case("text", TEXT, text()),
    Case("text-n2", TEXT, text(n=2)),
    Case("text-two-prompts", TEXT, text(prompt=["a b", "c"])),
    Case("text-token-ids", TEXT, text(return_token_ids=True)),
    *(Case(f"text-stream-{k}", TEXT, text(**v)) for k, v in STREAM_OPTIONS.items()),
    Case("text-stream-n2", TEXT, text(n=2, **STREAM_OPTIONS["plain"])),
    Case("text-stream-n2-usage", TEXT, text(n=2, **STREAM_OPTIONS["usage"])),
    # Errors.
    Case("unknown-model", CHAT, chat(model="no-such-model")),
    Case("unknown-model-text-stream", TEXT, text(model="no-such-model", stream=True)),
    Case("unknown-model-tokenize", "/tokenize", {"model": "no-such-model", "prompt": "x"}),
    Case("max-tokens-too-large", CHAT, chat(max_tokens=100_000)),
    Case("max-tokens-too-large-stream", CHAT, chat(max_tokens=100_000, stream=True)),
    Case("max-tokens-too-large-text", TEXT, text(max_tokens=100_000)),
    Case("max-tokens-context-plus-one", CHAT, chat(max_tokens=MAX_MODEL_LEN + 1)),
    Case("max-completion-tokens-too-large", CHAT,
         {"model": SERVED_MODEL, "messages": HELLO, "max_completion_tokens": 600}),
    Case("max-tokens-zero", CHAT, chat(max_tokens=0)),
    Case("prompt-too-long", TEXT, text(prompt="hello world " * 400)),
    Case("malformed-json", CHAT, b'{"model": "facebook/opt-125m", "messages": ['),
    Case("empty-body", CHAT, b""),
    Case("body-not-an-object", CHAT, [1, 2]),
    Case("missing-messages", CHAT, {"model": SERVED_MODEL}),
    Case("messages-not-a-list", CHAT, chat(messages="hi")),
    Case("empty-messages", CHAT, chat(messages=[])),
    Case("max-tokens-not-a-number", CHAT, chat(max_tokens="lots")),
    Case("missing-prompt", TEXT, {"model": SERVED_MODEL, "max_tokens": 2}),
    Case("stream-options-without-stream", CHAT, chat(stream_options={"include_usage": True})),
    Case("n2-greedy", CHAT, chat(n=2, temperature=0)),
    Case("not-json-content-type", CHAT, json.dumps(chat()).encode(),
         headers={"Content-Type": "text/plain"}),
    Case("unknown-route", "/v1/nope"),
    Case("unknown-route-post", "/v1/nope", {}),
    Case("wrong-method", CHAT, method="GET"),
    # Numbers no engine could honour, wrong types and deep nesting: refused before any work.
    Case("n-giant", CHAT, chat(n=GIANT)),
    Case("n-over-the-limit", CHAT, chat(n=100_000)),
    Case("n-past-int64", CHAT, chat(n=2**63)),
    Case("n-negative", CHAT, chat(n=-1)),
    Case("n-zero", CHAT, chat(n=0)),
    Case("n-false", CHAT, chat(n=False)),
    Case("n-fraction", CHAT, chat(n=2.5)),
    Case("n-float-giant", CHAT, chat(n=1e5)),
    Case("n-text-number", CHAT, chat(n="2", max_tokens=1)),
    Case("n-text-fraction", CHAT, chat(n="3.5")),
    Case("n-text-thousands-of-digits", CHAT, chat(n="9" * 5000)),
    Case("n-giant-text", TEXT, text(n=GIANT)),
    Case("n-negative-text", TEXT, text(n=-1)),
    Case("max-tokens-giant", CHAT, chat(max_tokens=GIANT)),
    Case("max-tokens-giant-text", TEXT, text(max_tokens=GIANT)),
    Case("max-tokens-float-giant", CHAT, chat(max_tokens=1e30)),
    Case("max-tokens-float-past-int64", CHAT, chat(max_tokens=1e19)),
    Case("max-tokens-negative", CHAT, chat(max_tokens=-5)),
    Case("max-tokens-negative-text", TEXT, text(max_tokens=-1)),
    Case("max-tokens-fraction", CHAT, chat(max_tokens=2.5)),
    Case("max-tokens-list", CHAT, chat(max_tokens=[1])),
    Case("max-tokens-thousands-of-digits", CHAT,
         b'{"model": "facebook/opt-125m", "messages": [{"role": "user", "content": "Hi"}], '
         b'"max_tokens": ' + b"9" * 5000 + b"}"),
    Case("seed-giant", CHAT, chat(seed=GIANT)),
    Case("temperature-negative", CHAT, chat(temperature=-1)),
    Case("temperature-above-two", CHAT, chat(temperature=3)),
    Case("temperature-infinite", CHAT, b'{"model": "facebook/opt-125m", "messages": '
         b'[{"role": "user", "content": "Hi"}], "temperature": 1e400}'),
    Case("temperature-text", CHAT, chat(temperature="hot")),
    Case("top-p-zero", CHAT, chat(top_p=0)),
    Case("top-k-below-minus-one", CHAT, chat(top_k=-2)),
    Case("min-p-above-one", CHAT, chat(min_p=2)),
    Case("presence-penalty-out-of-range", CHAT, chat(presence_penalty=5)),
    Case("repetition-penalty-zero", CHAT, chat(repetition_penalty=0)),
    Case("min-tokens-negative", CHAT, chat(min_tokens=-1)),
    Case("min-tokens-above-max-tokens", CHAT, chat(min_tokens=1_000_000, max_tokens=2)),
    Case("top-logprobs-too-many", CHAT, chat(logprobs=True, top_logprobs=21)),
    Case("top-logprobs-all", CHAT, chat(logprobs=True, top_logprobs=-1)),
    Case("top-logprobs-without-logprobs", CHAT, chat(top_logprobs=5)),
    Case("logprobs-too-many-text", TEXT, text(logprobs=1000)),
    Case("stream-not-a-bool", CHAT, chat(stream=2)),
    Case("model-not-a-string", CHAT, chat(model=5)),
    Case("messages-null", CHAT, chat(messages=None)),
    Case("max-tokens-null", CHAT, chat(max_tokens=None, n=None, temperature=None)),
    Case("token-id-out-of-vocabulary", TEXT, text(prompt=[1_000_000])),
    Case("token-id-giant", TEXT, text(prompt=[GIANT])),
    Case("token-id-negative", TEXT, text(prompt=[-1])),
    Case("empty-prompt-in-list", TEXT, text(prompt=["a", ""])),
    Case("prompt-not-text", TEXT, text(prompt=5)),
    Case("top-k-past-64-bits", CHAT, chat(top_k=2**64)),  # vLLM's engine fails: a 500
    Case("top-k-past-64-bits-stream", CHAT, chat(top_k=2**64, stream=True)),
    Case("top-k-past-64-bits-text", TEXT, text(top_k=2**64)),
    Case("top-k-past-64-bits-text-stream", TEXT, text(top_k=2**64, stream=True)),
    Case("min-tokens-null", CHAT, chat(min_tokens=None)),
    Case("message-not-an-object", CHAT, chat(messages=["a"])),
    Case("message-content-a-number", CHAT, chat(messages=[{"content": 5}])),
    Case("stop-too-many", CHAT, chat(stop=["a", "b", "c", "d", "e"])),
    Case("stream-options-empty", CHAT, chat(stream_options={})),
    Case("top-logprobs-not-a-number", CHAT, chat(top_logprobs="x", max_tokens="lots")),
    Case("logprobs-negative-text", TEXT, text(logprobs=-5, max_tokens="lots")),
    Case("prompt-list-too-long", TEXT, text(prompt=["a"] * 1025)),
    Case("prompt-empty-list", TEXT, text(prompt=[])),
    Case("prompt-token-true", TEXT, text(prompt=[True], max_tokens=1)),
    Case("nested-100-deep", CHAT, nested(100)),
    Case("nested-5000-deep", CHAT, nested(5000)),
    Case("body-nested-2000-deep", CHAT, b"[" * 2000 + b"]" * 2000),
    # The Responses API.
    Case("responses", RESPONSES, respond()),
    Case("responses-messages", RESPONSES,
         respond(input=HELLO, instructions="Be brief.", store=False)),
    Case("responses-content-parts", RESPONSES, respond(
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Hello!"}]}])),
    Case("responses-no-model", RESPONSES, {"input": "Hi", "max_output_tokens": 2}),
    Case("responses-stream", RESPONSES, respond(stream=True)),
    Case("responses-stream-not-stored", RESPONSES, respond(stream=True, store=False)),
    Case("responses-unknown-model", RESPONSES, respond(model="no-such-model")),
    Case("responses-missing-input", RESPONSES, {"model": SERVED_MODEL}),
    Case("responses-input-a-number", RESPONSES, respond(input=5)),
    Case("responses-input-null", RESPONSES, respond(input=None)),
    Case("responses-input-bad-item", RESPONSES, respond(input=[{"role": "user"}])),
    Case("responses-empty-input", RESPONSES, respond(input=[])),
    Case("responses-too-long", RESPONSES, respond(input=TOO_LONG)),
    Case("responses-max-output-too-large", RESPONSES, respond(max_output_tokens=100_000)),
    Case("responses-max-output-giant", RESPONSES, respond(max_output_tokens=GIANT)),
    Case("responses-max-output-zero", RESPONSES, respond(max_output_tokens=0)),
    Case("responses-max-output-negative", RESPONSES, respond(max_output_tokens=-1)),
    Case("responses-max-output-text", RESPONSES, respond(max_output_tokens="lots")),
    Case("responses-temperature-negative", RESPONSES, respond(temperature=-1)),
    Case("responses-unknown-previous", RESPONSES, respond(previous_response_id="resp_nope")),
    Case("responses-background-not-stored", RESPONSES, respond(background=True, store=False)),
    Case("responses-malformed-json", RESPONSES, b'{"model": "x", "input": ['),
    Case("responses-background-null", RESPONSES, respond(background=None)),
    Case("responses-input-a-mapping", RESPONSES, respond(input={})),
    Case("responses-top-k-past-64-bits", RESPONSES, respond(top_k=2**64)),
    Case("responses-top-k-past-64-bits-stream", RESPONSES, respond(top_k=2**64, stream=True)),
    Case("responses-get-unknown", "/v1/responses/resp_nope"),
    Case("responses-cancel-unknown", "/v1/responses/resp_nope/cancel", {}),
    # The Anthropic Messages API.
    Case("messages", MESSAGES, message()),
    Case("messages-system", MESSAGES, message(system="Be brief.")),
    Case("messages-blocks", MESSAGES, message(
        system=[{"type": "text", "text": "Be brief."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello!"}]}])),
    Case("messages-stream", MESSAGES, message(stream=True)),
    Case("messages-unknown-model", MESSAGES, message(model="no-such-model")),
    Case("messages-unknown-model-stream", MESSAGES, message(model="no-such-model", stream=True)),
    Case("messages-missing-max-tokens", MESSAGES, {"model": SERVED_MODEL, "messages": HELLO}),
    Case("messages-missing-messages", MESSAGES, {"model": SERVED_MODEL, "max_tokens": 3}),
    Case("messages-missing-model", MESSAGES, {"max_tokens": 3, "messages": HELLO}),
    Case("messages-max-tokens-too-large", MESSAGES, message(max_tokens=100_000)),
    Case("messages-max-tokens-giant", MESSAGES, message(max_tokens=GIANT)),
    Case("messages-max-tokens-zero", MESSAGES, message(max_tokens=0)),
    Case("messages-max-tokens-negative", MESSAGES, message(max_tokens=-1)),
    Case("messages-max-tokens-text", MESSAGES, message(max_tokens="lots")),
    Case("messages-max-tokens-null", MESSAGES, message(max_tokens=None)),
    Case("messages-empty", MESSAGES, message(messages=[])),
    Case("messages-too-long", MESSAGES,
         message(messages=[{"role": "user", "content": TOO_LONG}])),
    Case("messages-temperature-negative", MESSAGES, message(temperature=-1)),
    Case("messages-malformed-json", MESSAGES, b'{"model": "x", "messages": ['),
    Case("messages-item-not-an-object", MESSAGES, message(messages=[1, "a"])),
    Case("messages-bad-system-blocks", MESSAGES, message(system=[5])),
    Case("messages-stop-sequences-too-many", MESSAGES,
         message(stop_sequences=["a", "b", "c", "d", "e"])),
    Case("messages-top-k-past-64-bits", MESSAGES, message(top_k=2**64)),
    Case("messages-top-k-past-64-bits-stream", MESSAGES, message(top_k=2**64, stream=True)),
    Case("count-tokens", COUNT, {"model": SERVED_MODEL, "messages": HELLO}),
    Case("count-tokens-system", COUNT,
         {"model": SERVED_MODEL, "messages": HELLO, "system": "Be brief."}),
    Case("count-tokens-unknown-model", COUNT, {"model": "no-such-model", "messages": HELLO}),
    Case("count-tokens-missing-messages", COUNT, {"model": SERVED_MODEL}),
    Case("count-tokens-empty", COUNT, {"model": SERVED_MODEL, "messages": []}),
    Case("count-tokens-too-long", COUNT,
         {"model": SERVED_MODEL, "messages": [{"role": "user", "content": TOO_LONG}]}),
    # Batched chat completions.
    Case("batch", BATCH, batch()),
    Case("batch-stream-ignored", BATCH, batch(stream=True)),
    Case("batch-n2", BATCH, batch(n=2)),
    Case("batch-unknown-model", BATCH, batch(model="no-such-model")),
    Case("batch-missing-messages", BATCH, {"model": SERVED_MODEL}),
    Case("batch-no-conversations", BATCH, batch(messages=[])),
    Case("batch-empty-conversation", BATCH, batch(messages=[[]])),
    Case("batch-not-nested", BATCH, batch(messages=HELLO)),
    Case("batch-messages-null", BATCH, batch(messages=None)),
    Case("batch-max-tokens-too-large", BATCH, batch(max_tokens=100_000)),
    Case("batch-max-tokens-zero", BATCH, batch(max_tokens=0)),
    Case("batch-too-long", BATCH,
         batch(messages=[HELLO, [{"role": "user", "content": TOO_LONG}]])),
    Case("batch-stream-options-without-stream", BATCH,
         batch(stream_options={"include_usage": True})),
    Case("batch-n-zero", BATCH, batch(n=0)),
    Case("batch-stream-not-a-bool", BATCH, batch(stream=[], max_tokens=100_000)),
    Case("batch-message-not-an-object", BATCH, batch(messages=[[1, "a"]])),
]

EMBED, SCORE, RERANK = "/v1/embeddings", "/v1/score", "/v1/rerank"
QUESTION = "What is the capital of France?"
DOCUMENTS = ["Paris is the capital.", "The sky is blue."]


def embed(**fields: Any) -> dict[str, Any]:
    return {"model": SERVED_MODEL, "input": TEXT_PROMPT, **fields}


def score(**fields: Any) -> dict[str, Any]:
    return {"model": SERVED_MODEL, "text_1": QUESTION, "text_2": DOCUMENTS, **fields}


def rerank(**fields: Any) -> dict[str, Any]:
    return {"model": SERVED_MODEL, "query": QUESTION, "documents": DOCUMENTS, **fields}


POOLING_CASES = [
    Case("pooling-models", "/v1/models"),
    Case("embeddings", EMBED, embed()),
    Case("embeddings-list", EMBED, embed(input=[TEXT_PROMPT, "Hello"])),
    Case("embeddings-token-ids", EMBED, embed(input=[5, 6, 7])),
    Case("embeddings-token-id-lists", EMBED, embed(input=[[5, 6], [7]])),
    Case("embeddings-base64", EMBED, embed(encoding_format="base64")),
    Case("embeddings-no-model", EMBED, {"input": "Hi"}),
    Case("embeddings-unknown-member", EMBED, embed(unknown_member=None, x_simulate={})),
    Case("embeddings-unknown-model", EMBED, embed(model="no-such-model")),
    Case("embeddings-missing-input", EMBED, {"model": SERVED_MODEL}),
    Case("embeddings-input-a-number", EMBED, embed(input=5)),
    Case("embeddings-input-mixed", EMBED, embed(input=["a", 5])),
    Case("embeddings-empty-text", EMBED, embed(input="")),
    Case("embeddings-empty-list", EMBED, embed(input=[])),
    Case("embeddings-dimensions", EMBED, embed(dimensions=8)),
    Case("embeddings-unknown-encoding", EMBED, embed(encoding_format="nope")),
    Case("embeddings-token-out-of-vocabulary", EMBED, embed(input=[1_000_000])),
    Case("embeddings-too-long", EMBED, embed(input=TOO_LONG)),
    Case("embeddings-truncate-giant", EMBED, embed(truncate_prompt_tokens=100_000)),
    Case("embeddings-truncate-zero", EMBED, embed(truncate_prompt_tokens=0)),
    Case("embeddings-truncate-below-minus-one", EMBED, embed(truncate_prompt_tokens=-2)),
    Case("embeddings-encoding-null", EMBED, embed(encoding_format=None)),
    Case("embeddings-signed-token-lists", EMBED, embed(input=[[-1]])),
    Case("score", SCORE, score()),
    Case("score-one-to-one", SCORE, score(text_2="Paris.")),
    Case("score-pairs", SCORE, score(text_1=["a", "b"], text_2=["c", "d"])),
    Case("score-queries-documents", "/score",
         {"model": SERVED_MODEL, "queries": QUESTION, "documents": DOCUMENTS}),
    Case("score-uneven", SCORE, score(text_1=["a", "b"], text_2=["c", "d", "e"])),
    Case("score-no-pairs", SCORE, score(text_2=[])),
    Case("score-unknown-model", SCORE, score(model="no-such-model")),
    Case("score-missing-side", SCORE, {"model": SERVED_MODEL, "text_1": QUESTION}),
    Case("score-missing-both", SCORE, {"model": SERVED_MODEL}),
    Case("score-too-long", SCORE, score(text_1=TOO_LONG)),
    Case("rerank", RERANK, rerank()),
    Case("rerank-top-n", RERANK, rerank(top_n=1)),
    Case("rerank-top-n-zero", RERANK, rerank(top_n=0)),
    Case("rerank-top-n-giant", "/rerank", rerank(top_n=GIANT)),
    Case("rerank-top-n-negative", RERANK, rerank(top_n=-1)),
    Case("rerank-one-document", RERANK, rerank(documents="Paris.")),
    Case("rerank-unknown-model", RERANK, rerank(model="no-such-model")),
    Case("rerank-missing-documents", RERANK, {"model": SERVED_MODEL, "query": QUESTION}),
    Case("rerank-missing-both", RERANK, {"model": SERVED_MODEL}),
    Case("rerank-no-documents", RERANK, rerank(documents=[])),
    Case("rerank-empty-query", RERANK, rerank(query="")),
    Case("rerank-query-a-number", RERANK, rerank(query=5)),
    Case("rerank-top-n-null", RERANK, rerank(top_n=None)),
    Case("rerank-multimodal-document", RERANK,
         rerank(documents=[{"content": [{"type": "text", "text": "hi"}]}])),
]


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str | None
    body: bytes
    complete: bool = True  # False: the server broke the connection off mid-answer

    def json(self) -> Any:
        return json.loads(self.body)


def send(base_url: str, case: Case) -> Answer:
    data: bytes | None
    if case.body is None:
        data = None
    elif isinstance(case.body, bytes):
        data = case.body
    else:
        data = json.dumps(case.body).encode()
    headers = {} if data is None else {"Content-Type": "application/json"}
    request = urllib.request.Request(
        base_url + case.path, data=data, method=case.method or ("GET" if data is None else "POST"),
        headers={**headers, **case.headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            content_type = response.headers.get("Content-Type")
            try:
                return Answer(response.status, content_type, response.read())
            except http.client.IncompleteRead as cut:
                return Answer(response.status, content_type, cut.partial, complete=False)
    except urllib.error.HTTPError as err:
        return Answer(err.code, err.headers.get("Content-Type"), err.read())


def start_like_vllm(tmp_path_factory: pytest.TempPathFactory, *flags: str) -> Proc:
    return start_simulator(tmp_path_factory.mktemp("conformance"), "--model", SERVED_MODEL,
                           "--max-model-len", str(MAX_MODEL_LEN), *flags)


@pytest.fixture(scope="module")
def simulator_like_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    proc = start_like_vllm(tmp_path_factory, *SIMULATOR_FLAGS)
    yield proc
    proc.stop()


def collapse(shapes: list[Any]) -> list[Any]:
    """Runs of events of one shape as one: the number of text chunks is not structure."""
    out: list[Any] = []
    for s in shapes:
        if not out or out[-1] != s:
            out.append(s)
    return out


def looks_alike(real: str, simulated: str) -> bool:
    """Ids look alike: same prefix, same number of hex digits."""
    return HEX.sub("x", simulated) == HEX.sub("x", real)


def assert_same_ids(real: Any, simulated: Any, where: str = "") -> None:
    """Every ``id``, ``item_id`` and ``system_fingerprint`` looks like vLLM's, at every level."""
    if isinstance(real, dict) and isinstance(simulated, dict):
        for key, value in real.items():
            if key in ("id", "item_id", "system_fingerprint") and isinstance(value, str):
                assert looks_alike(value, simulated[key]), f"{where}.{key}"
            elif key in simulated:
                assert_same_ids(value, simulated[key], f"{where}.{key}")
    elif isinstance(real, list) and isinstance(simulated, list) and real and simulated:
        assert_same_ids(real[0], simulated[0], f"{where}[0]")


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


def typed_events(stream: bytes) -> list[tuple[str, dict[str, Any]]]:
    """The events of a Responses or Messages stream: ``event: <type>`` then one data line."""
    blocks = stream.split(b"\n\n")
    assert blocks[-1] == b"", "the stream does not end with a blank line"
    out = []
    for block in blocks[:-1]:
        lines = block.split(b"\n")
        assert len(lines) == 2 and lines[0].startswith(b"event: ") \
            and lines[1].startswith(b"data: "), f"not one event and one data line: {block!r}"
        kind, data = lines[0][len(b"event: "):].decode(), json.loads(lines[1][len(b"data: "):])
        assert data["type"] == kind, block
        out.append((kind, data))
    assert b"[DONE]" not in stream
    return out


def assert_same_typed_stream(real: bytes, simulated: bytes) -> None:
    want, got = typed_events(real), typed_events(simulated)
    assert collapse([k for k, _ in got]) == collapse([k for k, _ in want]), "sequence of events"
    shapes: dict[str, set[Any]] = {}
    for kind, data in want:
        shapes.setdefault(kind, set()).add(shape(data))
    for kind, data in got:
        assert shape(data) in shapes[kind], f"shape of {kind}"
    assert_same_ids(want[0][1], got[0][1])
    assert_same_ids(want[-1][1], got[-1][1])
    if "sequence_number" in want[0][1]:
        first = got[0][1]["sequence_number"]
        assert [d["sequence_number"] for _, d in got] == list(range(first, first + len(got)))


def assert_same_answer(real: Answer, simulated: Answer, case: Case) -> None:
    assert simulated.status == real.status
    assert simulated.content_type == real.content_type
    assert simulated.complete == real.complete, "the answer is broken off"
    if not real.body:
        assert simulated.body == real.body
        return
    if real.content_type and real.content_type.startswith("text/event-stream"):
        if real.body.startswith(b"event: "):
            assert_same_typed_stream(real.body, simulated.body)
            return
        body = case.body if isinstance(case.body, dict) else {}
        assert_same_stream(real.body, simulated.body, int(body.get("n") or 1))
        return
    want, got = real.json(), simulated.json()
    assert shape(got) == shape(want)
    assert_same_ids(want, got)
    if isinstance(want, dict) and "detail" in want:
        assert got == want
    elif isinstance(want, dict) and want.get("type") == "error":  # Anthropic's shape
        assert got["error"]["type"] == want["error"]["type"]
    elif isinstance(want, dict) and "error" in want:
        for member in ("type", "param", "code"):
            assert got["error"][member] == want["error"][member], member


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_simulator_answers_like_vllm(case: Case, vllm: VllmServer,
                                     simulator_like_vllm: Proc) -> None:
    assert_same_answer(send(vllm.url, case), send(simulator_like_vllm.url, case), case)


@pytest.mark.parametrize("case", POOLING_CASES, ids=[c.name for c in POOLING_CASES])
def test_simulator_answers_like_vllm_pooling(case: Case, vllm_pooling: VllmServer,
                                             simulator_like_vllm: Proc) -> None:
    assert_same_answer(send(vllm_pooling.url, case), send(simulator_like_vllm.url, case), case)


def both(vllm: VllmServer, simulator: Proc, case: Case) -> tuple[Answer, Answer]:
    real, simulated = send(vllm.url, case), send(simulator.url, case)
    assert_same_answer(real, simulated, case)
    return real, simulated


def follow_up(real: Answer, simulated: Answer, name: str, path: str,
              body: dict[str, Any] | None, vllm: VllmServer,
              simulator: Proc) -> tuple[Answer, Answer]:
    """The same request to each server about the response that server created."""
    real_next = send(vllm.url, Case(name, path.format(id=real.json()["id"]), body))
    sim_next = send(simulator.url, Case(name, path.format(id=simulated.json()["id"]), body))
    assert_same_answer(real_next, sim_next, Case(name, path, body))
    return real_next, sim_next


def wait_finished(base_url: str, response_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        answer = send(base_url, Case("poll", f"/v1/responses/{response_id}")).json()
        if answer["status"] not in ("queued", "in_progress") or time.monotonic() > deadline:
            return dict(answer)
        time.sleep(0.2)


def test_stored_responses_like_vllm(vllm: VllmServer, simulator_like_vllm: Proc) -> None:
    """With the store: retrieve, continue, cancel and run in the background, as vLLM does."""
    sim = simulator_like_vllm
    real, simulated = both(vllm, sim, Case("create", RESPONSES, respond(store=True)))
    real_get, sim_get = follow_up(real, simulated, "get", "/v1/responses/{id}", None, vllm, sim)
    assert real_get.json() == real.json() and sim_get.json() == simulated.json()
    follow_up(real, simulated, "cancel-finished", "/v1/responses/{id}/cancel", {}, vllm, sim)
    later = [send(url, Case("next", RESPONSES, respond(input="And then?",
                                                       previous_response_id=first.json()["id"])))
             for url, first in ((vllm.url, real), (sim.url, simulated))]
    assert_same_answer(*later, Case("next", RESPONSES))
    for first, after in zip((real, simulated), later, strict=True):
        assert after.json()["usage"]["input_tokens"] > first.json()["usage"]["input_tokens"]

    unstored = both(vllm, sim, Case("not-stored", RESPONSES, respond(store=False)))
    follow_up(*unstored, "get-not-stored", "/v1/responses/{id}", None, vllm, sim)

    slow = respond(background=True, max_output_tokens=400)
    # A try in which a server finished its 400 tokens before it was read and cancelled (a busy
    # machine) is made again: reading or cancelling a finished response is another case.
    for _ in range(3):
        real_bg, sim_bg = both(vllm, sim, Case("background", RESPONSES, slow))
        assert real_bg.json()["status"] == sim_bg.json()["status"] == "queued"
        servers = ((vllm.url, real_bg), (sim.url, sim_bg))
        running = [send(url, Case("get-queued", f"/v1/responses/{bg.json()['id']}"))
                   for url, bg in servers]
        cancelled = [send(url, Case("cancel", f"/v1/responses/{bg.json()['id']}/cancel", {}))
                     for url, bg in servers]
        if all(a.json()["status"] in ("queued", "in_progress") for a in running) and all(
                a.status == 200 and a.json()["status"] == "cancelled" for a in cancelled):
            break
    else:
        pytest.fail("a background response finished before it was cancelled in every try")
    assert_same_answer(*running, Case("get-queued", "/v1/responses/{id}"))
    assert_same_answer(*cancelled, Case("cancel", "/v1/responses/{id}/cancel", {}))
    follow_up(real_bg, sim_bg, "cancel-again", "/v1/responses/{id}/cancel", {}, vllm, sim)

    real_bg, sim_bg = both(vllm, sim, Case("to-the-end", RESPONSES, respond(background=True)))
    real_done = wait_finished(vllm.url, real_bg.json()["id"])
    sim_done = wait_finished(sim.url, sim_bg.json()["id"])
    assert shape(sim_done) == shape(real_done)
    assert sim_done["status"] == real_done["status"] == "incomplete"

    streamed = both(vllm, sim, Case("background-stream", RESPONSES,
                                    respond(background=True, stream=True)))
    ids = [typed_events(a.body)[0][1]["response"]["id"] for a in streamed]
    replays = [send(url, Case("replay", f"/v1/responses/{rid}?stream=true&starting_after=3"))
               for url, rid in zip((vllm.url, sim.url), ids, strict=True)]
    assert_same_answer(*replays, Case("replay", RESPONSES))
    assert typed_events(replays[1].body)[0][1]["sequence_number"] == 4


def long_prompt() -> str:
    """A prompt over two of vLLM's 128-token blocks and never sent before."""
    return fresh_words() + "hello world " * 40


def fresh_words() -> str:
    """Words no prompt began with before. Several: the simulator's toy tokenizer gives a word
    one of 455 ids by the sum of its bytes, so two random hex words share an id one time in a
    few hundred, and a prompt that began with one word could be taken for an earlier one."""
    hexed = uuid.uuid4().hex
    return " ".join(hexed[i:i + 8] for i in range(0, 32, 8)) + " "


def cached_of(path: str, answer: dict[str, Any]) -> int:
    use = answer["usage"]
    if path == RESPONSES:
        return int(use["input_tokens_details"]["cached_tokens"])
    if path == MESSAGES:
        return int(use["cache_read_input_tokens"])
    return int(use["prompt_tokens_details"]["cached_tokens"])


@pytest.mark.parametrize("path", [CHAT, TEXT, RESPONSES, MESSAGES])
def test_repeated_prompt_is_cached_like_vllm(path: str, vllm: VllmServer,
                                             simulator_like_vllm: Proc) -> None:
    """The second time a long prompt is sent, both servers report cached prompt tokens."""
    prompt = long_prompt()
    request = {
        CHAT: chat(messages=[{"role": "user", "content": prompt}]),
        TEXT: text(prompt=prompt),
        RESPONSES: respond(input=prompt),
        MESSAGES: message(messages=[{"role": "user", "content": prompt}]),
    }[path]
    for attempt in ("first", "second"):
        real, simulated = both(vllm, simulator_like_vllm, Case(attempt, path, request))
    for base_url, answer in ((vllm.url, real.json()), (simulator_like_vllm.url, simulated.json())):
        assert cached_of(path, answer) > 0, answer["usage"]
        if path == MESSAGES:  # Anthropic's input_tokens leave out what was read or written
            use = answer["usage"]
            prompt = send(base_url, Case("count", COUNT, {
                "model": SERVED_MODEL, "messages": request["messages"]})).json()["input_tokens"]
            assert use["input_tokens"] + use["cache_read_input_tokens"] \
                + use["cache_creation_input_tokens"] == prompt


def recorded(title: str) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of the sample titled ``title`` in ``vllm_samples.md``."""
    text_ = SAMPLES.read_text()
    start = text_.index(f"### {title}\n")
    block = text_[text_.index("````http\n", start):]
    lines = block[:block.index("\n````", 9)].splitlines()
    return int(lines[1].split()[1]), json.loads(lines[-1])


def test_without_the_store_like_recorded_vllm(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Without the store (the suite's vLLM has it) the simulator answers as vLLM recorded."""
    sim = start_like_vllm(tmp_path_factory)
    try:
        created = send(sim.url, Case("create", RESPONSES, respond())).json()["id"]
        for title, case in (
            ("Background without the store",
             Case("background", RESPONSES, respond(background=True))),
            ("Retrieve without the store", Case("get", f"/v1/responses/{created}")),
            ("Cancel without the store", Case("cancel", f"/v1/responses/{created}/cancel", {})),
        ):
            status, want = recorded(title)
            answer = send(sim.url, case)
            assert answer.status == status, title
            got = answer.json()
            assert shape(got) == shape(want), title
            for member in ("type", "param", "code"):
                assert got["error"][member] == want["error"][member], (title, member)
    finally:
        sim.stop()


def test_store_is_bounded(tmp_path_factory: pytest.TempPathFactory) -> None:
    """vLLM keeps every stored response; the simulator only the last ``--store-size``."""
    sim = start_like_vllm(tmp_path_factory, "--enable-store", "--store-size", "2")
    try:
        ids = [send(sim.url, Case("create", RESPONSES, respond())).json()["id"] for _ in range(3)]
        statuses = [send(sim.url, Case("get", f"/v1/responses/{rid}")).status for rid in ids]
        assert statuses == [404, 200, 200]
    finally:
        sim.stop()


# /metrics: the families the simulator writes are vLLM's, and its counters count what vLLM's do.

GATEWAY_READS = ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total")
COUNTED = ("vllm:prompt_tokens_total", "vllm:prefix_cache_queries_total",
           "vllm:prefix_cache_hits_total", "vllm:generation_tokens_total")
SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$")


@dataclass
class Exposition:
    content_type: str | None
    families: dict[str, tuple[str, str]]  # name: (HELP text, TYPE)
    labels: dict[str, list[list[tuple[str, str]]]]  # name: the labels of each sample, in order
    values: dict[str, float]  # name: the sum of its samples

    def counted(self) -> dict[str, float]:
        return {name: self.values[name] for name in COUNTED}


def scrape(base_url: str) -> Exposition:
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as response:
        content_type, text = response.headers.get("Content-Type"), response.read().decode()
    helps: dict[str, str] = {}
    found = Exposition(content_type, {}, {}, {})
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, words = line[7:].partition(" ")
            helps[name] = words
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            found.families[name] = (helps[name], kind)
        elif (sample := SAMPLE.match(line)) is not None:
            name, labels, value = sample.groups()
            found.labels.setdefault(name, []).append(re.findall(r'(\w+)="([^"]*)"', labels or ""))
            found.values[name] = found.values.get(name, 0.0) + float(value)
    return found


def test_metrics_text_like_vllm(vllm: VllmServer, simulator_like_vllm: Proc) -> None:
    """Each family the simulator writes, those the gateway reads among them, is vLLM's: its
    HELP text, type, label names and values (``engine``, ``model_name``), in vLLM's order."""
    real, simulated = scrape(vllm.url), scrape(simulator_like_vllm.url)
    assert simulated.content_type == real.content_type
    assert set(GATEWAY_READS) <= set(simulated.families)
    for name, family in simulated.families.items():
        assert family == real.families.get(name), name
        assert simulated.labels[name] == real.labels[name], name
    assert [n for n in real.families if n in simulated.families] == list(simulated.families)


def idle(base_url: str, timeout: float = 60) -> Exposition:
    """The metrics once nothing runs or waits (vLLM may still be busy with earlier tests)."""
    deadline = time.monotonic() + timeout
    while True:
        found = scrape(base_url)
        if found.values["vllm:num_requests_running"] == found.values[
                "vllm:num_requests_waiting"] == 0 or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def moved(base_url: str, before: Exposition, want: dict[str, float]) -> dict[str, float]:
    """How the counters moved; vLLM updates them a little after it has answered."""
    deadline = time.monotonic() + 10
    while True:
        after = idle(base_url).counted()
        delta = {name: after[name] - before.values[name] for name in COUNTED}
        if all(delta[n] >= want[n] for n in want) or time.monotonic() > deadline:
            return delta
        time.sleep(0.1)


def expected(case: Case, answer: Answer) -> dict[str, float]:
    """What the counters should move by, read from the answer's usage: the prompt once per
    sequence (``n`` of them per prompt), a hit for each cached token of each sequence."""
    body = case.body if isinstance(case.body, dict) else {}
    n = int(body.get("n") or 1)
    if answer.body.startswith(b"data: "):
        usage = json.loads(events(answer.body)[-2])["usage"]
    else:
        usage = answer.json()["usage"]
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    made = usage.get("completion_tokens", usage.get("output_tokens", 0))
    details = usage.get("prompt_tokens_details") or {}
    # Without streaming, usage reports the cache of the last sequence, which found every full
    # block the first one computed; a short new prompt has none to find.
    hits = (n - 1) * details.get("cached_tokens", 0)
    return {"vllm:prompt_tokens_total": n * prompt, "vllm:prefix_cache_queries_total": n * prompt,
            "vllm:prefix_cache_hits_total": hits, "vllm:generation_tokens_total": made}


# Requests whose counts are checked, each made of a prefix never sent before.
COUNTING: dict[str, Callable[[str], tuple[str, dict[str, Any]]]] = {
    "chat-n3-long-prompt": lambda fresh: (CHAT, chat(
        messages=[{"role": "user", "content": fresh + "hello world " * 40}], n=3, max_tokens=3,
        ignore_eos=True)),
    "text-two-prompts-n2-stream": lambda fresh: (TEXT, text(
        prompt=[fresh + "a b", fresh + "c"], n=2, max_tokens=3, ignore_eos=True,
        **STREAM_OPTIONS["usage"])),
    "responses": lambda fresh: (RESPONSES, respond(input=fresh + "Hello!")),
    "embeddings": lambda fresh: (EMBED, embed(input=[fresh + "a", "b c"])),
}


@pytest.mark.parametrize("name", COUNTING)
def test_counters_move_like_vllms(name: str, vllm: VllmServer, vllm_pooling: VllmServer,
                                  simulator_like_vllm: Proc) -> None:
    """On both servers the counters move by what the request used, by vLLM's rules: a 36-token
    prompt with ``n`` = 3 moves ``vllm:prompt_tokens_total`` by 108 where usage says 36."""
    case = Case(name, *COUNTING[name](fresh_words()))
    real_server = vllm_pooling if case.path == EMBED else vllm
    for base_url in (real_server.url, simulator_like_vllm.url):
        before = idle(base_url)
        answer = send(base_url, case)
        assert answer.status == 200, answer.body[:300]
        want = expected(case, answer)
        assert moved(base_url, before, want) == want, base_url
        assert idle(base_url).values["vllm:kv_cache_usage_perc"] == 0
