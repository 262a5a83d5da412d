"""The upstream HTTP/1.1 client against raw sockets that answer exactly as scripted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from inference_gateway.proxy.upstream import Pool, UpstreamError, UpstreamTimeout

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head + await reader.readexactly(length)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()


async def test_content_length_and_keep_alive(serve) -> None:  # type: ignore[no-untyped-def]
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                request = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            body = request.split(b"\r\n\r\n", 1)[1]
            writer.write(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                         b"X-Extra: yes\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    pool = Pool(await serve(handler), 1, 5)
    for i in range(3):
        answer = await pool.post("/v1/x?q=1", b'{"n": %d}' % i, [("Content-Type", "a/b")])
        assert answer.status == 201 and answer.reason == "Created"
        assert ("X-Extra", "yes") in answer.headers and answer.content_type == "application/json"
        assert await answer.read() == b'{"n": %d}' % i
    assert connections == 1
    pool.close()


async def test_each_request_has_its_own_head(serve) -> None:  # type: ignore[no-untyped-def]
    """Heads of requests alike are kept less their length: each still says its own."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = (await read_request(reader)).split(b"\r\n\r\n", 1)[0]
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(head), head))

    pool = Pool(await serve(handler), 1, 5)
    json_headers, other = [("Content-Type", "application/json")], [("X-Other", "1")]
    sent = [("/v1/a", b"{}", json_headers), ("/v1/a", b'{"n": 10}', json_headers),
            ("/v1/a", b"{}", other), ("/v1/b?q=1", b"{}", json_headers)]
    for path, body, headers in sent * 2:
        head = await (await pool.post(path, body, headers)).read()
        lines = head.split(b"\r\n")
        assert lines[0] == b"POST %s HTTP/1.1" % path.encode()
        assert b"Content-Length: %d" % len(body) in lines
        assert [b"%s: %s" % (k.encode(), v.encode()) for k, v in headers] == lines[3:]
    pool.close()


async def test_hop_by_hop_headers_are_set_apart(serve) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nServer: uvicorn\r\nDate: Wed, 02 Dec 2026 10:00:00 "
                         b"GMT\r\nContent-Type: application/json\r\nKeep-Alive: timeout=5\r\n"
                         b"X-Request-Id: abc\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"2\r\n{}\r\n0\r\n\r\n")

    pool = Pool(await serve(handler), 1, 5)
    for _ in range(2):  # the names are known the second time
        answer = await pool.post("/v1/x", b"{}", [])
        assert [name for name, _ in answer.headers] == [
            "Server", "Date", "Content-Type", "Keep-Alive", "X-Request-Id", "Transfer-Encoding"]
        assert answer.end_to_end == [("Content-Type", "application/json"),
                                     ("X-Request-Id", "abc")]
        assert await answer.read() == b"{}"
    pool.close()


async def test_chunked_stream_arrives_chunk_by_chunk(serve) -> None:  # type: ignore[no-untyped-def]
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        writer.write(b"6\r\ndata: \r\n")
        await release.wait()
        writer.write(b"3;ext=1\r\nabc\r\n0\r\n\r\n")

    pool = Pool(await serve(handler), 1, 5)
    answer = await pool.post("/", b"{}", [])
    assert answer.content_type == "text/event-stream"
    chunks = answer.iter_chunks()
    assert await chunks.__anext__() == b"data: "  # before the rest has been sent
    release.set()
    assert [c async for c in chunks] == [b"abc"]
    pool.close()


async def test_stale_keep_alive_connection_is_retried_once(serve) -> None:  # type: ignore[no-untyped-def]
    """The server drops a kept-alive connection just as a request arrives on it, as uvicorn does
    when its idle timeout and the request cross: the client still believed the connection was
    alive, no byte came back, so the request is sent again on a new connection."""
    requests: list[int] = []
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        conn = connections
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            requests.append(conn)
            if conn == 1 and len(requests) == 2:  # the second request on the first connection
                writer.transport.abort()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    pool = Pool(await serve(handler), 1, 5)
    assert await (await pool.post("/", b"{}", [])).read() == b"ok"
    assert await (await pool.post("/", b"{}", [])).read() == b"ok"  # retried
    assert requests == [1, 1, 2]  # the second request reached the server twice
    pool.close()


async def test_a_request_that_got_an_answer_is_never_retried(serve) -> None:  # type: ignore[no-untyped-def]
    requests = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            requests += 1
            if requests == 2:  # part of an answer, then the connection dies
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
                await writer.drain()
                writer.transport.abort()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    pool = Pool(await serve(handler), 1, 5)
    assert await (await pool.post("/", b"{}", [])).read() == b"ok"
    with pytest.raises(UpstreamError):
        await pool.post("/", b"{}", [])
    assert requests == 2  # not sent again: it may have been generated already
    pool.close()


async def test_read_timeout(serve) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    pool = Pool(await serve(handler), 1, 0.3)
    with pytest.raises(UpstreamTimeout):
        await pool.post("/", b"{}", [])
    pool.close()


async def test_unreachable_and_broken_answers(serve) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
        await writer.drain()
        writer.close()

    pool = Pool(await serve(handler), 1, 5)
    answer = await pool.post("/", b"{}", [])
    with pytest.raises(UpstreamError):
        await answer.read()
    pool.close()

    closed = Pool("http://127.0.0.1:9", 1, 5)
    with pytest.raises(UpstreamError):
        await closed.post("/", b"{}", [])
    closed.close()


async def test_close_delimited_body(serve) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    pool = Pool(await serve(handler), 1, 5)
    assert await (await pool.post("/", b"{}", [])).read() == b"all of it"
    pool.close()


async def test_a_body_that_ends_with_the_connection(serve) -> None:  # type: ignore[no-untyped-def]
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\n\r\n{\"a\":")
        await writer.drain()
        writer.write(b"1}")
        writer.close()

    pool = Pool(await serve(handler), 1, 5)
    for _ in range(2):
        assert await (await pool.post("/", b"{}", [])).read() == b'{"a":1}'
    assert connections == 2  # such a connection is never reused
    pool.close()


async def test_reading_stops_while_the_relay_does_not_take_the_body(serve) -> None:  # type: ignore[no-untyped-def]
    size = 8 * 1024 * 1024
    unsent: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(b"x" * size)
        await asyncio.sleep(0.5)  # the client holds the answer meanwhile
        unsent.append(writer.transport.get_write_buffer_size())
        await writer.drain()

    pool = Pool(await serve(handler), 1, 5)
    answer = await pool.post("/", b"{}", [])
    chunks = answer.iter_chunks()
    first = await chunks.__anext__()
    # The client read a little, then stopped: most of the body is still with the server.
    await _until(lambda: bool(unsent))
    assert unsent[0] > size // 2, unsent
    assert len(first) + sum([len(c) async for c in chunks]) == size
    pool.close()


@pytest.mark.parametrize("answer", [
    b"HTTX/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
async def test_a_malformed_answer_is_an_upstream_error(serve, answer: bytes) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(1)

    pool = Pool(await serve(handler), 1, 5)
    with pytest.raises(UpstreamError):
        await (await pool.post("/", b"{}", [])).read()
    pool.close()


async def _until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "the condition never held"
        await asyncio.sleep(0.01)
