"""A small HTTP/1.1 client for the one thing the gateway does upstream: send JSON, relay bytes.

A general client (aiohttp's) spends most of the gateway's CPU per request on features the
gateway does not use: cookies, redirects, proxies, compression, multipart. This one keeps a pool
of keep-alive connections per model server and parses just status, headers and a
``Content-Length``, chunked or close-delimited body.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 64 * 1024
READ_SIZE = 64 * 1024
# uvicorn, which serves vLLM, closes a connection idle for 5 s; reuse only younger ones.
MAX_IDLE_SEC = 4.0


class UpstreamError(Exception):
    """The model server could not be reached, or broke off its answer."""


class UpstreamTimeout(UpstreamError):
    """The model server did not answer (or send the next byte) in time."""


@dataclass(slots=True, eq=False)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0
    reused: bool = False
    deadline: float = 0.0  # when the read in progress times out; 0: no read in progress
    timed_out: bool = False

    async def wait(self, awaitable: Awaitable[bytes], within: float) -> bytes:
        """Await a read under a deadline that the pool's watchdog enforces.

        One watchdog per pool instead of a timer per read: a timer costs more than the rest of
        a small request's parsing.
        """
        self.deadline = time.monotonic() + within
        try:
            return await awaitable
        except (asyncio.IncompleteReadError, ConnectionError):
            if self.timed_out:
                raise UpstreamTimeout("the model server did not answer in time") from None
            raise
        finally:
            self.deadline = 0.0

    def usable(self) -> bool:
        return (
            not self.reader.at_eof()
            and not self.writer.is_closing()
            and time.monotonic() - self.idle_since < MAX_IDLE_SEC
        )

    def close(self) -> None:
        self.writer.close()


@dataclass(slots=True)
class Response:
    """A response whose body is still on the wire: read it all, or iterate over its chunks."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    _conn: _Connection | None
    _pool: Pool
    _length: int | None  # Content-Length; None: chunked or until close
    _chunked: bool
    _keep_alive: bool
    _read_timeout: float
    _done: bool = False
    content_type: str = field(default="")

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_chunks()])

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive; the connection goes back to the pool after the last."""
        assert self._conn is not None, "the body was already read"
        reader = self._conn.reader
        try:
            if self._chunked:
                while True:
                    line = await self._timed(reader.readuntil(b"\r\n"))
                    size = int(line.split(b";", 1)[0].strip(), 16)
                    if size == 0:
                        while (await self._timed(reader.readuntil(b"\r\n"))) != b"\r\n":
                            pass  # trailers
                        break
                    data = await self._timed(reader.readexactly(size + 2))
                    yield data[:-2]
            elif self._length is not None:
                remaining = self._length
                while remaining:
                    data = await self._timed(reader.read(min(remaining, READ_SIZE)))
                    if not data:
                        raise UpstreamError("the model server closed the connection mid-answer")
                    remaining -= len(data)
                    yield data
            else:
                self._keep_alive = False
                while data := await self._timed(reader.read(READ_SIZE)):
                    yield data
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                ConnectionError) as exc:
            raise UpstreamError(f"the model server broke off its answer: {exc!r}") from None
        self._done = True
        self.release()

    async def _timed(self, awaitable: Awaitable[bytes]) -> bytes:
        assert self._conn is not None
        return await self._conn.wait(awaitable, self._read_timeout)

    def release(self) -> None:
        """Give the connection back if the body was read whole, else close it.

        Closing is what tells vLLM that the client went away, so it aborts the generation.
        """
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._pool.active.discard(conn)
        if self._done and self._keep_alive:
            self._pool.put(conn)
        else:
            conn.close()


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
        self._read_timeout = read_timeout
        self._idle: deque[_Connection] = deque()
        self._max_idle = max_idle
        self.active: set[_Connection] = set()  # connections with a request in progress
        self._watchdog: asyncio.Task[None] | None = None

    def put(self, conn: _Connection) -> None:
        if len(self._idle) >= self._max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        conn.reused = True
        self._idle.append(conn)

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self._connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, limit=MAX_HEAD_BYTES, ssl=self._ssl)
        except TimeoutError:
            raise UpstreamTimeout(f"connecting to {self.host}:{self.port} timed out") from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        return _Connection(reader, writer)

    def _take(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()  # the most recently used is the least likely to be stale
            if conn.usable():
                return conn
            conn.close()
        return None

    async def post(self, path: str, body: bytes, headers: list[tuple[str, str]]) -> Response:
        return await self.request("POST", path, body, headers)

    async def request(self, method: str, path: str, body: bytes,
                      headers: list[tuple[str, str]]) -> Response:
        """Send a request; on a reused connection that turns out closed, retry once on a new one.

        The retry is safe only because it happens when not one byte of an answer came back.
        """
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())
        conn = self._take()
        if conn is not None:
            try:
                return await self._exchange(conn, method, path, body, headers)
            except _StaleConnection:
                pass
        conn = await self._connect()
        try:
            return await self._exchange(conn, method, path, body, headers)
        except _StaleConnection as exc:
            raise UpstreamError(str(exc)) from None

    async def _exchange(self, conn: _Connection, method: str, path: str, body: bytes,
                        headers: list[tuple[str, str]]) -> Response:
        head = [method.encode(), b" ", (self.prefix + path).encode(), b" HTTP/1.1\r\nHost: ",
                self._host_header, b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n"]
        for name, value in headers:
            head += [name.encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n"]
        head.append(b"\r\n")
        self.active.add(conn)
        try:
            conn.writer.write(b"".join(head) + body)
            head_bytes = await conn.wait(conn.reader.readuntil(b"\r\n\r\n"), self._read_timeout)
        except UpstreamTimeout:
            self._drop(conn)
            raise
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self._drop(conn)
            partial = exc.partial if isinstance(exc, asyncio.IncompleteReadError) else b""
            if conn.reused and not partial:
                raise _StaleConnection(repr(exc)) from None
            raise UpstreamError(f"the model server closed the connection: {exc!r}") from None
        except asyncio.LimitOverrunError:
            self._drop(conn)
            raise UpstreamError("the model server's response head is too large") from None
        except BaseException:
            self._drop(conn)
            raise
        try:
            return self._response(conn, head_bytes)
        except (ValueError, UnicodeError, UpstreamError) as exc:
            self._drop(conn)
            raise UpstreamError(f"bad response head from the model server: {exc}") from None

    def _drop(self, conn: _Connection) -> None:
        self.active.discard(conn)
        conn.close()

    def _response(self, conn: _Connection, head: bytes) -> Response:
        status_line, _, raw = head.partition(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise UpstreamError(f"not an HTTP/1.x response: {status_line[:80]!r}")
        status = int(parts[1])
        reason = parts[2].strip().decode("latin-1") if len(parts) > 2 else ""
        headers: list[tuple[str, str]] = []
        length: int | None = None
        chunked = False
        keep_alive = parts[0] == b"HTTP/1.1"
        content_type = ""
        for line in raw.split(b"\r\n"):
            if not line:
                continue
            name, _, value = line.partition(b":")
            key = name.strip().decode("latin-1")
            text = value.strip().decode("latin-1")
            lower = key.lower()
            if lower == "content-length":
                length = int(text)
            elif lower == "transfer-encoding":
                chunked = "chunked" in text.lower()
            elif lower == "connection":
                keep_alive = "close" not in text.lower()
            elif lower == "content-type":
                content_type = text.split(";", 1)[0].strip().lower()
            headers.append((key, text))
        if chunked:
            length = None
        elif status in (204, 304) or 100 <= status < 200:
            length = 0
        return Response(status, reason, headers, conn, self, length, chunked, keep_alive,
                        self._read_timeout, content_type=content_type)

    async def _watch(self) -> None:
        """Abort connections whose read has waited past its deadline."""
        interval = min(1.0, self._read_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for conn in list(self.active):
                if conn.deadline and now > conn.deadline:
                    conn.timed_out = True
                    conn.writer.transport.abort()

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self._idle:
            self._idle.pop().close()
        for conn in self.active:
            conn.close()
        self.active.clear()


class _StaleConnection(Exception):
    """A reused keep-alive connection was closed by the server before it answered."""
