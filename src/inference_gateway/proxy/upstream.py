"""A small HTTP/1.1 client for the one thing the gateway does upstream: send JSON, relay bytes.

A general client spends most of the gateway's CPU per request on features the gateway does not
use (cookies, redirects, proxies, compression, multipart). This one is an ``asyncio.Protocol``
per connection with llhttp (``httptools``, the parser Node uses) reading the answers, and a
pool of keep-alive connections per model server. The body of an answer is handed over as it
arrives; the connection stops reading while too much of it waits for the relay to take it.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools

from inference_gateway.proxy.answer_headers import header_name

MAX_HEAD_BYTES = 64 * 1024
PAUSE_ABOVE = 256 * 1024  # bytes of body waiting for the relay before reading stops
RESUME_BELOW = 64 * 1024
# uvicorn, which serves vLLM, closes a connection idle for 5 s; reuse only younger ones.
MAX_IDLE_SEC = 4.0
MAX_HEADS = 64  # request heads kept by a pool, less their length (see ``Pool._head``)


class UpstreamError(Exception):
    """The model server could not be reached, or broke off its answer."""


class UpstreamTimeout(UpstreamError):
    """The model server did not answer (or send the next byte) in time."""


class _StaleConnection(Exception):
    """A reused keep-alive connection was closed by the server before it answered."""


@dataclass(slots=True, eq=False)
class Response:
    """An answer whose body may still be on the wire: read it all, or iterate over its chunks."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    end_to_end: list[tuple[str, str]]  # the headers without the hop-by-hop ones
    content_type: str
    _conn: _Connection | None
    _chunks: deque[bytes] = field(default_factory=deque)
    _buffered: int = 0
    _complete: bool = False
    _error: UpstreamError | None = None

    async def read(self) -> bytes:
        conn = self._conn
        if self._complete and self._error is None and conn is not None:  # it came in whole
            body = self._take(conn)
            self.release()
            return body
        return b"".join([chunk async for chunk in self.iter_chunks()])

    def iter_chunks(self) -> Chunks:
        """Body bytes as they arrive; the connection goes back to the pool after the last."""
        assert self._conn is not None, "the body was already read"
        return Chunks(self, self._conn)

    def _take(self, conn: _Connection) -> bytes:
        """What has arrived of the body, in one piece; reading may go on."""
        chunks = self._chunks
        body = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        conn.resume()
        return body

    def release(self) -> None:
        """Give the connection back if the body was read whole, else close it.

        Closing is what tells vLLM that the client went away, so it aborts the generation.
        """
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.pool.finished(conn, self._complete and not self._chunks)

    def _feed(self, data: bytes) -> None:  # by the connection, as the body arrives
        self._chunks.append(data)
        self._buffered += len(data)


@dataclass(slots=True)
class Chunks:
    """``Response.iter_chunks``: not an async generator, which the compiled build cannot be."""

    _response: Response
    _conn: _Connection

    def __aiter__(self) -> Chunks:
        return self

    async def __anext__(self) -> bytes:
        response, conn = self._response, self._conn
        while True:
            if response._chunks:
                return response._take(conn)
            if response._error is not None:
                raise response._error
            if response._complete:
                response.release()
                raise StopAsyncIteration
            if conn.closed:
                raise UpstreamError("the model server closed the connection mid-answer")
            await conn.wait_for_body()


class _Connection(asyncio.Protocol):
    """One keep-alive connection: writes requests, parses answers with llhttp."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.deadline = 0.0  # when the wait in progress times out; 0: none
        self.timed_out = False
        self.got_bytes = False  # any byte of the answer in progress
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._head: asyncio.Future[Response] | None = None
        self._response: Response | None = None
        self._reason = b""
        self._headers: list[tuple[str, str]] = []
        self._end_to_end: list[tuple[str, str]] = []
        self._content_type = ""  # the answer's, without parameters, lower-case
        self._head_bytes = 0
        self._delimited = False  # the body's end is known from its framing, not the close

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"bad response from the model server: {exc}"))
            self.abort()
            return
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self._response
        if self.timed_out:
            self._fail(UpstreamTimeout("the model server did not answer in time"))
        elif response is not None and not response._complete and not self._delimited:
            response._complete = True  # a body that ends with the connection
        elif not self.got_bytes and self.reused:
            self._fail(_StaleConnection(repr(exc)))  # no byte came back: safe to send again
        else:
            self._fail(UpstreamError(f"the model server closed the connection: {exc!r}"))
        self._wake()

    # -- llhttp callbacks -----------------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise httptools.HttpParserError("the response head is too large")
        key, lower, relayed = header_name(name)
        text = value.decode("latin-1")
        if relayed:
            self._end_to_end.append((key, text))
        if lower == "content-length" or (lower == "transfer-encoding"
                                         and b"chunked" in value.lower()):
            self._delimited = True
        elif lower == "content-type":
            self._content_type = text.split(";", 1)[0].strip().lower()
        self._headers.append((key, text))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status in (204, 304) or 100 <= status < 200:
            self._delimited = True
        self._response = Response(status, self._reason.decode("latin-1").strip(),
                                  self._headers, self._end_to_end, self._content_type, self)
        if self._head is not None and not self._head.done():
            self._head.set_result(self._response)

    def on_body(self, body: bytes) -> None:
        assert self._response is not None
        self._response._feed(body)
        if self._response._buffered > PAUSE_ABOVE and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        assert self._response is not None
        self._response._complete = True
        if not self.parser.should_keep_alive():
            self.pool.no_reuse(self)

    # -- for the pool and the response ----------------------------------------------------------

    def send(self, head: bytes, body: bytes) -> asyncio.Future[Response]:
        """Write a request; the future resolves with the answer's head."""
        assert self.transport is not None
        self._reason, self._headers, self._end_to_end = b"", [], []
        self._head_bytes, self._content_type = 0, ""
        self._delimited, self._response, self.got_bytes = False, None, False
        self._head = asyncio.get_running_loop().create_future()
        self.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.transport.write(body)
        return self._head

    async def wait_for_body(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        self.deadline = time.monotonic() + self.pool.read_timeout
        try:
            await self._waiter
        finally:
            self.deadline = 0.0
            self._waiter = None

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def usable(self) -> bool:
        return not self.closed and time.monotonic() - self.idle_since < MAX_IDLE_SEC

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, error: Exception) -> None:
        head = self._head
        if head is not None and not head.done():
            head.set_exception(error)
            head.exception()  # retrieved: a failed head may never be awaited
        elif self._response is not None and not self._response._complete \
                and isinstance(error, UpstreamError):
            self._response._error = error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Pool:
    """Keep-alive connections to one ``http://host:port``."""

    def __init__(self, base_url: str, connect_timeout: float, read_timeout: float,
                 max_idle: int = 1000) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"model server URLs start with http:// or https://: {base_url!r}")
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.prefix = parts.path.rstrip("/")
        self._host_header = f"{self.host}:{self.port}".encode()
        self._connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: deque[_Connection] = deque()
        self._max_idle = max_idle
        self.active: set[_Connection] = set()  # connections with a request in progress
        self._no_reuse: set[_Connection] = set()
        self._watchdog: asyncio.Task[None] | None = None
        # (method, path, id of headers) -> the headers, the head before and after its length
        self._heads: dict[tuple[str, str, int], tuple[list[tuple[str, str]], bytes, bytes]] = {}

    async def post(self, path: str, body: bytes, headers: list[tuple[str, str]]) -> Response:
        return await self.request("POST", path, body, headers)

    async def request(self, method: str, path: str, body: bytes,
                      headers: list[tuple[str, str]]) -> Response:
        """Send a request; on a reused connection that turns out closed, retry once on a new one.

        The retry is safe only because it happens when not one byte of an answer came back.
        """
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())
        head = self._head(method, path, len(body), headers)
        conn = self._take()
        if conn is not None:
            try:
                return await self._exchange(conn, head, body)
            except _StaleConnection:
                pass
        conn = await self._connect()
        try:
            return await self._exchange(conn, head, body)
        except _StaleConnection as exc:
            raise UpstreamError(f"the model server closed the connection: {exc}") from None

    def finished(self, conn: _Connection, whole: bool) -> None:
        """The answer on ``conn`` is over: keep the connection if it can serve another."""
        self.active.discard(conn)
        if not whole or conn.closed or conn in self._no_reuse or \
                len(self._idle) >= self._max_idle:
            self._no_reuse.discard(conn)
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        conn.reused = True
        self._idle.append(conn)

    def no_reuse(self, conn: _Connection) -> None:
        self._no_reuse.add(conn)

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self._idle:
            self._idle.pop().abort()
        for conn in self.active:
            conn.abort()
        self.active.clear()

    # -- inside ---------------------------------------------------------------------------------

    def _head(self, method: str, path: str, length: int,
              headers: list[tuple[str, str]]) -> bytes:
        """The request head. Requests alike differ only in their length, so the rest is kept
        for the last few (method, path, headers) seen: 0.8 us a head instead of 1.9."""
        key = (method, path, id(headers))
        known = self._heads.get(key)
        if known is None or known[0] is not headers:
            lines = [f"{name}: {value}\r\n" for name, value in headers]
            start = f"{method} {self.prefix}{path} HTTP/1.1\r\n".encode() + b"Host: " + \
                self._host_header + b"\r\nContent-Length: "
            known = headers, start, "".join(lines).encode("latin-1") + b"\r\n"
            if len(self._heads) >= MAX_HEADS:
                self._heads.clear()
            self._heads[key] = known
        return b"%b%d\r\n%b" % (known[1], length, known[2])

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self._ssl)
        except TimeoutError:
            raise UpstreamTimeout(f"connecting to {self.host}:{self.port} timed out") from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        return conn

    def _take(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()  # the most recently used is the least likely to be stale
            if conn.usable():
                return conn
            conn.abort()
        return None

    async def _exchange(self, conn: _Connection, head: bytes, body: bytes) -> Response:
        self.active.add(conn)
        conn.deadline = time.monotonic() + self.read_timeout
        try:
            return await conn.send(head, body)
        except BaseException:
            self.active.discard(conn)
            conn.abort()
            raise
        finally:
            conn.deadline = 0.0

    async def _watch(self) -> None:
        """Abort connections whose wait has gone past its deadline.

        One watchdog per pool instead of a timer per read: a timer costs more than the rest of
        a small request's parsing.
        """
        interval = min(1.0, self.read_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for conn in list(self.active):
                if conn.deadline and now > conn.deadline:
                    conn.timed_out = True
                    conn.abort()
