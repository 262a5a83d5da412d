"""A thousand and more malformed requests against the gateway in front of the simulator.

Random bytes, wrong JSON types, huge numbers, deep nesting, odd and oversized headers, bad
chunking, oversized bodies, dot segments, unknown methods. Whatever comes in: no 5xx, every JSON
error in the shape of its endpoint's dialect, both processes alive afterwards, and no traceback
in either log. The requests come from a seeded generator, so a failure can be replayed.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness import Proc, start_gateway, start_simulator

SEED = 20261201
COUNT = 1200
BODY_LIMIT = 65536
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
         "/v1/messages", "/v1/messages/count_tokens", "/v1/chat/completions/batch",
         "/v1/score", "/v1/rerank", "/v1/responses/resp_abc", "/v1/models", "/ready"]
TENANT = b"X-TEMBO-ORG: fuzz-org\r\nX-TEMBO-INSTANCE: fuzz-inst\r\n"
MODEL = "facebook/opt-125m"
ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1.5, -1e308, 1e308, 2**64, -(2**63) - 1,
    1180591620717411303424, 10**100, "", "x", "1e9", "NaN", [], [1, "a"], {}, {"a": {"b": []}},
    "\u0000", "\ud7ff" * 3, "é" * 100,
]


@dataclass
class Sent:
    kind: str
    path: str
    raw: bytes
    complete: bool = True  # a whole request was sent: it must get an answer
    head_only: bool = False  # a HEAD request: its answer has no body
    expect: frozenset[int] | None = None  # the statuses it must get, where that is known


def _request(method: str, path: str, body: bytes, *, headers: bytes = TENANT,
             content_type: bytes = b"application/json") -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n").encode() \
        + headers
    if content_type:
        head += b"Content-Type: " + content_type + b"\r\n"
    return head + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _valid(path: str) -> dict[str, Any]:
    if path.startswith("/v1/messages"):
        return {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}
    if path == "/v1/responses":
        return {"model": MODEL, "input": "Hi", "max_output_tokens": 3}
    if path == "/v1/completions":
        return {"model": MODEL, "prompt": "Hi", "max_tokens": 3}
    if path in ("/v1/embeddings", "/v1/score", "/v1/rerank"):
        return {"model": MODEL, "input": "Hi", "text_1": "a", "text_2": "b", "query": "q",
                "documents": ["d"]}
    if path == "/v1/chat/completions/batch":
        return {"model": MODEL, "max_tokens": 3, "messages": [[{"role": "user", "content": "x"}]]}
    return {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}


def random_bytes(rng: random.Random) -> Sent:
    raw = rng.randbytes(rng.randint(1, 2000))
    if rng.random() < 0.5:
        raw = b"POST /v1/chat/completions HTTP/1.1\r\n" + raw
    return Sent("random bytes", "-", raw, complete=False)


def random_body(rng: random.Random) -> Sent:
    path = rng.choice(PATHS)
    return Sent("random body", path, _request("POST", path, rng.randbytes(rng.randint(0, 500))))


def wrong_type(rng: random.Random) -> Sent:
    path = rng.choice(PATHS[:9])
    body = _valid(path)
    keys = [*body, "n", "stream", "stream_options", "temperature", "top_p", "stop", "seed",
            "logprobs", "tools", "background", "previous_response_id", "instructions"]
    for _ in range(rng.randint(1, 3)):
        body[rng.choice(keys)] = rng.choice(ODD_VALUES)
    return Sent("wrong types", path, _request("POST", path, _json(body)))


def huge_number(rng: random.Random) -> Sent:
    path = rng.choice(PATHS[:9])
    body = _valid(path)
    name = rng.choice(["n", "max_tokens", "max_completion_tokens", "max_output_tokens",
                       "best_of", "top_k", "seed", "logprobs", "top_logprobs",
                       "truncate_prompt_tokens", "min_tokens", "dimensions"])
    body[name] = rng.choice([1180591620717411303424, 2**63, 2**31, 10**12, -(10**12), 1e300])
    raw = _json(body)
    if rng.random() < 0.3:  # a number no float holds
        raw = raw.replace(b'"model"', b'"n": ' + b"9" * 5000 + b', "model"', 1)
    return Sent("huge number", path, _request("POST", path, raw))


def deep_nesting(rng: random.Random) -> Sent:
    path = rng.choice(PATHS[:9])
    depth = rng.choice([100, 1000, 5000, 50_000])
    inner = "[" * depth + "]" * depth if rng.random() < 0.5 else '{"a":' * depth + "1" + \
        "}" * depth
    body = _json(_valid(path))[:-1] + b', "extra": ' + inner.encode() + b"}"
    return Sent("deep nesting", path, _request("POST", path, body))


def odd_headers(rng: random.Random) -> Sent:
    path = rng.choice(PATHS)
    body = _json(_valid(path))
    choice = rng.randrange(7)
    if choice == 0:
        headers = TENANT + b"X-Big: " + b"a" * rng.choice([8000, 9000, 70_000]) + b"\r\n"
    elif choice == 1:
        headers = TENANT + b"".join(b"X-H%d: v\r\n" % i for i in range(rng.choice([150, 2000])))
    elif choice == 2:
        headers = b"X-TEMBO-ORG: \xff\xfe\r\nX-TEMBO-INSTANCE: \x01\r\n"
    elif choice == 3:
        headers = b"X-TEMBO-ORG: " + b"o" * 300 + b"\r\nX-TEMBO-INSTANCE: i\r\n"
    elif choice == 4:
        headers = TENANT + b"Bad Header Name: x\r\n" + b"Authorization: Bearer igw_" + \
            rng.randbytes(20).hex().encode() + b"\r\n"
    elif choice == 5:
        headers = TENANT + b"x-api-key: " + b"igw_" + b"z" * 4000 + b"\r\n"
    else:
        headers = TENANT + b"Content-Type: text/plain\r\nContent-Type: application/json\r\n"
    return Sent("odd headers", path, _request("POST", path, body, headers=headers))


def bad_chunking(rng: random.Random) -> Sent:
    path = rng.choice(PATHS[:9])
    body = _json(_valid(path))
    head = (f"POST {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n").encode() \
        + TENANT + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ending = rng.randrange(6)
    chunks = [
        b"zz\r\n" + body + b"\r\n0\r\n\r\n",
        b"%x\r\n" % (len(body) + 50) + body + b"\r\n0\r\n\r\n",
        b"ffffffffffffffffffff\r\n" + body,
        b"%x;ext=\x00\r\n" % len(body) + body + b"\r\n0\r\n\r\n",
        b"%x\r\n" % len(body) + body + b"\r\n",  # no last chunk: the client stops
        b"-5\r\n" + body + b"\r\n0\r\n\r\n",
    ][ending]
    if rng.random() < 0.3:  # both framings at once
        head = head.replace(b"Transfer-Encoding", b"Content-Length: 5\r\nTransfer-Encoding")
    # 1 promises more bytes than it sends, 4 never ends: the client gives up on both.
    return Sent("bad chunking", path, head + chunks, complete=ending not in (1, 4))


def oversized_body(rng: random.Random) -> Sent:
    path = rng.choice(PATHS[:9])
    size = rng.choice([BODY_LIMIT + 1, BODY_LIMIT * 4])
    padded = _valid(path) | {"padding": "x" * size}
    too_large = frozenset({413})
    if rng.random() < 0.5:  # a length that promises more than ever comes
        raw = _request("POST", path, b"{}").replace(b"Content-Length: 2",
                                                     b"Content-Length: 999999999")
        return Sent("oversized body", path, raw, expect=too_large)
    return Sent("oversized body", path, _request("POST", path, _json(padded)), expect=too_large)


def odd_path(rng: random.Random) -> Sent:
    path = rng.choice([
        "/v1/../../etc/passwd", "/v1/chat/./completions", "/v1/chat%2fcompletions",
        "/v1/%2e%2e/admin", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1//x",
        "/v1/chat/completions/", "/v1/chat/completions?" + "a" * 9000, "/v1/\x00",
        "/v1/" + "x" * rng.choice([100, 20_000]), "//v1/chat/completions", "/v1/responses/a/b",
        "/v1/responses/%00/cancel", "/v1\\chat\\completions", "/%2e%2e/v1/models",
    ])
    raw = _request("POST", path, _json(_valid("/v1/chat/completions")))
    plain = ".." not in path.split("?")[0] and "%2" not in path and "\\" not in path \
        and "/./" not in path
    # Not plain: a 400 that names the rule; the rest is nothing the gateway forwards.
    return Sent("odd path", path, raw, expect=None if plain else frozenset({400}))


def odd_method(rng: random.Random) -> Sent:
    path = rng.choice(PATHS)
    method = rng.choice(["FOO", "PROPFIND", "TRACE", "DELETE", "PUT", "PATCH", "CONNECT",
                         "GET", "HEAD", "post", "P\x00ST", "M" * 300])
    sent = Sent("odd method", path, _request(method, path, _json(_valid(path))))
    sent.head_only = method == "HEAD"
    return sent


GENERATORS: list[Callable[[random.Random], Sent]] = [
    random_bytes, random_body, wrong_type, huge_number, deep_nesting, odd_headers,
    bad_chunking, oversized_body, odd_path, odd_method,
]


def generate(count: int, seed: int) -> Iterator[Sent]:
    rng = random.Random(seed)
    for i in range(count):
        yield GENERATORS[i % len(GENERATORS)](rng)


def _whole(received: bytes) -> bool:
    """Whether an answer with a Content-Length has arrived whole."""
    head, found, body = received.partition(b"\r\n\r\n")
    if not found:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value)
    return False


async def exchange(port: int, raw: bytes, within: float = 5.0) -> bytes:
    """Send raw bytes; read the answer until it is whole, the server closes, or time is up."""
    answer, _ = await exchange_noting(port, raw, within)
    return answer


async def exchange_noting(port: int, raw: bytes, within: float) -> tuple[bytes, str]:
    """The answer, and how the exchange ended (to tell a reset from a silence)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received, stage, ended = b"", "writing", "whole"
    try:
        writer.write(raw)
        await writer.drain()
        stage = "reading"
        async with asyncio.timeout(within):
            while not _whole(received) and (chunk := await reader.read(1 << 16)):
                received += chunk
        if not _whole(received):
            ended = "closed"
    except (ConnectionError, TimeoutError) as exc:
        ended = type(exc).__name__
    finally:
        writer.close()
    return received, f"{ended} while {stage}, after {time.monotonic() - started:.2f} s"


def check(sent: Sent, answer: bytes) -> str | None:
    """What is wrong with the answer, or None."""
    if not answer:
        # Bytes that are not a whole request may be left unanswered; a request may not.
        return None if not sent.complete else "no answer"
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0]
    parts = status_line.split(b" ")
    if len(parts) < 2 or not parts[1].isdigit():
        return f"not an HTTP answer: {status_line[:80]!r}"
    status = int(parts[1])
    if status >= 500:
        return f"status {status}: {body[:300]!r}"
    if sent.expect is not None and status not in sent.expect:
        return f"status {status}, expected {sorted(sent.expect)}: {body[:200]!r}"
    if b"application/json" not in head.lower() or status < 400 or sent.head_only:
        return None
    try:
        error = json.loads(body)
    except ValueError:
        return f"a JSON error that does not parse: {body[:200]!r}"
    if sent.path.startswith("/v1/messages") and "type" in error:
        ok = error.get("type") == "error" and set(error.get("error", {})) == {"type", "message"}
    else:
        ok = set(error) == {"error"} and set(error["error"]) == {"message", "type", "param",
                                                                 "code"}
    return None if ok else f"error body of the wrong shape: {error}"


@pytest.fixture
def stack(tmp_path: Path, database_url: str) -> Iterator[tuple[Proc, Proc]]:
    sim = start_simulator(tmp_path, "--model", MODEL)
    gateway = start_gateway(tmp_path, database_url, sim.url,
                            MAX_REQUEST_BODY_BYTES=str(BODY_LIMIT), MAX_TOKENS="64")
    yield gateway, sim
    gateway.stop()
    sim.stop()


async def test_a_thousand_malformed_requests(stack: tuple[Proc, Proc]) -> None:
    gateway, sim = stack
    requests = list(generate(COUNT, SEED))
    limit = asyncio.Semaphore(32)

    async def one(sent: Sent) -> tuple[Sent, str | None]:
        async with limit:
            # Bytes that are not a whole request may be left waiting for more: give up soon.
            answer, ended = await exchange_noting(gateway.port, sent.raw,
                                                  5.0 if sent.complete else 0.5)
            problem = check(sent, answer)
            return sent, problem and f"{problem} ({ended})"

    results = await asyncio.gather(*(one(s) for s in requests))
    failures = [f"#{i} {s.kind} {s.path[:60]!r}: {problem}"
                for i, (s, problem) in enumerate(results) if problem]
    assert not failures, f"{len(failures)} of {COUNT}:\n" + "\n".join(failures[:20])
    kinds = {s.kind for s in requests}
    assert len(kinds) == len(GENERATORS)
    # Both are alive and still serve a well-formed request.
    answer = await exchange(gateway.port, _request("POST", "/v1/chat/completions",
                                                   _json(_valid("/v1/chat/completions"))))
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert gateway.popen.poll() is None and sim.popen.poll() is None
    for proc in (gateway, sim):
        log = proc.log.read_text(errors="replace")
        assert "Traceback" not in log, proc.log_tail(60)
