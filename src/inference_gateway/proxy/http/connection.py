"""One client connection: requests parsed by llhttp, answered one after another, in order.

Requests may be pipelined: each parsed head joins a queue and one task answers them in turn;
reading stops while ``max_pipelined`` wait. A request's body is kept as it arrives for the
handler to ``read``. When the client goes away, the task is cancelled, which the relay records
as a disconnect (the upstream request is closed, the record says 499 or what was relayed).

Only requests for a forwarded ``/v1`` endpoint are answered here. A connection whose first
request is anything else is given to the aiohttp application whole: its protocol takes the
socket and the bytes read so far, so probes, ``/metrics`` and the dashboard run as they always
did. A later request for something else on a connection that began here is passed to an
aiohttp protocol too, rewritten from what the parser read (llhttp does not say where in the
bytes a request began), and that protocol answers the rest of the connection; the answers
already due here are written first.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools
from aiohttp import web

from inference_gateway.errors import GatewayError
from inference_gateway.proxy.http.request import Request, is_chunked, rewritten_head
from inference_gateway.proxy.http.response import StreamOut, head, plain, whole
from inference_gateway.proxy.relay import Whole

if TYPE_CHECKING:
    from inference_gateway.proxy.http.core import ServerCore

log = logging.getLogger(__name__)

MAX_URL = 8190  # bytes of request target, as aiohttp allows
MAX_HEAD = 64 * 1024  # bytes of header names and values
MAX_HEADERS = 256
# After an answer given before its request's body was read whole, how long the rest of the
# body is read and dropped before the connection closes: a client still sending when the
# connection closes gets a reset instead of the answer (aiohttp waits as long).
LINGER_SEC = 10.0


class _Refused(Exception):
    """Raised in a parser callback: a head the gateway will not read."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _HandedOver(Exception):
    """Raised in a parser callback: the connection is the aiohttp application's now."""


class Connection(asyncio.Protocol):
    def __init__(self, core: ServerCore) -> None:
        self.core = core
        self.limits = core.limits
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.closed = False
        self.first: bytearray | None = bytearray()  # read before the first head was whole
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.head_bytes = 0
        self.parsing: Request | None = None  # the request whose body is arriving
        self.queue: deque[Request] = deque()  # the first is being answered
        self.task: asyncio.Task[None] | None = None
        self.deadline = 0.0  # monotonic; 0: none
        self.waiting_for = ""  # what the deadline is for: "idle", "head" or "body"
        self.broken: tuple[int, str] | None = None  # a bad head, answered after the queue
        self.lingering = False  # the last answer is out; the rest of its body is dropped
        self._read_paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self.app: asyncio.Protocol | None = None  # aiohttp's protocol, after a hand-over
        self._app_backlog: list[bytes] | None = None  # its bytes, until our answers are out
        self._app_chunked = False

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer = str(peer[0])
        self.core.connections.add(self)
        self._expect("idle", self.limits.idle_timeout)

    def data_received(self, data: bytes) -> None:
        if self.first is not None:
            self.first += data
        while True:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as upgrade:  # an Upgrade header: not taken up
                data = data[int(upgrade.args[0]):]
                if data:
                    continue
            except httptools.HttpParserError as exc:
                self._parse_error(exc)
            return

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.core.forget(self)
        if self.task is not None:
            self.task.cancel()
        self._wake_drain()
        if self.app is not None:
            self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()
        if self.app is not None:
            self.app.resume_writing()

    # -- llhttp callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url, self.headers, self.head_bytes = b"", [], 0
        if self.app is None:
            self._expect("head", self.limits.head_timeout)

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_URL:
            raise _Refused(414, f"the request target is longer than {MAX_URL} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > MAX_HEAD or len(self.headers) >= MAX_HEADERS:
            raise _Refused(431, f"the request head is larger than {MAX_HEAD} bytes or "
                           f"{MAX_HEADERS} headers")
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        parser = self.parser
        method = parser.get_method().decode("ascii", "replace")
        raw_path = self.url.decode("latin-1")
        native = self.app is None and self.core.native(method, raw_path.partition("?")[0])
        if self.first is not None:
            first, self.first = bytes(self.first), None
            if not native:
                self._hand_over(first)
                raise _HandedOver
        if not native:
            self._pass_head(method, raw_path)
            return
        request = Request(method, raw_path, self.headers, parser.should_keep_alive(),
                          parser.get_http_version() == "1.1", self.limits.max_body,
                          self._write, self._waiting)
        self.parsing = request
        self.queue.append(request)
        self._expect("", 0)
        if len(self.queue) >= self.limits.max_pipelined:
            self._pause_reading()
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._serve())

    def on_body(self, body: bytes) -> None:
        if self.app is not None:
            self._to_app(b"%x\r\n%b\r\n" % (len(body), body) if self._app_chunked else body)
            return
        request = self.parsing
        assert request is not None
        request.feed(body)
        if self.waiting_for == "body":
            self.deadline = time.monotonic() + self.limits.body_timeout

    def on_message_complete(self) -> None:
        if self.lingering:
            self.close()
            return
        if self.app is not None:
            if self._app_chunked:
                self._to_app(b"0\r\n\r\n")
            return
        request = self.parsing
        assert request is not None
        self.parsing = None
        request.finish()

    # -- answering ------------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            while self.queue and not self.closed:
                request = self.queue[0]
                answer = await self.core.handler.serve(
                    request, functools.partial(self._open_stream, request))
                close = self._must_close(request)
                stream = request.stream
                if stream is None:
                    self._write(whole(cast(Whole | web.Response, answer), close=close))
                elif not stream.ended:  # the answer broke off: its end cannot be told
                    close = True
                self.queue.popleft()
                if close:
                    self._close_after(request)
                    return
                if self._read_paused and len(self.queue) < self.limits.max_pipelined:
                    self._resume_reading()
            if self._app_backlog is not None:
                self._flush_to_app()
            elif self.broken is not None:
                self._answer_plain(*self.broken)
            elif not self.queue:
                self._expect("idle", self.limits.idle_timeout)
        except (asyncio.CancelledError, ConnectionResetError):
            return  # the client went away (or the server stops): the relay has recorded it
        except Exception:
            log.exception("error answering a request from %s", self.peer)
            self.close()
        finally:
            self.task = None

    async def _open_stream(self, request: Request, status: int,
                           headers: list[tuple[str, str]]) -> StreamOut:
        close = self._must_close(request) or not request.http11
        self._write(head(status, None, headers, length=None, chunked=request.http11,
                         close=close))
        request.stream = StreamOut(self, request.http11)
        return request.stream

    def _close_after(self, request: Request) -> None:
        """Close once the client has stopped sending this request's body (or it took too
        long), so that it reads the answer rather than a reset."""
        if request is not self.parsing or request.awaits_continue or request.failed \
                or self.closed:
            self.close()
            return
        request.discarding = True
        self.lingering = True
        self._expect("linger", LINGER_SEC)
        self._resume_reading()

    def _must_close(self, request: Request) -> bool:
        return not request.keep_alive or not request.complete or self.core.closing

    # -- the socket -----------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        transport.write(data)

    def write(self, data: bytes) -> None:  # response.Writer
        self._write(data)

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain
        if self.closed:
            raise ConnectionResetError("the client went away")

    def _wake_drain(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- deadlines (checked by the core's watchdog) ---------------------------------------------

    def _expect(self, what: str, within: float) -> None:
        self.waiting_for = what
        self.deadline = time.monotonic() + within if what else 0.0

    def _waiting(self, waiting: bool) -> None:
        """The handler waits for the body (or stops waiting): the body deadline applies."""
        if waiting:
            self._expect("body", self.limits.body_timeout)
        elif self.waiting_for == "body":
            self._expect("", 0)

    def expire(self) -> None:
        """A deadline passed: a body that stopped coming is refused, anything else closed."""
        what = self.waiting_for
        self._expect("", 0)
        if what == "body" and self.queue and self.queue[0].waiting:
            self.queue[0].expire()
        elif what == "linger":
            self.close()
        elif what == "head":
            log.info("request head from %s did not arrive in time", self.peer)
            self._refuse(408, "the request head did not arrive in time")
        elif self.task is None:
            self.close()

    def shutdown(self) -> None:
        """The server stops: close now if idle, else after the answer in progress."""
        if self.task is None and self.parsing is None and self.app is None:
            self.close()

    # -- what is not a request ------------------------------------------------------------------

    def _parse_error(self, exc: httptools.HttpParserError) -> None:
        cause = exc.__context__
        if isinstance(cause, _HandedOver):
            return
        if self.app is not None:  # aiohttp answers this connection: it cannot be told
            self.abort()
            return
        if isinstance(cause, _Refused):
            status, reason = cause.status, cause.reason
        else:
            status, reason = 400, " ".join(str(exc).split()) or type(exc).__name__
        self.core.on_malformed()
        log.info("malformed request from %s: %d %s", self.peer, status, reason[:200])
        request, self.parsing = self.parsing, None
        if request is not None:  # its body is malformed: the handler answers it, in its shape
            request.fail(GatewayError(400, f"malformed request body: {reason}",
                                      code="invalid_request_body"))
            self._pause_reading()
            return
        self._refuse(status, reason)

    def _refuse(self, status: int, reason: str) -> None:
        """Answer a head that cannot be read, after the answers due, and close."""
        self._pause_reading()
        if self.task is None:
            self._answer_plain(status, reason)
        else:
            self.broken = (status, reason)

    def _answer_plain(self, status: int, reason: str) -> None:
        if not self.closed and self.transport is not None and not self.transport.is_closing():
            self.transport.write(plain(status, reason))
        self.close()

    # -- the aiohttp application ----------------------------------------------------------------

    def _hand_over(self, first: bytes) -> None:
        """The whole connection to aiohttp: its protocol takes the socket and what was read."""
        transport = self.transport
        assert transport is not None
        self.core.forget(self)
        self._expect("", 0)
        protocol = self.core.app_protocol()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(first)

    def _pass_head(self, method: str, raw_path: str) -> None:
        """A request for aiohttp mid-connection: rewrite its head for an aiohttp protocol that
        answers the rest of this connection, once the answers due here are out."""
        if self.app is None:
            assert self.transport is not None
            self.core.forget(self)
            self._expect("", 0)
            self.app = self.core.app_protocol()
            self.app.connection_made(self.transport)
            self._app_backlog = [] if self.task is not None else None
        self._app_chunked = is_chunked(self.headers)
        self._to_app(rewritten_head(method, raw_path, self.parser.get_http_version(), self.headers))

    def _to_app(self, data: bytes) -> None:
        if self._app_backlog is not None:
            self._app_backlog.append(data)
        elif self.app is not None:
            self.app.data_received(data)

    def _flush_to_app(self) -> None:
        backlog, self._app_backlog = self._app_backlog or [], None
        if self.app is not None and not self.closed:
            for data in backlog:
                self.app.data_received(data)

