"""The gateway as it runs with ``HTTP_CORE=protocol``: the same answers and the same records as
with aiohttp's server, through the openai SDK, with two workers on one port."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from harness import Proc, start_gateway, wait_rows

MODEL = "facebook/opt-125m"


@pytest.fixture(scope="module")
def protocol_gateway(session_tmp: Path, database_url: str, simulator: Proc) -> Iterator[Proc]:
    proc = start_gateway(session_tmp, database_url, simulator.url, HTTP_CORE="protocol",
                         WEBSERVER_WORKERS="2", MAX_REQUEST_BODY_BYTES="4096")
    yield proc
    proc.stop()


def sdk(gateway: Proc, tenant: tuple[str, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0,
                         default_headers={"X-TEMBO-ORG": tenant[0],
                                          "X-TEMBO-INSTANCE": tenant[1]})


def test_requests_are_answered_and_metered(protocol_gateway: Proc, database_url: str,
                                           tenant: tuple[str, str]) -> None:
    client = sdk(protocol_gateway, tenant)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=5)
    answer = raw.parse()
    assert answer.usage is not None and raw.headers["X-Request-Id"]
    pieces, usage = [], None
    for chunk in client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens == 4 and pieces
    rows = asyncio.run(wait_rows(database_url, "organization_id = $1 AND instance_id = $2",
                                 tenant, 2))
    stored = sorted((r["endpoint"], r["prompt_tokens"], r["completion_tokens"], r["streamed"])
                    for r in rows)
    assert stored == sorted([
        ("/v1/chat/completions", answer.usage.prompt_tokens, answer.usage.completion_tokens,
         False),
        ("/v1/completions", usage.prompt_tokens, usage.completion_tokens, True)])


def test_the_rest_of_the_port_is_still_served(protocol_gateway: Proc) -> None:
    with urllib.request.urlopen(f"{protocol_gateway.url}/lively", timeout=10) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(f"{protocol_gateway.url}/v1/models", timeout=10) as resp:
        assert MODEL in [m["id"] for m in json.loads(resp.read())["data"]]
    with urllib.request.urlopen(f"{protocol_gateway.url}/metrics", timeout=10) as resp:
        assert b"gateway_requests_total" in resp.read()


def test_errors_keep_their_shape(protocol_gateway: Proc, tenant: tuple[str, str]) -> None:
    client = sdk(protocol_gateway, tenant)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    request = urllib.request.Request(
        f"{protocol_gateway.url}/v1/completions", method="POST",
        data=json.dumps({"model": MODEL, "prompt": "a" * 5000}).encode(),
        headers={"Content-Type": "application/json", "X-TEMBO-ORG": tenant[0],
                 "X-TEMBO-INSTANCE": tenant[1]})
    with pytest.raises(urllib.error.HTTPError) as too_large:
        urllib.request.urlopen(request, timeout=10)
    assert too_large.value.code == 413
    assert json.loads(too_large.value.read())["error"]["code"] == "request_too_large"
    # Bytes that are not HTTP get a plain 400 and a closed connection, never a crash.
    with socket.create_connection(("127.0.0.1", protocol_gateway.port), timeout=10) as sock:
        sock.sendall(b"P\x00ST /v1/completions HTTP/1.1\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400")
    with urllib.request.urlopen(f"{protocol_gateway.url}/lively", timeout=10) as resp:
        assert resp.status == 200  # both workers still serve
