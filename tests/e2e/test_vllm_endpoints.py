"""Every endpoint family through the gateway in front of the real vLLM: what is stored is what
vLLM reports, each family driven by its own SDK, and nothing vLLM serves goes unmetered.

The generation server runs with ``--enable-prompt-tokens-details`` and its Responses store on,
so cached prompt tokens and stored responses can be checked; a second vLLM serves the same tiny
model as a pooling model for embeddings, score and rerank.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from e2e_support import HELLO, SERVED_MODEL, VllmServer, row, sdk, tenant_rows

from harness import Proc, start_gateway

MAX_TOKENS = 8
LONG_PROMPT = " ".join(["alpha beta gamma delta"] * 20)  # 2 of vLLM's cache blocks and more


# -- helpers -------------------------------------------------------------------------------------


def anthropic_sdk(base_url: str, tenant: tuple[str, str]) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=base_url, api_key="unused", max_retries=0, timeout=60,
        default_headers={"X-TEMBO-ORG": tenant[0], "X-TEMBO-INSTANCE": tenant[1]})


def other_tenant() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:12]
    return f"org-{tag}", f"inst-{tag}"


def post_json(url: str, body: dict[str, Any] | bytes, tenant: tuple[str, str] | None = None,
              method: str = "POST") -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if tenant is not None:
        headers |= {"X-TEMBO-ORG": tenant[0], "X-TEMBO-INSTANCE": tenant[1]}
    request = urllib.request.Request(url, data=data if method == "POST" else None,
                                     headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def counters(server: VllmServer) -> dict[str, float]:
    """vLLM's own token counters, summed over their labels."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = {}
    for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        found[name] = sum(float(m.group(1)) for m in
                          re.finditer(re.escape(name) + r"\{[^}]*\} ([0-9.e+]+)", text))
    return found


def counted_since(server: VllmServer, before: dict[str, float]) -> tuple[int, int]:
    after = counters(server)
    return (int(after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"]),
            int(after["vllm:generation_tokens_total"]
                - before["vllm:generation_tokens_total"]))


def aborted(server: VllmServer, vllm_id: str, timeout: float = 15) -> bool:
    """Whether vLLM logged the request as aborted (its own id may carry a suffix)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any("aborted" in line for line in server.log_lines(vllm_id)):
            return True
        time.sleep(0.05)
    return False


# An abandoned stream asks for nearly the whole context and hangs up after a few events.
ABANDONED_MAX = 400
ABANDON_AFTER = 5


def settled_counts(server: VllmServer, before: dict[str, float]) -> tuple[int, int]:
    """vLLM's counts since ``before``, once they stop moving (they are updated a little after
    a request ends)."""
    seen = counted_since(server, before)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = counted_since(server, before)
        if now == seen:
            break
        seen = now
    return seen


def read_then_hang_up(stream: Any, started: str, delta: str) -> tuple[str, str, int]:
    """Read an SDK's event stream until ABANDON_AFTER text events, then hang up. Returns the
    gateway's request id, vLLM's id (from the ``started`` event) and the text events read."""
    deltas, vllm_id = 0, ""
    for event in stream:
        if event.type == started:
            vllm_id = (event.response if hasattr(event, "response") else event.message).id
        if event.type == delta:
            deltas += 1
            if deltas == ABANDON_AFTER:
                break
    stream.close()  # hang up mid-stream
    return stream.response.headers["X-Request-Id"], vllm_id, deltas


def hang_up(server: VllmServer, database_url: str, attempt: Callable[[], tuple[str, str, int]],
            tries: int = 5) -> tuple[dict[str, Any], tuple[int, int], int]:
    """Run ``attempt`` (start a stream, read a little, hang up) until vLLM aborts the request.

    The tiny model writes the whole answer in about a second; on a busy machine the client may
    take longer than that to read its first events, and then vLLM has finished before the
    hang-up reaches it. Such a try proves nothing and is made again; a gateway that never
    closes the upstream fails every try. Returns the stored record, vLLM's counts for the
    aborted request, and how many text events the client read.
    """
    finished = []
    for _ in range(tries):
        before = counters(server)
        request_id, vllm_id, deltas = attempt()
        was_aborted = aborted(server, vllm_id)
        stored = row(database_url, request_id)
        counts = settled_counts(server, before)
        assert stored["streamed"] is True, stored
        if was_aborted:
            assert stored["disconnected"] is True, stored
            return stored, counts, deltas
        # Only a generation vLLM ran to its end excuses a missing abort (at its length limit,
        # or at an end-of-sequence token: vLLM's Messages API does not take `ignore_eos`).
        # vLLM may end it before the gateway has relayed its last events: if the hang-up came
        # first, the record is billed for the text the client was sent, as an aborted one; if
        # not, the whole answer was relayed (into the client's socket buffer), billed whole.
        if stored["disconnected"]:
            assert deltas <= stored["completion_tokens"] <= counts[1], (counts, stored, deltas)
        else:
            assert stored["completion_tokens"] == counts[1], (counts, stored)
        finished.append(counts)
    raise AssertionError(f"vLLM finished all {tries} generations before the hang-up reached "
                         f"it (counts {finished}): the gateway did not close the upstream")


def stored_tokens(stored: dict[str, Any]) -> tuple[int, int, int]:
    return stored["prompt_tokens"], stored["completion_tokens"], stored["cached_tokens"]


@pytest.fixture(scope="module")
def pooling_gateway(session_tmp: Path, database_url: str,
                    vllm_pooling: VllmServer) -> Iterator[Proc]:
    proc = start_gateway(session_tmp, database_url, vllm_pooling.url)
    yield proc
    proc.stop()


# -- the Responses API ---------------------------------------------------------------------------


def test_responses_non_streamed(vllm_gateway: Proc, database_url: str,
                                tenant: tuple[str, str]) -> None:
    raw = sdk(vllm_gateway.url, tenant).responses.with_raw_response.create(
        model=SERVED_MODEL, input="Hello!", max_output_tokens=MAX_TOKENS, temperature=0,
        extra_body={"ignore_eos": True})
    response = raw.parse()
    assert response.usage is not None
    stored = row(database_url, raw.headers["X-Request-Id"])
    cached = response.usage.input_tokens_details.cached_tokens
    assert stored_tokens(stored) == (response.usage.input_tokens,
                                     response.usage.output_tokens, cached)
    assert response.usage.output_tokens == MAX_TOKENS
    assert (stored["endpoint"], stored["status"], stored["streamed"]) == \
        ("/v1/responses", 200, False)
    assert stored["upstream_id"] == response.id


def test_responses_streamed(vllm: VllmServer, vllm_gateway: Proc, database_url: str,
                            tenant: tuple[str, str]) -> None:
    client = sdk(vllm_gateway.url, tenant)
    kinds = []
    with client.responses.with_streaming_response.create(
            model=SERVED_MODEL, input="Hello!", max_output_tokens=MAX_TOKENS, stream=True,
            extra_body={"ignore_eos": True}) as raw:
        request_id = raw.headers["X-Request-Id"]
        events = list(raw.parse())
    kinds = [e.type for e in events]
    direct = [e.type for e in sdk(vllm.url).responses.create(
        model=SERVED_MODEL, input="Hello!", max_output_tokens=MAX_TOKENS, stream=True,
        extra_body={"ignore_eos": True})]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed" and set(kinds) == set(direct)
    usage = events[-1].response.usage  # type: ignore[union-attr]
    stored = row(database_url, request_id)
    assert stored_tokens(stored) == (usage.input_tokens, usage.output_tokens,
                                     usage.input_tokens_details.cached_tokens)
    assert usage.output_tokens == MAX_TOKENS
    assert stored["streamed"] is True and stored["disconnected"] is False


def test_responses_stream_abandoned(vllm: VllmServer, vllm_gateway: Proc, database_url: str,
                                    tenant: tuple[str, str]) -> None:
    client = sdk(vllm_gateway.url, tenant)

    def attempt() -> tuple[str, str, int]:
        stream = client.responses.create(
            model=SERVED_MODEL, input="Hello!", max_output_tokens=ABANDONED_MAX, stream=True,
            extra_body={"ignore_eos": True})
        return read_then_hang_up(stream, "response.created", "response.output_text.delta")

    stored, (prompt, generated), deltas = hang_up(vllm, database_url, attempt)
    print(f"\nabandoned Responses stream: billed {stored['prompt_tokens']} + "
          f"{stored['completion_tokens']} tokens; vLLM counted {prompt} + {generated}; the "
          f"client read {deltas} text events")
    assert stored["status"] == 200
    assert stored["prompt_tokens"] == prompt == vllm.count_tokens({"messages": HELLO})
    assert deltas <= stored["completion_tokens"] <= generated < ABANDONED_MAX


# -- the Anthropic Messages API ------------------------------------------------------------------


def test_messages_non_streamed(vllm_gateway: Proc, database_url: str,
                               tenant: tuple[str, str]) -> None:
    raw = anthropic_sdk(vllm_gateway.url, tenant).messages.with_raw_response.create(
        model=SERVED_MODEL, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": "Hi"}],
        extra_body={"ignore_eos": True})
    message = raw.parse()
    usage = message.usage
    stored = row(database_url, raw.headers["X-Request-Id"])
    read = usage.cache_read_input_tokens or 0
    prompt = usage.input_tokens + read + (usage.cache_creation_input_tokens or 0)
    assert stored_tokens(stored) == (prompt, usage.output_tokens, read)
    assert usage.output_tokens == MAX_TOKENS
    assert (stored["endpoint"], stored["upstream_id"]) == ("/v1/messages", message.id)


def test_messages_streamed(vllm_gateway: Proc, database_url: str,
                           tenant: tuple[str, str]) -> None:
    client = anthropic_sdk(vllm_gateway.url, tenant)
    with client.messages.with_streaming_response.create(
            model=SERVED_MODEL, max_tokens=MAX_TOKENS, stream=True,
            messages=[{"role": "user", "content": "Hi"}], extra_body={"ignore_eos": True}) as raw:
        request_id = raw.headers["X-Request-Id"]
        events = list(raw.parse())
    assert events[0].type == "message_start" and events[-1].type == "message_stop"
    [delta] = [e for e in events if e.type == "message_delta"]
    usage = delta.usage  # type: ignore[union-attr]
    stored = row(database_url, request_id)
    read = usage.cache_read_input_tokens or 0
    prompt = (usage.input_tokens or 0) + read + (usage.cache_creation_input_tokens or 0)
    assert stored_tokens(stored) == (prompt, usage.output_tokens, read)
    assert stored["streamed"] is True and usage.output_tokens == MAX_TOKENS


def test_messages_stream_abandoned(vllm: VllmServer, vllm_gateway: Proc, database_url: str,
                                   tenant: tuple[str, str]) -> None:
    client = anthropic_sdk(vllm_gateway.url, tenant)

    def attempt() -> tuple[str, str, int]:
        stream = client.messages.create(
            model=SERVED_MODEL, max_tokens=ABANDONED_MAX, stream=True,
            extra_body={"ignore_eos": True}, messages=[{"role": "user", "content": "Hello!"}])
        return read_then_hang_up(stream, "message_start", "content_block_delta")

    stored, (prompt, generated), deltas = hang_up(vllm, database_url, attempt)
    print(f"\nabandoned Messages stream: billed {stored['prompt_tokens']} + "
          f"{stored['completion_tokens']} tokens; vLLM counted {prompt} + {generated}; the "
          f"client read {deltas} text events")
    assert stored["prompt_tokens"] == prompt
    assert deltas <= stored["completion_tokens"] <= generated < ABANDONED_MAX


def test_messages_errors_speak_anthropic(vllm_gateway: Proc, tenant: tuple[str, str]) -> None:
    client = anthropic_sdk(vllm_gateway.url, tenant)
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="no-such-model", max_tokens=4,
                               messages=[{"role": "user", "content": "Hi"}])
    assert err.value.body == {"type": "error", "error": {
        "type": "not_found_error", "message": "The model `no-such-model` does not exist."}}
    no_tenant = anthropic.Anthropic(base_url=vllm_gateway.url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        no_tenant.messages.count_tokens(model=SERVED_MODEL,
                                        messages=[{"role": "user", "content": "Hi"}])
    assert denied.value.body["error"]["type"] == "permission_error"  # type: ignore[index]


def test_count_tokens_is_forwarded_and_not_billed(vllm: VllmServer, vllm_gateway: Proc,
                                                  database_url: str,
                                                  tenant: tuple[str, str]) -> None:
    raw = anthropic_sdk(vllm_gateway.url, tenant).messages.with_raw_response.count_tokens(
        model=SERVED_MODEL, messages=[{"role": "user", "content": "Hello!"}])
    assert raw.parse().input_tokens == vllm.count_tokens({"messages": HELLO})
    stored = row(database_url, raw.headers["X-Request-Id"])
    assert stored_tokens(stored) == (0, 0, 0) and stored["status"] == 200


# -- cached prompt tokens ------------------------------------------------------------------------


def test_cached_prompt_tokens_are_stored(vllm_gateway: Proc, database_url: str,
                                         tenant: tuple[str, str]) -> None:
    client = sdk(vllm_gateway.url, tenant)
    seen = []
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model=SERVED_MODEL, max_tokens=2, messages=[{"role": "user", "content": LONG_PROMPT}])
        usage = raw.parse().usage
        assert usage is not None and usage.prompt_tokens_details is not None
        stored = row(database_url, raw.headers["X-Request-Id"])
        assert stored_tokens(stored) == (usage.prompt_tokens, usage.completion_tokens,
                                         usage.prompt_tokens_details.cached_tokens)
        seen.append(stored["cached_tokens"])
    assert seen[1] > 0, "the second request should have read the prompt from vLLM's cache"
    anthropic_raw = anthropic_sdk(vllm_gateway.url, tenant).messages.with_raw_response.create(
        model=SERVED_MODEL, max_tokens=2, messages=[{"role": "user", "content": LONG_PROMPT}])
    message_usage = anthropic_raw.parse().usage
    stored = row(database_url, anthropic_raw.headers["X-Request-Id"])
    assert stored["cached_tokens"] == message_usage.cache_read_input_tokens > 0
    assert stored["prompt_tokens"] == usage.prompt_tokens  # the same prompt, counted whole


# -- stored responses belong to their tenant -----------------------------------------------------


def test_stored_responses_belong_to_their_tenant(vllm_gateway: Proc, database_url: str,
                                                 tenant: tuple[str, str]) -> None:
    owner, stranger = sdk(vllm_gateway.url, tenant), sdk(vllm_gateway.url, other_tenant())
    created = owner.responses.create(model=SERVED_MODEL, input="Hello!", max_output_tokens=3,
                                     store=True)
    assert owner.responses.retrieve(created.id).id == created.id
    with pytest.raises(openai.NotFoundError) as err:
        stranger.responses.retrieve(created.id)
    assert err.value.code == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        stranger.responses.create(model=SERVED_MODEL, input="And?", max_output_tokens=3,
                                  previous_response_id=created.id)
    with pytest.raises(openai.NotFoundError):
        stranger.responses.cancel(created.id)
    followed = owner.responses.create(model=SERVED_MODEL, input="And?", max_output_tokens=3,
                                      previous_response_id=created.id)
    assert followed.usage is not None and followed.usage.input_tokens > 21
    with pytest.raises(openai.BadRequestError):  # vLLM's own answer, relayed
        owner.responses.cancel(created.id)
    rows = tenant_rows(database_url, tenant, 5)
    reads = [r for r in rows if r["endpoint"].startswith(f"/v1/responses/{created.id}")]
    assert len(reads) == 2 and all(stored_tokens(r) == (0, 0, 0) for r in reads)
    with pytest.raises(openai.BadRequestError) as refused:
        owner.responses.create(model=SERVED_MODEL, input="x", background=True)
    assert refused.value.param == "background"  # type: ignore[attr-defined]


# -- pooling -------------------------------------------------------------------------------------


def test_pooling_endpoints_are_metered(pooling_gateway: Proc, database_url: str,
                                       tenant: tuple[str, str]) -> None:
    raw = sdk(pooling_gateway.url, tenant).embeddings.with_raw_response.create(
        model=SERVED_MODEL, input=["Hello world", "Second one"])
    embeddings = raw.parse()
    stored = row(database_url, raw.headers["X-Request-Id"])
    assert stored_tokens(stored) == (embeddings.usage.prompt_tokens, 0, 0)
    assert embeddings.usage.prompt_tokens > 0 and len(embeddings.data) == 2
    for path, body in (("/v1/score", {"text_1": "Hello world", "text_2": ["a b", "c"]}),
                       ("/v1/rerank", {"query": "Hello", "documents": ["a b", "c d e"]})):
        status, headers, answer = post_json(pooling_gateway.url + path,
                                            {"model": SERVED_MODEL, **body}, tenant)
        assert status == 200, answer
        stored = row(database_url, headers["x-request-id"])
        assert stored_tokens(stored) == (json.loads(answer)["usage"]["prompt_tokens"], 0, 0)


# -- nothing is served for free ------------------------------------------------------------------

SAMPLES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"messages": HELLO, "max_tokens": 2},
    "/v1/chat/completions/batch": {"messages": [HELLO, HELLO], "max_tokens": 2},
    "/v1/completions": {"prompt": "The quick brown fox", "max_tokens": 2},
    "/v1/responses": {"input": "Hello!", "max_output_tokens": 2},
    "/v1/messages": {"messages": HELLO, "max_tokens": 2},
    "/v1/messages/count_tokens": {"messages": HELLO},
    "/v1/embeddings": {"input": "Hello world"},
    "/v1/score": {"text_1": "Hello", "text_2": "world"},
    "/v1/rerank": {"query": "Hello", "documents": ["a", "b"]},
}
UNBILLED = {"/v1/messages/count_tokens"}


def _usage_of(path: str, answer: dict[str, Any]) -> tuple[int, int]:
    if path in UNBILLED:
        return 0, 0
    usage = answer["usage"]
    if path == "/v1/messages":
        return (usage["input_tokens"] + (usage.get("cache_read_input_tokens") or 0)
                + (usage.get("cache_creation_input_tokens") or 0), usage["output_tokens"])
    if path == "/v1/responses":
        return usage["input_tokens"], usage["output_tokens"]
    return usage["prompt_tokens"], usage.get("completion_tokens") or 0


def _walk(server: VllmServer, gateway: Proc, database_url: str,
          tenant: tuple[str, str]) -> list[str]:
    with urllib.request.urlopen(f"{server.url}/openapi.json", timeout=10) as resp:
        paths = json.loads(resp.read())["paths"]
    metered = []
    for path, methods in sorted(paths.items()):
        if "post" not in methods:
            continue
        concrete = path.replace("{response_id}", "resp_" + uuid.uuid4().hex)
        body = {"model": SERVED_MODEL, **SAMPLES.get(path, {})}
        before = server.log_text().count(f'"POST {concrete} HTTP/1.1"')
        status, headers, answer = post_json(gateway.url + concrete, body, tenant)
        if path in SAMPLES:
            assert status == 200, (path, answer)
            stored = row(database_url, headers["x-request-id"])
            assert (stored["prompt_tokens"], stored["completion_tokens"]) == \
                _usage_of(path, json.loads(answer)), path
            metered.append(path)
        elif path == "/v1/responses/{response_id}/cancel":
            assert status == 404, (path, answer)  # no such response of this tenant's
        else:
            assert status == 404, (path, status, answer)
            error = json.loads(answer)
            code = error["error"]["code"] if "code" in error.get("error", {}) else None
            assert code in ("unknown_url", None), (path, error)
            time.sleep(0.05)
            assert server.log_text().count(f'"POST {concrete} HTTP/1.1"') == before, path
    return metered


def test_every_post_path_vllm_serves_is_metered_or_refused(
    vllm: VllmServer, vllm_gateway: Proc, vllm_pooling: VllmServer, pooling_gateway: Proc,
    database_url: str, tenant: tuple[str, str],
) -> None:
    metered = _walk(vllm, vllm_gateway, database_url, tenant)
    metered += _walk(vllm_pooling, pooling_gateway, database_url, tenant)
    assert set(metered) == set(SAMPLES), set(SAMPLES) ^ set(metered)
