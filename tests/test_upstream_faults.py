"""The gateway in front of a model server that misbehaves: breaks off, stalls, answers garbage.

A scripted server stands in for vLLM; the first message's content picks the script. Each case
checks what the client gets and the one row stored for it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from harness import Proc, start_gateway, start_simulator, wait_rows

MODEL = "facebook/opt-125m"
STALL_SEC = 3.0  # far past the gateway's read timeout in these tests (0.5 s)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(tokens: int, text: str) -> bytes:
    chunk = {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 1,
             "model": MODEL, "choices": [{"index": 0, "delta": {"content": text},
                                          "logprobs": None, "finish_reason": None}],
             "usage": {"prompt_tokens": 7, "total_tokens": 7 + tokens,
                       "completion_tokens": tokens}}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\n\r\n")


def _json_answer(status: int, body: bytes) -> bytes:
    return (b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (status, len(body), body))


def _break_mid_stream(sock: socket.socket) -> None:
    sock.sendall(SSE_HEAD + b"".join(_chunk(_event(i, f" w{i}")) for i in range(1, 4)))
    time.sleep(0.1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


def _stall_mid_stream(sock: socket.socket) -> None:
    sock.sendall(SSE_HEAD + _chunk(_event(1, " a")) + _chunk(_event(2, " b")))
    time.sleep(STALL_SEC)


SCRIPTS: dict[str, Callable[[socket.socket], None]] = {
    "break-mid-stream": _break_mid_stream,
    "stall-mid-stream": _stall_mid_stream,
    "bad-status-line": lambda s: s.sendall(b"HTTX/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"),
    "bad-chunking": lambda s: s.sendall(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked"
        b"\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"),
    "truncated-body": lambda s: s.sendall(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n"
        b'{"id":"chatcmpl-x","usage":'),
    "upstream-500": lambda s: s.sendall(_json_answer(500, json.dumps({"error": {
        "message": "engine died", "type": "InternalServerError", "param": None,
        "code": 500}}).encode())),
    "upstream-503": lambda s: s.sendall(_json_answer(503, json.dumps({"error": {
        "message": "overloaded", "type": "ServiceUnavailableError", "param": None,
        "code": 503}}).encode())),
}


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"POST "):  # the gateway's health probes and load scrapes
            healthy = head.startswith(b"GET /health ")
            sock.sendall(b"HTTP/1.1 %s\r\ncontent-length: 0\r\n\r\n"
                         % (b"200 OK" if healthy else b"404 Not Found"))
            return
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += sock.recv(65536)
        script = json.loads(body)["messages"][0]["content"]
        SCRIPTS[script](sock)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture(scope="module")
def scripted(session_tmp: Path, database_url: str) -> Iterator[Proc]:
    server = _Server(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    gateway = start_gateway(session_tmp, database_url,
                            f"http://127.0.0.1:{server.server_address[1]}",
                            UPSTREAM_TIMEOUT_SEC="0.5")
    yield gateway
    gateway.stop()
    server.shutdown()


async def _send(gateway: Proc, tenant: tuple[str, str], script: str,
                stream: bool) -> tuple[int, str, bytes]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": script}]}
    if stream:
        body["stream"] = True
    async with aiohttp.ClientSession() as session, session.post(
            f"{gateway.url}/v1/chat/completions", json=body,
            headers={"X-TEMBO-ORG": tenant[0], "X-TEMBO-INSTANCE": tenant[1]}) as response:
        return response.status, response.headers["X-Request-Id"], await response.read()


async def _row(database_url: str, request_id: str) -> dict[str, Any]:
    [found] = await wait_rows(database_url, "request_id = $1", (uuid.UUID(request_id),), 1)
    return dict(found)


@pytest.mark.parametrize(("script", "status", "code"), [
    ("break-mid-stream", 502, "upstream_unreachable"),
    ("stall-mid-stream", 504, "upstream_timeout"),
])
async def test_a_stream_the_model_server_breaks_off(
    scripted: Proc, database_url: str, tenant: tuple[str, str], script: str, status: int,
    code: str,
) -> None:
    http_status, request_id, body = await _send(scripted, tenant, script, stream=True)
    assert http_status == 200  # the stream had begun
    events = [e for e in body.split(b"\n\n") if e]
    relayed = [json.loads(e[6:]) for e in events[:-2]]
    assert all("usage" not in r for r in relayed)  # hidden: the client did not ask
    error = json.loads(events[-2][6:])["error"]  # in-band, as vLLM reports a failed stream
    assert (error["code"], events[-1]) == (code, b"data: [DONE]")
    stored = await _row(database_url, request_id)
    # Billed for what was relayed before the break: the running usage of the last chunk.
    assert (stored["status"], stored["prompt_tokens"], stored["completion_tokens"]) == (
        status, 7, len(relayed))
    assert stored["streamed"] is True and stored["disconnected"] is False


@pytest.mark.parametrize("script", ["bad-status-line", "bad-chunking", "truncated-body"])
async def test_malformed_answers_are_a_502_and_metered(
    scripted: Proc, database_url: str, tenant: tuple[str, str], script: str,
) -> None:
    status, request_id, body = await _send(scripted, tenant, script, stream=False)
    assert status == 502
    assert json.loads(body)["error"]["code"] == "upstream_unreachable"
    stored = await _row(database_url, request_id)
    assert (stored["status"], stored["prompt_tokens"], stored["completion_tokens"]) == (
        502, 0, 0)


@pytest.mark.parametrize(("script", "status"), [("upstream-500", 500), ("upstream-503", 503)])
async def test_upstream_5xx_is_passed_through_and_metered(
    scripted: Proc, database_url: str, tenant: tuple[str, str], script: str, status: int,
) -> None:
    got, request_id, body = await _send(scripted, tenant, script, stream=False)
    assert got == status
    assert json.loads(body)["error"]["code"] == status  # the model server's own body
    stored = await _row(database_url, request_id)
    assert (stored["status"], stored["prompt_tokens"], stored["completion_tokens"]) == (
        status, 0, 0)


async def test_a_client_that_hangs_up_before_a_whole_answer(
    session_tmp: Path, database_url: str, tenant: tuple[str, str]
) -> None:
    slow = start_simulator(session_tmp, "--ttft-ms", "3000")
    gateway = start_gateway(session_tmp, database_url, slow.url)
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5), session.post(
                        f"{gateway.url}/v1/chat/completions",
                        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
                        headers={"X-TEMBO-ORG": tenant[0],
                                 "X-TEMBO-INSTANCE": tenant[1]}) as response:
                    await response.read()
        [row] = await wait_rows(database_url, "organization_id = $1", (tenant[0],), 1)
        assert row["status"] == 499 and row["disconnected"] is True
        assert (row["prompt_tokens"], row["completion_tokens"], row["streamed"]) == (0, 0, False)
    finally:
        gateway.stop()
        slow.stop()
