"""The gateway in front of a real vLLM server: what it stores is what vLLM itself reports.

Every case compares vLLM's own numbers (its ``usage``, or the same request sent to vLLM
directly) with the record in ``inference.requests``. Requests use ``ignore_eos`` so that the
number of tokens is exact, and ``temperature: 0`` (or a ``seed`` where ``n`` > 1, which vLLM
does not allow with greedy sampling) so that two runs of one request give the same tokens.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import openai
import pytest
from e2e_support import (
    HELLO,
    SERVED_MODEL,
    Endpoint,
    VllmServer,
    async_sdk,
    body_for,
    by_choice,
    coalesce,
    events,
    final_usage,
    normalise,
    post,
    row,
    row_async,
    sdk,
    sdk_args,
    shape,
    tenant_rows,
    text_pieces,
)

from harness import Proc

MAX_TOKENS = 8
GREEDY = {"temperature": 0, "ignore_eos": True}
SEEDED = {"temperature": 1.0, "seed": 1234, "ignore_eos": True}  # for n > 1
USAGE_OPTIONS: dict[str, dict[str, bool] | None] = {
    "no-options": None,
    "include_usage": {"include_usage": True},
    "continuous": {"include_usage": True, "continuous_usage_stats": True},
    "continuous-only": {"continuous_usage_stats": True},  # vLLM sends no usage for this
}


def sampling(n: int) -> dict[str, Any]:
    return dict(GREEDY) if n == 1 else {**SEEDED, "n": n}


def stream_body(endpoint: Endpoint, n: int, options: dict[str, bool] | None,
                max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    body = body_for(endpoint, max_tokens=max_tokens, stream=True, **sampling(n))
    if options is not None:
        body["stream_options"] = options
    return body


def assert_same_stream(through: bytes, direct: bytes, n: int) -> None:
    """The client got exactly the events vLLM sends for its request; only id/created differ.

    vLLM's chunk boundaries depend on timing (see ``coalesce``): when both runs cut the text
    at the same places the events must be identical byte for byte; otherwise they must be
    identical once each choice's text chunks are merged, and be made of the same kinds of
    event. With n > 1 the choices interleave as they are generated, so each choice's own
    sequence is compared.
    """
    got, want = events(through), events(direct)
    if text_pieces(got) == text_pieces(want):
        if n == 1:
            # Parsed first for a readable difference, then byte for byte (member order).
            assert [json.loads(normalise(e)) for e in got[:-1]] == \
                [json.loads(normalise(e)) for e in want[:-1]]
            assert [normalise(e) for e in got] == [normalise(e) for e in want]
        else:
            mine, theirs = by_choice(got), by_choice(want)
            assert sorted(mine, key=str) == sorted(theirs, key=str)
            for index, expected in theirs.items():
                assert mine[index] == expected, f"the events of choice {index}"
    else:
        assert coalesce(got) == coalesce(want)
        mine = {shape(json.loads(e)): e for e in got[:-1]}
        theirs = {shape(json.loads(e)): e for e in want[:-1]}
        assert set(mine) == set(theirs), (
            "events of kinds only one stream has: through the gateway "
            f"{[mine[k] for k in set(mine) - set(theirs)]}, directly "
            f"{[theirs[k] for k in set(theirs) - set(mine)]}; text pieces "
            f"{text_pieces(got)} against {text_pieces(want)}")


# -- non-streamed --------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_non_streamed_record_equals_vllm_usage(
    endpoint: Endpoint, vllm: VllmServer, vllm_gateway: Proc, database_url: str,
    tenant: tuple[str, str],
) -> None:
    body = body_for(endpoint, max_tokens=MAX_TOKENS, **GREEDY)
    through = post(sdk(vllm_gateway.url, tenant), endpoint, body)
    direct = post(sdk(vllm.url), endpoint, body)
    assert through.status == direct.status == 200
    assert normalise(through.body) == normalise(direct.body)  # vLLM's answer, unchanged
    usage = json.loads(through.body)["usage"]
    stored = row(database_url, through.request_id)
    assert (stored["prompt_tokens"], stored["completion_tokens"]) == (
        usage["prompt_tokens"], usage["completion_tokens"])
    assert usage["completion_tokens"] == MAX_TOKENS
    assert stored["status"] == 200
    assert stored["streamed"] is False and stored["disconnected"] is False
    assert stored["model"] == SERVED_MODEL
    assert stored["endpoint"] == ("/v1/chat/completions" if endpoint == "chat"
                                  else "/v1/completions")


def test_chat_with_the_sdk_types(vllm_gateway: Proc, database_url: str,
                                 tenant: tuple[str, str]) -> None:
    response = sdk(vllm_gateway.url, tenant).chat.completions.with_raw_response.create(
        **sdk_args({"model": SERVED_MODEL, "messages": HELLO, "max_tokens": 5, **GREEDY}))
    completion = response.parse()
    assert completion.usage is not None and completion.model == SERVED_MODEL
    stored = row(database_url, response.headers["X-Request-Id"])
    assert stored["prompt_tokens"] == completion.usage.prompt_tokens
    assert stored["completion_tokens"] == completion.usage.completion_tokens == 5


# -- streamed ------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_streamed_with_client_usage(
    endpoint: Endpoint, vllm_gateway: Proc, database_url: str, tenant: tuple[str, str]
) -> None:
    client = sdk(vllm_gateway.url, tenant)
    args = sdk_args(stream_body(endpoint, 1, {"include_usage": True}))
    resource: Any = client.chat.completions if endpoint == "chat" else client.completions
    stream = resource.create(**args)
    request_id = stream.response.headers["X-Request-Id"]
    chunks = list(stream)
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None  # vLLM's usage chunk reached us
    assert all(c.usage is None for c in chunks[:-1])
    stored = row(database_url, request_id)
    assert stored["prompt_tokens"] == final.usage.prompt_tokens
    assert stored["completion_tokens"] == final.usage.completion_tokens == MAX_TOKENS
    assert stored["streamed"] is True and stored["disconnected"] is False


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("options", list(USAGE_OPTIONS))
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_is_vllms_own_and_record_equals_vllm_usage(
    endpoint: Endpoint, options: str, n: int, vllm: VllmServer, vllm_gateway: Proc,
    database_url: str, tenant: tuple[str, str],
) -> None:
    body = stream_body(endpoint, n, USAGE_OPTIONS[options])
    through = post(sdk(vllm_gateway.url, tenant), endpoint, body)
    direct = post(sdk(vllm.url), endpoint, body)
    assert through.status == direct.status == 200
    assert through.headers["content-type"] == direct.headers["content-type"]
    assert_same_stream(through.body, direct.body, n)
    client_usage = (USAGE_OPTIONS[options] or {}).get("include_usage") is True
    if client_usage:
        usage = final_usage(direct.body)
    else:
        assert b'"usage"' not in through.body
        # vLLM's own count of the same request, asked for with usage this time.
        with_usage = post(sdk(vllm.url), endpoint,
                          stream_body(endpoint, n, {"include_usage": True}))
        usage = final_usage(with_usage.body)
    stored = row(database_url, through.request_id)
    assert (stored["prompt_tokens"], stored["completion_tokens"]) == (
        usage["prompt_tokens"], usage["completion_tokens"])
    assert usage["completion_tokens"] == n * MAX_TOKENS
    assert stored["status"] == 200 and stored["streamed"] is True
    assert stored["disconnected"] is False


# -- n = 2 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_n2_completion_tokens_are_summed_over_choices(
    stream: bool, vllm_gateway: Proc, database_url: str, tenant: tuple[str, str]
) -> None:
    # No ignore_eos: a choice may stop early, and each choice's own token ids tell its length.
    body = body_for("chat", max_tokens=12, n=2, seed=99, return_token_ids=True)
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    through = post(sdk(vllm_gateway.url, tenant), "chat", body)
    assert through.status == 200
    per_choice = [0, 0]
    if stream:
        usage = final_usage(through.body)
        for payload in events(through.body)[:-1]:
            for choice in json.loads(payload)["choices"]:
                per_choice[choice["index"]] += len(choice.get("token_ids") or [])
    else:
        answer = json.loads(through.body)
        usage = answer["usage"]
        for choice in answer["choices"]:
            per_choice[choice["index"]] = len(choice["token_ids"])
    assert usage["completion_tokens"] == sum(per_choice)
    stored = row(database_url, through.request_id)
    assert stored["completion_tokens"] == sum(per_choice)
    assert stored["prompt_tokens"] == usage["prompt_tokens"]


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_max_tokens_over_the_context_is_vllms_400(
    endpoint: Endpoint, stream: bool, vllm: VllmServer, vllm_gateway: Proc, database_url: str,
    tenant: tuple[str, str],
) -> None:
    body = body_for(endpoint, max_tokens=100_000, stream=stream)
    through = post(sdk(vllm_gateway.url, tenant), endpoint, body)
    direct = post(sdk(vllm.url), endpoint, body)
    assert through.status == direct.status == 400
    assert through.body == direct.body  # vLLM's body, byte for byte
    assert json.loads(through.body)["error"]["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        resource: Any = (sdk(vllm_gateway.url, tenant).chat.completions if endpoint == "chat"
                         else sdk(vllm_gateway.url, tenant).completions)
        resource.create(**sdk_args(body))
    stored = row(database_url, through.request_id)
    assert stored["status"] == 400
    assert stored["completion_tokens"] == 0 and stored["prompt_tokens"] == 0


def test_unknown_model_is_the_gateways_404_and_vllm_never_sees_it(
    vllm: VllmServer, vllm_gateway: Proc, database_url: str, tenant: tuple[str, str]
) -> None:
    name = f"no-such-model-{uuid.uuid4().hex[:8]}"
    client = sdk(vllm_gateway.url, tenant)
    line = '"POST /v1/chat/completions HTTP/1.1"'
    access_lines = vllm.log_text().count(line)  # before: a leak would add one more
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model=name, messages=HELLO)  # type: ignore[arg-type]
    assert err.value.status_code == 404
    assert isinstance(err.value.body, dict)
    assert err.value.body["code"] == "model_not_found"  # the gateway's error, not vLLM's
    assert "Valid aliases" not in err.value.body["message"]
    # A request that does reach vLLM afterwards: once it is logged, the first would be too.
    probe = client.chat.completions.create(model=SERVED_MODEL, messages=HELLO,  # type: ignore[arg-type]
                                           max_tokens=1)
    assert vllm.wait_for_log(f"Received request {probe.id}")
    deadline = time.monotonic() + 10
    while vllm.log_text().count(line) < access_lines + 1 and time.monotonic() < deadline:
        time.sleep(0.05)  # the access line is written after the answer
    log = vllm.log_text()
    assert name not in log
    assert log.count(line) == access_lines + 1  # the probe's, and no other
    [stored] = tenant_rows(database_url, tenant, 1)
    assert stored["model"] == SERVED_MODEL and stored["status"] == 200  # only the probe


# -- the client goes away ------------------------------------------------------------------------


def test_client_drops_the_stream(
    vllm: VllmServer, vllm_gateway: Proc, database_url: str, tenant: tuple[str, str]
) -> None:
    max_tokens = 480  # 21 prompt tokens + 480 fit the 512-token context
    # A busy machine can hold the first bytes back until vLLM has written the whole answer;
    # then no abort can follow, and the try is made again. The gateway may still have been
    # relaying that answer when the client hung up: it is billed for what was relayed by then
    # (marked disconnected), or whole if all of it was.
    for _ in range(5):
        stream = sdk(vllm_gateway.url, tenant).chat.completions.create(
            **sdk_args({"model": SERVED_MODEL, "messages": HELLO, "max_tokens": max_tokens,
                        "stream": True, "ignore_eos": True}))
        request_id = stream.response.headers["X-Request-Id"]
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 5:
                break
        stream.close()  # hang up mid-stream
        received = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
        vllm_request = chunks[0].id
        aborted = vllm.wait_for_log(f"Request {vllm_request} aborted.", 15)
        stored = row(database_url, request_id)
        if aborted:
            break
        assert received <= stored["completion_tokens"] <= max_tokens, stored
        assert stored["disconnected"] or stored["completion_tokens"] == max_tokens, stored
    assert aborted, (f"vLLM did not log {vllm_request} as aborted; stored: {stored}; vLLM's log:\n"
                     + "\n".join(vllm.log_lines(vllm_request)))
    assert stored["disconnected"] is True and stored["streamed"] is True
    # Billed for the tokens relayed before the hang-up: at least what the client read, and
    # not the whole generation it asked for.
    assert received <= stored["completion_tokens"] < max_tokens
    assert stored["prompt_tokens"] == vllm.count_tokens({"messages": HELLO})


# -- load ----------------------------------------------------------------------------------------


def mixed_request(i: int) -> tuple[Endpoint, dict[str, Any]]:
    """Request ``i`` of the mixed load: both endpoints, streamed or not, with usage or not."""
    endpoint: Endpoint = "chat" if i % 2 == 0 else "completions"
    n = 2 if i % 7 == 3 else 1
    fields: dict[str, Any] = {"max_tokens": 3 + i % 6, **sampling(n)}
    if endpoint == "chat":
        fields["messages"] = [{"role": "user", "content": "Hello! " * (1 + i % 4)}]
    else:
        fields["prompt"] = "The quick brown fox " * (1 + i % 3)
    kind = i % 3
    if kind == 1:
        fields |= {"stream": True}
    elif kind == 2:
        fields |= {"stream": True, "stream_options": {"include_usage": True}}
    return endpoint, body_for(endpoint, **fields)


async def _send(client: openai.AsyncOpenAI, endpoint: Endpoint,
                body: dict[str, Any]) -> tuple[str, dict[str, int] | None]:
    """Send one request; the gateway's request id and the usage the client saw, if any."""
    resource: Any = client.chat.completions if endpoint == "chat" else client.completions
    if not body.get("stream"):
        response = await resource.with_raw_response.create(**sdk_args(body))
        usage = response.parse().usage
        return response.headers.get("X-Request-Id", ""), {
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
    stream = await resource.create(**sdk_args(body))
    seen = None
    async for chunk in stream:
        if chunk.usage is not None:
            seen = {"prompt_tokens": chunk.usage.prompt_tokens,
                    "completion_tokens": chunk.usage.completion_tokens}
    return stream.response.headers.get("X-Request-Id", ""), seen


async def _vllm_usage(direct: openai.AsyncOpenAI, requests: list[tuple[Endpoint, dict[str, Any]]],
                      answers: list[tuple[str, dict[str, int] | None]],
                      index: int) -> dict[str, int]:
    """vLLM's count of a request: the usage its client saw, or the same request sent to vLLM
    directly with usage on."""
    seen = answers[index][1]
    if seen is not None:
        return seen
    endpoint, body = requests[index]
    _, usage = await _send(direct, endpoint, body | {"stream_options": {"include_usage": True}})
    assert usage is not None
    return usage


async def test_fifty_concurrent_mixed_requests(
    vllm: VllmServer, vllm_gateway: Proc, database_url: str, tenant: tuple[str, str]
) -> None:
    requests = [mixed_request(i) for i in range(50)]
    # Clients are closed on every way out: a socket left to the garbage collector is closed
    # behind the session's event loop, which then never hears of a later socket on its number.
    async with async_sdk(vllm_gateway.url, tenant) as gateway, async_sdk(vllm.url) as direct:
        answers = await asyncio.gather(*(_send(gateway, e, b) for e, b in requests))
        # vLLM's count of each request: the usage its client saw, or for a stream that did not
        # ask for usage, the same request sent to vLLM directly with usage on.
        expected = await asyncio.gather(*(_vllm_usage(direct, requests, answers, i)
                                          for i in range(len(requests))))
    stored = await row_async(database_url, [request_id for request_id, _ in answers], 30)
    assert len(stored) == 50 and all(r["organization_id"] == tenant[0] for r in stored)
    for record, usage, (_, body) in zip(stored, expected, requests, strict=True):
        assert (record["prompt_tokens"], record["completion_tokens"]) == (
            usage["prompt_tokens"], usage["completion_tokens"]), body
        assert record["completion_tokens"] == body.get("n", 1) * body["max_tokens"]
        assert record["status"] == 200 and record["disconnected"] is False
    assert sum(r["prompt_tokens"] for r in stored) == sum(u["prompt_tokens"] for u in expected)
    assert sum(r["completion_tokens"] for r in stored) == sum(
        u["completion_tokens"] for u in expected)
