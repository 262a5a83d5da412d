"""The server core of ``/v1`` (proxy/http) over real sockets, with a small handler in front.

Each test starts a core on a port of its own: keep-alive and pipelining, chunked bodies,
``Expect: 100-continue``, the body limit, the head, body and idle timeouts, backpressure on a
streamed answer, cancellation when the client goes away, a graceful stop, the hand-over to the
aiohttp application, and what is not HTTP.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from inference_gateway.errors import GatewayError
from inference_gateway.proxy.handler import Incoming
from inference_gateway.proxy.http import Limits, ServerCore
from inference_gateway.proxy.relay import Answer, OpenStream

BIG_CHUNK = b"x" * 65536


@dataclass
class Handler:
    """Echoes bodies; a few paths do something else (see ``serve``)."""

    served: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    chunks_written: int = 0
    big_chunks: int = 1600  # 100 MiB
    release: asyncio.Event = field(default_factory=asyncio.Event)
    malformed: int = 0

    def count_malformed(self) -> None:
        self.malformed += 1

    async def serve(self, request: Incoming, open_stream: OpenStream) -> Answer:
        self.served.append(request.path)
        try:
            if request.path == "/v1/refuse":  # answers on the head alone
                return web.Response(status=403, body=b"no")
            if request.path == "/v1/wait":  # until the test lets it go
                await self.release.wait()
                return web.Response(body=b"released")
            if request.path == "/v1/big-stream":
                stream = await open_stream(200, [("Content-Type", "text/event-stream")])
                for _ in range(self.big_chunks):
                    await stream.write(BIG_CHUNK)
                    self.chunks_written += 1
                await stream.write_eof(b"end")
                return stream
            if request.path == "/v1/stream":
                stream = await open_stream(200, [("Content-Type", "text/event-stream")])
                for i in range(3):
                    await stream.write(b"data: %d\n\n" % i)
                await stream.write_eof(b"data: [DONE]\n\n")
                return stream
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return web.Response(status=413, body=b"too large")
            except GatewayError as exc:
                return exc.response()
            query = request.raw_path.partition("?")[2]
            return web.Response(body=b"%s %s %s %s" % (
                request.method.encode(), request.path.encode(), query.encode(), body),
                headers={"X-Tenant": request.headers.get("x-tembo-org", "-")})
        except asyncio.CancelledError:
            self.cancelled.append(request.path)
            raise


@dataclass
class Core:
    core: ServerCore
    handler: Handler
    port: int

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)


async def _app_answer(request: web.BaseRequest) -> web.Response:
    return web.Response(text=f"app {request.method} {request.path}")


@pytest.fixture
async def make_core() -> AsyncIterator[Callable[..., Awaitable[Core]]]:
    started: list[ServerCore] = []

    async def make(**limits: float) -> Core:
        handler = Handler()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.setblocking(False)
        app = web.Server(_app_answer)
        core = ServerCore(handler, lambda method, path: path.startswith("/v1/"), app,
                          Limits(max_body=int(limits.pop("max_body", 1024)),
                                 **limits),  # type: ignore[arg-type]
                          handler.count_malformed)
        await core.start(sock)
        started.append(core)
        return Core(core, handler, sock.getsockname()[1])

    yield make
    for core in started:
        await core.close(1)


def _post(path: str, body: bytes, *extra: bytes) -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path.encode(), len(body), b"".join(e + b"\r\n" for e in extra), body))


async def _answer(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    """One answer: status line, headers, body (by length, chunks, or to the close).

    A chunked answer is read in large blocks, so it must be the last thing the server sends
    before the test writes again.
    """
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        raw = bytearray()
        while not raw.endswith(b"0\r\n\r\n"):
            raw += await asyncio.wait_for(reader.read(1 << 20), 5) or b"0\r\n\r\n"
        pieces, at = [], 0
        while True:
            end = raw.index(b"\r\n", at)
            size = int(raw[at:end], 16)
            pieces.append(raw[end + 2:end + 2 + size])
            at = end + 4 + size
            if size == 0:
                break
        body = b"".join(pieces)
    else:
        body = await asyncio.wait_for(reader.read(), 5)
    return status.encode(), headers, body


async def _closed(reader: asyncio.StreamReader, within: float = 5) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except ConnectionResetError:
        return True


async def test_keep_alive_and_pipelined_requests_answer_in_order(make_core: Callable[
        ..., Awaitable[Core]]) -> None:
    core = await make_core()
    reader, writer = await core.connect()
    writer.write(_post("/v1/a?x=1", b"one", b"X-TEMBO-ORG: acme") + _post("/v1/b", b"two")
                 + _post("/v1/c", b"three"))
    answers = [await _answer(reader) for _ in range(3)]
    assert [a[2] for a in answers] == [b"POST /v1/a x=1 one", b"POST /v1/b  two",
                                       b"POST /v1/c  three"]
    assert answers[0][0] == b"HTTP/1.1 200 OK" and answers[0][1]["x-tenant"] == "acme"
    assert "connection" not in answers[2][1]
    writer.write(_post("/v1/d", b"four"))  # the connection is still open
    assert (await _answer(reader))[2] == b"POST /v1/d  four"
    writer.close()


async def test_connection_close_is_honoured(make_core: Callable[..., Awaitable[Core]]) -> None:
    core = await make_core()
    reader, writer = await core.connect()
    writer.write(_post("/v1/a", b"x", b"Connection: close"))
    _, headers, _ = await _answer(reader)
    assert headers["connection"] == "close"
    assert await _closed(reader)
    writer.close()


async def test_chunked_body_is_read_whole(make_core: Callable[..., Awaitable[Core]]) -> None:
    core = await make_core()
    reader, writer = await core.connect()
    writer.write(b"POST /v1/chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3\r\nabc\r\n")
    await asyncio.sleep(0.05)
    writer.write(b"4\r\ndefg\r\n0\r\n\r\n")
    assert (await _answer(reader))[2] == b"POST /v1/chunked  abcdefg"
    writer.close()


async def test_expect_100_continue(make_core: Callable[..., Awaitable[Core]]) -> None:
    core = await make_core()
    reader, writer = await core.connect()
    writer.write(b"POST /v1/e HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                 b"Expect: 100-continue\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    assert (await _answer(reader))[2] == b"POST /v1/e  hello"
    # Refused on its head: no 100, and the connection closes, the body never having come.
    writer.write(b"POST /v1/refuse HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                 b"Expect: 100-continue\r\n\r\n")
    status, headers, body = await _answer(reader)
    assert status == b"HTTP/1.1 403 Forbidden" and body == b"no"
    assert headers["connection"] == "close" and await _closed(reader)
    writer.close()


async def test_body_over_the_limit_is_refused_without_waiting_for_it(
        make_core: Callable[..., Awaitable[Core]]) -> None:
    core = await make_core(max_body=1024)
    reader, writer = await core.connect()
    writer.write(b"POST /v1/big HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"800\r\n" + b"y" * 2048 + b"\r\n")  # more than the limit, not yet the end
    status, headers, _ = await _answer(reader)
    assert status.startswith(b"HTTP/1.1 413") and headers["connection"] == "close"
    # The rest is read and dropped (a client still sending would get a reset, not the answer),
    # and the connection closes once it has come.
    writer.write(b"800\r\n" + b"y" * 2048 + b"\r\n0\r\n\r\n")
    assert await _closed(reader, within=2)
    writer.close()


async def test_head_timeout(make_core: Callable[..., Awaitable[Core]]) -> None:
    core = await make_core(head_timeout=0.3)
    reader, writer = await core.connect()
    writer.write(b"POST /v1/slow HTTP/1.1\r\nHost: t\r\n")  # and never the end of the head
    status, headers, _ = await _answer(reader)
    assert status.startswith(b"HTTP/1.1 408") and headers["connection"] == "close"
    assert await _closed(reader)
    assert core.handler.served == []
    writer.close()


async def test_body_timeout(make_core: Callable[..., Awaitable[Core]]) -> None:
    core = await make_core(body_timeout=0.3)
    reader, writer = await core.connect()
    writer.write(b"POST /v1/slow HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
    status, headers, body = await _answer(reader)
    assert status.startswith(b"HTTP/1.1 408") and b"request_timeout" in body
    assert headers["connection"] == "close" and await _closed(reader)
    writer.close()


async def test_idle_timeout(make_core: Callable[..., Awaitable[Core]]) -> None:
    core = await make_core(idle_timeout=0.3)
    reader, writer = await core.connect()
    writer.write(_post("/v1/a", b"x"))
    await _answer(reader)
    assert await _closed(reader, within=3)  # kept alive, then closed when idle too long
    reader, writer = await core.connect()
    assert await _closed(reader, within=3)  # never sent anything
    writer.close()


async def test_streamed_answer_waits_for_a_slow_reader(
        make_core: Callable[..., Awaitable[Core]]) -> None:
    core = await make_core()
    reader, writer = await core.connect()
    writer.write(_post("/v1/big-stream", b""))
    await asyncio.sleep(1.0)  # not reading: the socket's buffers fill, then the writes wait
    stalled = core.handler.chunks_written
    await asyncio.sleep(0.3)
    assert core.handler.chunks_written == stalled < 1600 // 4  # well under 25 MiB in flight
    status, _, body = await _answer(reader)  # reading lets it go on to the end
    assert status == b"HTTP/1.1 200 OK" and len(body) == 1600 * 65536 + 3
    assert core.handler.chunks_written == 1600
    writer.close()


async def test_streamed_answer_is_chunked_and_keeps_the_connection(
        make_core: Callable[..., Awaitable[Core]]) -> None:
    core = await make_core()
    reader, writer = await core.connect()
    writer.write(_post("/v1/stream", b""))
    _, headers, body = await _answer(reader)
    assert headers["transfer-encoding"] == "chunked"
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    writer.write(_post("/v1/after", b"z"))
    assert (await _answer(reader))[2] == b"POST /v1/after  z"
    # HTTP/1.0 has no chunks: the body ends with the connection.
    reader, writer = await core.connect()
    writer.write(b"POST /v1/stream HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
    _, headers, body = await _answer(reader)
    assert "transfer-encoding" not in headers and body.endswith(b"data: [DONE]\n\n")
    writer.close()


async def test_client_going_away_cancels_its_request(
        make_core: Callable[..., Awaitable[Core]]) -> None:
    core = await make_core()
    _, writer = await core.connect()
    writer.write(_post("/v1/wait", b""))
    for _ in range(100):
        if core.handler.served:
            break
        await asyncio.sleep(0.01)
    writer.close()
    for _ in range(100):
        if core.handler.cancelled:
            break
        await asyncio.sleep(0.01)
    assert core.handler.cancelled == ["/v1/wait"]


async def test_graceful_stop_finishes_answers_in_progress(
        make_core: Callable[..., Awaitable[Core]]) -> None:
    core = await make_core()
    idle_reader, idle_writer = await core.connect()
    busy_reader, busy_writer = await core.connect()
    busy_writer.write(_post("/v1/wait", b""))
    while not core.handler.served:
        await asyncio.sleep(0.01)
    closing = asyncio.create_task(core.core.close(5))
    assert await _closed(idle_reader, within=2)  # an idle connection closes at once
    with pytest.raises(OSError):  # and no new one is accepted
        await core.connect()
    assert not closing.done()
    core.handler.release.set()  # the request in progress gets its answer, then the close
    _, headers, body = await _answer(busy_reader)
    assert body == b"released" and headers["connection"] == "close"
    await asyncio.wait_for(closing, 5)
    assert core.handler.cancelled == []
    idle_writer.close()
    busy_writer.close()


async def test_graceful_stop_cuts_what_outlasts_the_grace(
        make_core: Callable[..., Awaitable[Core]]) -> None:
    core = await make_core()
    _, writer = await core.connect()
    writer.write(_post("/v1/wait", b""))
    while not core.handler.served:
        await asyncio.sleep(0.01)
    await asyncio.wait_for(core.core.close(0.2), 5)
    assert core.handler.cancelled == ["/v1/wait"]  # recorded as the client's disconnect
    writer.close()


async def test_other_requests_are_handed_to_the_application(
        make_core: Callable[..., Awaitable[Core]]) -> None:
    core = await make_core()
    # A connection that starts elsewhere is the application's.
    reader, writer = await core.connect()
    writer.write(b"GET /ready HTTP/1.1\r\nHost: t\r\n\r\n")
    assert (await _answer(reader))[2] == b"app GET /ready"
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
    assert (await _answer(reader))[2] == b"app GET /metrics"
    writer.close()
    # One that starts here and then asks for something else, pipelined, chunked on the way.
    reader, writer = await core.connect()
    writer.write(_post("/v1/a", b"one") + b"GET /v1x/models HTTP/1.1\r\nHost: t\r\n\r\n"
                 + b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"2\r\nhi\r\n0\r\n\r\n" + _post("/v1/b", b"two"))
    answers = [await _answer(reader) for _ in range(4)]
    assert [a[2] for a in answers] == [b"POST /v1/a  one", b"app GET /v1x/models",
                                       b"app POST /upload", b"app POST /v1/b"]
    assert core.handler.served == ["/v1/a"]
    writer.close()


async def test_what_is_not_http_gets_a_plain_400_and_is_counted(
        make_core: Callable[..., Awaitable[Core]]) -> None:
    core = await make_core()
    reader, writer = await core.connect()
    writer.write(b"P\x00ST /v1/a HTTP/1.1\r\n\r\n")
    status, headers, _ = await _answer(reader)
    assert status.startswith(b"HTTP/1.1 400") and headers["content-type"].startswith("text/")
    assert await _closed(reader)
    # A malformed chunk in a request's body: the handler answers it, in its own shape.
    reader, writer = await core.connect()
    writer.write(b"POST /v1/c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"zz\r\nabc\r\n")
    status, headers, body = await _answer(reader)
    assert status.startswith(b"HTTP/1.1 400") and b"invalid_request_body" in body
    assert headers["connection"] == "close" and await _closed(reader)
    # A head too large for the limits.
    reader, writer = await core.connect()
    writer.write(b"POST /v1/a HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    status, _, _ = await _answer(reader)
    assert status.startswith(b"HTTP/1.1 431")
    assert core.handler.malformed == 3
    writer.close()
