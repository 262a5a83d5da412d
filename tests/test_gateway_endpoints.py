"""Every endpoint family through the gateway in front of the simulator, with the SDKs.

The simulator runs with vLLM's prompt-tokens details and Responses store, so cached tokens and
stored responses can be checked here quickly; ``tests/e2e`` checks the same against vLLM.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import asyncpg
import openai
import pytest

from inference_gateway.tenants.keys import create_key

from harness import Proc, start_gateway, start_simulator, wait_rows

MODEL = "facebook/opt-125m"
LONG = " ".join(["alpha beta gamma delta"] * 20)


@pytest.fixture(scope="module")
def stack(session_tmp: Path, database_url: str) -> Iterator[tuple[Proc, Proc]]:
    sim = start_simulator(session_tmp, "--model", MODEL, "--enable-prompt-tokens-details",
                          "--enable-store", "--tpot-ms", "5")
    gateway = start_gateway(session_tmp, database_url, sim.url,
                            API_KEY_CACHE_REFRESH_INTERVAL_SEC="0.2")
    yield gateway, sim
    gateway.stop()
    sim.stop()


def headers(tenant: tuple[str, str]) -> dict[str, str]:
    return {"X-TEMBO-ORG": tenant[0], "X-TEMBO-INSTANCE": tenant[1]}


def oai(gateway: Proc, tenant: tuple[str, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0,
                         default_headers=headers(tenant))


def ant(gateway: Proc, tenant: tuple[str, str], key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0,
                               default_headers=headers(tenant) if key == "unused" else {})


def row(database_url: str, request_id: str) -> dict[str, Any]:
    [found] = asyncio.run(wait_rows(database_url, "request_id = $1",
                                    (uuid.UUID(request_id),), 1))
    return dict(found)


def tokens(stored: dict[str, Any]) -> tuple[int, int, int]:
    return stored["prompt_tokens"], stored["completion_tokens"], stored["cached_tokens"]


def test_responses_streamed_and_not(stack: tuple[Proc, Proc], database_url: str,
                                    tenant: tuple[str, str]) -> None:
    client = oai(stack[0], tenant)
    raw = client.responses.with_raw_response.create(model=MODEL, input="Hello there",
                                                    max_output_tokens=5)
    response = raw.parse()
    assert response.usage is not None
    stored = row(database_url, raw.headers["X-Request-Id"])
    assert tokens(stored) == (response.usage.input_tokens, 5, 0)
    assert stored["upstream_id"] == response.id and stored["endpoint"] == "/v1/responses"
    with client.responses.with_streaming_response.create(
            model=MODEL, input="Hello there", max_output_tokens=6, stream=True) as streamed:
        request_id = streamed.headers["X-Request-Id"]
        events = list(streamed.parse())
    assert events[-1].type == "response.completed"
    usage = events[-1].response.usage  # type: ignore[union-attr]
    stored = row(database_url, request_id)
    assert tokens(stored) == (usage.input_tokens, 6, 0) and stored["streamed"]


def test_messages_streamed_and_not_with_cached_tokens(
    stack: tuple[Proc, Proc], database_url: str, tenant: tuple[str, str]
) -> None:
    client = ant(stack[0], tenant)
    seen = []
    for stream in (False, True, True):
        if stream:
            with client.messages.with_streaming_response.create(
                    model=MODEL, max_tokens=4, stream=True,
                    messages=[{"role": "user", "content": LONG}]) as raw:
                request_id = raw.headers["X-Request-Id"]
                events = list(raw.parse())
            usage = next(e for e in events if e.type == "message_delta").usage  # type: ignore
        else:
            created = client.messages.with_raw_response.create(
                model=MODEL, max_tokens=4, messages=[{"role": "user", "content": LONG}])
            request_id, usage = created.headers["X-Request-Id"], created.parse().usage
        read = usage.cache_read_input_tokens or 0
        prompt = (usage.input_tokens or 0) + read + (usage.cache_creation_input_tokens or 0)
        stored = row(database_url, request_id)
        assert tokens(stored) == (prompt, 4, read)
        seen.append(stored)
    assert seen[0]["prompt_tokens"] == seen[1]["prompt_tokens"] == seen[2]["prompt_tokens"]
    assert seen[2]["cached_tokens"] > 0  # the same long prompt, read from the cache


def test_chat_stream_cached_tokens_come_from_the_last_chunk(
    stack: tuple[Proc, Proc], database_url: str, tenant: tuple[str, str]
) -> None:
    client = oai(stack[0], tenant)
    for _ in range(2):
        with client.chat.completions.with_streaming_response.create(
                model=MODEL, max_tokens=3, stream=True,
                messages=[{"role": "user", "content": LONG}]) as raw:
            request_id = raw.headers["X-Request-Id"]
            chunks = list(raw.parse())
    assert all(c.usage is None for c in chunks)  # the client did not ask for usage
    stored = row(database_url, request_id)
    assert stored["completion_tokens"] == 3 and stored["cached_tokens"] > 0


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages"])
async def test_an_abandoned_stream_is_billed_for_what_was_relayed(
    stack: tuple[Proc, Proc], database_url: str, tenant: tuple[str, str], path: str
) -> None:
    gateway, sim = stack
    body: dict[str, Any] = {"model": MODEL, "stream": True}
    if path == "/v1/responses":
        body |= {"input": "Tell me a story", "max_output_tokens": 500}
        text_event = b"response.output_text.delta"
    else:
        body |= {"messages": [{"role": "user", "content": "Tell me a story"}],
                 "max_tokens": 500}
        text_event = b"content_block_delta"
    async with aiohttp.ClientSession() as session:
        response = await session.post(gateway.url + path, json=body, headers=headers(tenant))
        request_id = response.headers["X-Request-Id"]
        received = b""
        while received.count(b"event: " + text_event) < 8:
            received += await response.content.readany()
        response.close()  # hang up mid-stream
    [found] = await wait_rows(database_url, "request_id = $1", (uuid.UUID(request_id),), 1)
    stored = dict(found)
    assert stored["disconnected"] is True and stored["status"] == 200
    relayed = "".join(
        json.loads(line[6:]).get("delta", {}) if path == "/v1/responses" else
        json.loads(line[6:])["delta"]["text"]
        for event in received.split(b"\n\n") if text_event in event
        for line in event.split(b"\n") if line.startswith(b"data: "))
    async with aiohttp.ClientSession() as session:
        counted = await (await session.post(f"{sim.url}/tokenize", json={
            "model": MODEL, "prompt": relayed, "add_special_tokens": False})).json()
        prompt = await (await session.post(f"{sim.url}/tokenize", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}]})).json()
    # At least what the client read (the gateway may have relayed a little more), far less
    # than was asked for, and the prompt the model server counts.
    assert counted["count"] <= stored["completion_tokens"] < 100
    assert stored["prompt_tokens"] == prompt["count"]


def test_stored_responses_stay_with_their_tenant(
    stack: tuple[Proc, Proc], database_url: str, tenant: tuple[str, str]
) -> None:
    owner = oai(stack[0], tenant)
    stranger = oai(stack[0], (f"other-{uuid.uuid4().hex[:8]}", "inst"))
    created = owner.responses.create(model=MODEL, input="Hello", max_output_tokens=3)
    assert owner.responses.retrieve(created.id).id == created.id
    for attempt in (lambda: stranger.responses.retrieve(created.id),
                    lambda: stranger.responses.cancel(created.id),
                    lambda: stranger.responses.create(model=MODEL, input="and?",
                                                      previous_response_id=created.id)):
        with pytest.raises(openai.NotFoundError) as err:
            attempt()
        assert err.value.code == "response_not_found"
    follow = owner.responses.create(model=MODEL, input="and?", max_output_tokens=2,
                                    previous_response_id=created.id)
    assert follow.usage is not None
    with pytest.raises(openai.NotFoundError):  # an id nobody created
        owner.responses.retrieve("resp_" + uuid.uuid4().hex)
    with pytest.raises(openai.BadRequestError) as refused:
        owner.responses.create(model=MODEL, input="x", background=True)
    assert refused.value.param == "background"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as chosen:
        owner.responses.create(model=MODEL, input="x", extra_body={"request_id": created.id})
    assert chosen.value.param == "request_id"  # type: ignore[attr-defined]


def test_a_response_is_found_through_its_row(
    session_tmp: Path, stack: tuple[Proc, Proc], database_url: str, tenant: tuple[str, str]
) -> None:
    """Another gateway process (or one restarted) finds the owner in the audit table."""
    created = oai(stack[0], tenant).responses.create(model=MODEL, input="Hi",
                                                     max_output_tokens=2)
    asyncio.run(wait_rows(database_url, "upstream_id = $1", (created.id,), 1))
    other = start_gateway(session_tmp, database_url, stack[1].url)
    try:
        assert oai(other, tenant).responses.retrieve(created.id).id == created.id
        with pytest.raises(openai.NotFoundError):
            oai(other, ("someone", "else")).responses.retrieve(created.id)
    finally:
        other.stop()


def test_anthropic_sdk_with_a_key_and_anthropic_errors(
    stack: tuple[Proc, Proc], database_url: str, tenant: tuple[str, str]
) -> None:
    async def make_key() -> str:
        conn = await asyncpg.connect(database_url)
        try:
            key, _ = await create_key(conn, *tenant)
        finally:
            await conn.close()
        return key

    key = asyncio.run(make_key())
    client = ant(stack[0], tenant, key)  # x-api-key only, no tenant headers
    deadline = time.monotonic() + 10
    while True:
        try:
            raw = client.messages.with_raw_response.create(
                model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
            break
        except anthropic.AuthenticationError as exc:
            assert exc.body == {"type": "error", "error": {
                "type": "authentication_error", "message": "Incorrect API key provided."}}
            assert time.monotonic() < deadline, "the key never started working"
            time.sleep(0.1)
    stored = row(database_url, raw.headers["X-Request-Id"])
    assert (stored["organization_id"], stored["instance_id"]) == tenant

    async def key_id() -> int:
        conn = await asyncpg.connect(database_url)
        try:
            found: int = await conn.fetchval(
                "SELECT id FROM inference.api_keys WHERE prefix = $1", key[:12])
        finally:
            await conn.close()
        return found

    assert stored["api_key_id"] == asyncio.run(key_id())  # usage can be told apart by key
    by_headers = ant(stack[0], tenant).messages.with_raw_response.create(
        model=MODEL, max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
    assert row(database_url, by_headers.headers["X-Request-Id"])["api_key_id"] is None
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="nope", max_tokens=2,
                               messages=[{"role": "user", "content": "Hi"}])
    assert err.value.body == {"type": "error", "error": {
        "type": "not_found_error", "message": "The model `nope` does not exist."}}
    counted = client.messages.count_tokens(model=MODEL,
                                           messages=[{"role": "user", "content": "Hi"}])
    assert counted.input_tokens > 0


def test_pooling_and_batch_are_metered(stack: tuple[Proc, Proc], database_url: str,
                                       tenant: tuple[str, str]) -> None:
    client = oai(stack[0], tenant)
    embedded = client.embeddings.with_raw_response.create(model=MODEL, input=["a b", "c"])
    send = {**headers(tenant), "Content-Type": "application/json"}
    assert tokens(row(database_url, embedded.headers["X-Request-Id"]))[0] == \
        embedded.parse().usage.prompt_tokens
    for path, body in (
        ("/chat/completions/batch", {"messages": [[{"role": "user", "content": "a"}],
                                                  [{"role": "user", "content": "b c"}]],
                                     "max_tokens": 3}),
        ("/score", {"text_1": "a", "text_2": ["b", "c d"]}),
        ("/rerank", {"query": "a", "documents": ["b", "c d"]}),
    ):
        request = urllib.request.Request(f"{stack[0].url}/v1{path}", headers=send,
                                         data=json.dumps({"model": MODEL, **body}).encode())
        with urllib.request.urlopen(request, timeout=10) as answer:
            usage = json.loads(answer.read())["usage"]
            stored = row(database_url, answer.headers["X-Request-Id"])
        assert (stored["prompt_tokens"], stored["completion_tokens"]) == (
            usage["prompt_tokens"], usage.get("completion_tokens") or 0), path


def test_vllm_management_paths_are_never_forwarded(stack: tuple[Proc, Proc],
                                                   tenant: tuple[str, str]) -> None:
    client = oai(stack[0], tenant)
    for path in ("/load_lora_adapter", "/unload_lora_adapter", "/systemone", "/audio/speech"):
        with pytest.raises(openai.NotFoundError) as err:
            client.post(path, body={"model": MODEL, "lora_name": "x", "lora_path": "/"},
                        cast_to=object)
        assert err.value.code == "unknown_url"
