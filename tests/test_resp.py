"""The lean Redis connection of the rate limits: RESP both ways, answers matched to commands in
order, and every way it can go wrong ending in an error the gate knows (never a hang)."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio.connection import parse_url
from redis.exceptions import NoScriptError, ResponseError

from inference_gateway.admission.resp import Resp, _Incomplete, encode, parse

ECHO_KEYS = "return {KEYS[1], tonumber(ARGV[1]) + 1, {ARGV[2]}}"


def resp_for(redis_url: str, timeout: float = 1.0) -> Resp:
    where = parse_url(redis_url)
    return Resp(where["host"], where["port"], where.get("db", 0), where.get("username"),
                where.get("password"), timeout)


def test_encode_and_parse() -> None:
    assert encode("SET", b"k", 12) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n"
    answer = b"*4\r\n:-7\r\n$3\r\nabc\r\n$-1\r\n*1\r\n+OK\r\n"
    assert parse(answer) == ([-7, b"abc", None, ["OK"]], len(answer))
    error, _ = parse(b"-NOSCRIPT No matching script\r\n")
    assert isinstance(error, NoScriptError)
    assert type(parse(b"-ERR wrong\r\n")[0]) is ResponseError
    for cut in range(1, len(answer)):  # an answer split anywhere is waited for, not misread
        with pytest.raises(_Incomplete):
            parse(answer[:cut])
    with pytest.raises(ConnectionError):
        parse(b"?what\r\n")


async def test_pipelined_answers_reach_their_callers(redis_url: str) -> None:
    client = resp_for(redis_url)
    assert client.send("PING") is None  # nothing open yet: the caller must call instead
    tag = uuid.uuid4().hex  # keys of this run only: nothing else in the database is touched
    keys = [f"resp-test:{tag}:{i}" for i in range(200)]
    try:
        sets = [client.call("SET", key, i, "EX", 60) for i, key in enumerate(keys)]
        assert await asyncio.gather(*sets) == ["OK"] * 200
        values = await asyncio.gather(*(client.call("GET", key) for key in keys))
        assert values == [str(i).encode() for i in range(200)]
        assert await client.call("GET", f"resp-test:{tag}:missing") is None
        with pytest.raises(ResponseError):
            await client.call("INCR", "no", "such", "arity")
        assert await client.call("INCR", keys[1]) == 2  # the connection goes on after an error
        # Written at once on the open connection, before anything is awaited.
        sent = client.send("INCR", keys[1])
        assert sent is not None and not sent.done()
        assert await client.call("GET", keys[1]) == b"3"  # Redis ran it first: it came first
        assert await sent == 3
    finally:
        client.close()


async def test_a_script_is_loaded_when_redis_does_not_know_it(redis_url: str) -> None:
    client = resp_for(redis_url)
    source = f"{ECHO_KEYS} -- {uuid.uuid4().hex}"  # a script this Redis has never seen
    try:
        answer = await client.script(hashlib.sha1(source.encode()).hexdigest(), source,
                                     ["key"], [41, "x"])
        assert answer == [b"key", 42, [b"x"]]
        assert await client.call("SCRIPT", "EXISTS", hashlib.sha1(source.encode()).hexdigest()) \
            == [1]
    finally:
        client.close()


Server = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def fake() -> AsyncIterator[Callable[[Server], Awaitable[int]]]:
    servers: list[asyncio.Server] = []

    async def start(serve: Server) -> int:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()


async def test_silence_and_hang_ups_end_in_errors_and_a_new_connection(
        fake: Callable[[Server], Awaitable[int]]) -> None:
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number = connections
        while data := await reader.read(65536):
            if number == 1:
                continue  # the first connection never answers
            if number == 2:
                writer.write(b"*2\r\n:1\r\n")  # half an answer, then hangs up
                writer.close()
                return
            for _ in range(data.count(b"*")):  # a well-behaved one (one command per '*')
                writer.write(b":7\r\n")

    port = await fake(serve)
    client = Resp("127.0.0.1", port, 0, None, None, timeout=0.3)
    try:
        with pytest.raises(TimeoutError):
            await client.call("PING")
        with pytest.raises(ConnectionError):  # what was waiting fails with the hang-up
            await client.call("PING")
        assert await client.call("PING") == 7  # a new connection, answers in order again
        assert connections == 3
    finally:
        client.close()


async def test_nothing_listening_is_a_connection_error(
        fake: Callable[[Server], Awaitable[int]]) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    port = await fake(serve)
    client = Resp("127.0.0.1", port, 0, None, "secret", timeout=0.5)
    with pytest.raises(ConnectionError):  # AUTH's answer never comes: the peer hung up
        await client.call("PING")
    refused = Resp("127.0.0.1", 1, 0, None, None, timeout=0.5)
    with pytest.raises(OSError):
        await refused.call("PING")
