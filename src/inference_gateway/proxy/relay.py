"""Moves bytes between the client and the model server, and reports what it saw, once.

The relay knows nothing of tenants or databases. It fills one ``Outcome`` (status, usage,
timings, whether the client went away, the replica that answered) and hands it to the caller's
callback exactly once: before the client has the last byte of a complete answer, or as the
request ends in any other way (an error, the client hanging up, the task being cancelled).

It is given the replicas to try, best first. A request that failed before any byte came back
(the connection refused or reset, or a 503) is sent once more, to the next replica: nothing
was generated, so nothing is generated or billed twice. Each replica hears how its request
ended, which is how the router ejects one that fails.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from inference_gateway.errors import Dialect, error_body, from_framework
from inference_gateway.metering.readers import Shape, Usage, read_id, read_usage
from inference_gateway.proxy.event_streams import EventStream
from inference_gateway.proxy.sse import StreamFilter
from inference_gateway.proxy.trace_context import TraceIds
from inference_gateway.proxy.upstream import Pool, Response, UpstreamError, UpstreamTimeout

REQUEST_HEADERS = [("Content-Type", "application/json"), ("Accept-Encoding", "identity")]
CLIENT_CLOSED = 499  # as nginx logs a request whose client went away before the answer

StreamReader = StreamFilter | EventStream
# What finishing a request started that its answer's last bytes wait for (its rate limits
# settling), so that a client that sends its next request on the last byte finds it done.
Pending = asyncio.Future[None] | None
RETRY_STATUSES = frozenset({503})  # a replica that is busy or draining: another may serve


class Stream(Protocol):
    """Where a streamed answer goes: aiohttp's ``StreamResponse``, or the server core's.

    A write to a client that went away raises ``ConnectionResetError``.
    """

    async def write(self, data: bytes) -> None: ...

    async def write_eof(self, data: bytes = b"") -> None: ...


# Starts a streamed answer to the client: status and headers, then the Stream for its body.
OpenStream = Callable[[int, list[tuple[str, str]]], Awaitable[Stream]]


@dataclass(slots=True)
class Whole:
    """A whole answer from the model server. The server core writes it as it is; aiohttp is
    given a ``web.Response`` made from it (making one costs about 3 us a request)."""

    status: int
    reason: str
    headers: list[tuple[str, str]]  # the hop-by-hop ones already left out
    body: bytes

    def for_aiohttp(self) -> web.Response:
        return web.Response(status=self.status, reason=self.reason or None, body=self.body,
                            headers=self.headers)


# What the relay answers with: a whole response (the model server's, or the gateway's own
# error), or the stream it has written and ended.
Answer = Whole | web.Response | Stream


async def aiohttp_stream(request: web.Request, status: int,
                         headers: list[tuple[str, str]]) -> web.StreamResponse:
    """``OpenStream`` for an aiohttp request."""
    response = web.StreamResponse(status=status, headers=headers)
    await response.prepare(request)
    return response


class Target(Protocol):
    """A replica to send to; it hears when a request starts and how it ended."""

    url: str

    def start(self) -> None: ...

    def finish(self, failure: str | None) -> None: ...


@dataclass(slots=True)  # never changed once made; not frozen: 1.4 us to make, plain 0.2
class Exchange:
    """One request to forward, as the handler prepared it."""

    method: str
    targets: Sequence[Target]  # the replicas to try, best first (one retry at most)
    path: str  # path and query string
    body: bytes
    shape: Shape  # how usage reads in the answer
    bills: bool  # whether the answer's usage is billed
    dialect: Dialect  # how the gateway's own errors read
    reader: StreamReader | None  # prepared for a stream the client asked for
    headers: list[tuple[str, str]] | None = None  # for the upstream; None: REQUEST_HEADERS


@dataclass(slots=True)
class Outcome:
    """What one relayed request looked like from the gateway."""

    status: int = 0
    usage: Usage | None = None
    final: bool = False  # usage is the answer's own count, not what was relayed so far
    disconnected: bool = False
    sent_at: float | None = None  # monotonic: the request was handed to the replica
    first_byte_at: float | None = None  # the upstream's answer began
    first_chunk_at: float | None = None  # a stream's first bytes were written to the client
    upstream_done_at: float | None = None  # the upstream's answer ended
    upstream_id: str | None = None
    reader: StreamReader | None = None  # of a streamed answer: what was relayed
    replica: str | None = None  # the replica that answered (or was tried last)
    choices: int = 1  # the request's n: vLLM counts the prompt once for each
    trace: TraceIds | None = None  # its spans' ids, with traces on


def _copy_headers(upstream: Response, extra: dict[str, str]) -> list[tuple[str, str]]:
    return [*upstream.end_to_end, *extra.items()]


def _failure(exc: UpstreamError) -> tuple[int, str, str]:
    if isinstance(exc, UpstreamTimeout):
        return 504, "the model server did not answer in time", "upstream_timeout"
    return 502, f"the model server could not be reached: {exc}", "upstream_unreachable"


async def _wait(pending: Pending) -> None:
    if pending is not None:
        await asyncio.wait({pending})  # never raises what it raised: that is logged there


def _passthrough(shape: Shape) -> StreamReader:
    """A reader for a stream nobody prepared for: relays every byte, reads what usage it can."""
    return StreamFilter(True, True) if shape == "openai" else EventStream(shape)


class Relay:
    """One pool of keep-alive connections per model server, shared by a process's requests."""

    def __init__(self, connect_timeout: float, read_timeout: float,
                 max_idle: int = 1000) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_idle = max_idle
        self.pools: dict[str, Pool] = {}
        # What each server appends to a stream's usage chunk (see StreamFilter's trailer).
        self.trailers: dict[str, bytes] = {}

    def pool(self, url: str) -> Pool:
        """The keep-alive connections to one replica, opened on first use."""
        pool = self.pools.get(url)
        if pool is None:
            pool = self.pools[url] = Pool(url, self._connect_timeout, self._read_timeout,
                                          self._max_idle)
        return pool

    def retire(self, url: str) -> None:
        """A replica is gone for good: close its connections."""
        pool = self.pools.pop(url, None)
        if pool is not None:
            pool.close()
        self.trailers.pop(url, None)

    async def fetch(self, url: str, path: str, within: float) -> tuple[int, bytes]:
        """A GET for the router's probes (``/health``, ``/metrics``); raises when unreachable."""
        try:
            async with asyncio.timeout(within):
                answer = await self.pool(url).request("GET", path, b"", [])
                return answer.status, await answer.read()
        except UpstreamError as exc:
            raise OSError(str(exc)) from None

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    async def forward(self, open_stream: OpenStream, exchange: Exchange,
                      response_headers: dict[str, str],
                      done: Callable[[Outcome], Pending]) -> Answer:
        """Send the exchange upstream and relay the answer; ``done`` gets the outcome once,
        and what it returns is waited for before the answer's last bytes go out."""
        outcome = Outcome()
        reported = False
        serving: list[tuple[Target, str | None]] = []  # the replica answering, how it failed

        def report() -> Pending:
            nonlocal reported
            if reported:
                return None
            reported = True
            for target, failure in serving:
                target.finish(failure)
            reader = outcome.reader
            if reader is not None:
                outcome.upstream_id = reader.upstream_id
                if exchange.bills and not outcome.disconnected:
                    outcome.usage, outcome.final = reader.usage, reader.final
            return done(outcome)

        try:
            return await self._forward(open_stream, exchange, outcome, response_headers,
                                       report, serving)
        except asyncio.CancelledError:
            outcome.disconnected = True  # the client went away; the upstream was closed
            raise
        finally:
            report()

    async def _send(self, exchange: Exchange, outcome: Outcome,
                    serving: list[tuple[Target, str | None]]) -> Response | UpstreamError:
        """The answer's head from the first replica that gives one (trying two at most)."""
        targets = exchange.targets[:2]
        for i, target in enumerate(targets):
            last = i == len(targets) - 1
            target.start()
            serving[:] = [(target, None)]
            outcome.replica = target.url
            outcome.sent_at = time.monotonic()
            try:
                answer = await self.pool(target.url).request(
                    exchange.method, exchange.path, exchange.body,
                    exchange.headers or REQUEST_HEADERS)
            except UpstreamTimeout as timeout:  # it may be generating: never sent again
                return timeout
            except UpstreamError as exc:  # refused or reset before any byte: safe to resend
                serving[:] = [(target, "unreachable")]
                if last:
                    return exc
                serving.clear()
                target.finish("unreachable")
                continue
            if answer.status >= 500:
                serving[:] = [(target, f"status {answer.status}")]
                if answer.status in RETRY_STATUSES and not last:
                    answer.release()
                    serving.clear()
                    target.finish(f"status {answer.status}")
                    continue
            return answer
        raise AssertionError("no replica to send to")  # the handler checks there is one

    async def _forward(self, open_stream: OpenStream, exchange: Exchange, outcome: Outcome,
                       response_headers: dict[str, str], report: Callable[[], Pending],
                       serving: list[tuple[Target, str | None]]) -> Answer:
        sent = await self._send(exchange, outcome, serving)
        if isinstance(sent, UpstreamError):
            return self._error(sent, exchange, outcome, response_headers)
        answer = sent
        outcome.first_byte_at = time.monotonic()
        try:
            if answer.status == 200 and answer.content_type == "text/event-stream":
                reader = exchange.reader or _passthrough(exchange.shape)
                outcome.reader = reader
                return await self._stream(open_stream, answer, exchange, reader, outcome,
                                          response_headers, report)
            try:
                data = await answer.read()
            except UpstreamError as exc:
                return self._error(exc, exchange, outcome, response_headers)
            outcome.upstream_done_at = time.monotonic()
            outcome.status = answer.status
            if answer.status < 300:
                if exchange.bills:
                    outcome.usage = read_usage(data, exchange.shape)
                    outcome.final = outcome.usage is not None
                outcome.upstream_id = read_id(data)
            elif answer.status >= 400:
                data = from_framework(answer.status, data, exchange.dialect) or data
            await _wait(report())  # the response is sent after the handler returns
            return Whole(answer.status, answer.reason, _copy_headers(answer, response_headers),
                         data)
        finally:
            # After a whole body this returns the connection to the pool; on any early exit
            # (client gone, error) it closes it, which makes vLLM abort the generation.
            answer.release()

    @staticmethod
    def _error(exc: UpstreamError, exchange: Exchange, outcome: Outcome,
               headers: dict[str, str]) -> web.Response:
        status, message, code = _failure(exc)
        outcome.status = status
        return web.Response(status=status, content_type="application/json", headers=headers,
                            body=error_body(status, message, code=code,
                                            dialect=exchange.dialect))

    async def _stream(self, open_stream: OpenStream, answer: Response, exchange: Exchange,
                      reader: StreamReader, outcome: Outcome,
                      response_headers: dict[str, str],
                      report: Callable[[], Pending]) -> Stream | web.Response:
        outcome.status = answer.status
        upstream = outcome.replica or ""
        if isinstance(reader, StreamFilter):
            reader.trailer = self.trailers.get(upstream)
        response: Stream | web.Response = web.Response(status=answer.status)  # if never opened
        try:
            response = await open_stream(answer.status, _copy_headers(answer, response_headers))
            try:
                async for chunk in answer.iter_chunks():
                    out = reader.feed(chunk)
                    if out:
                        if outcome.first_chunk_at is None:
                            outcome.first_chunk_at = time.monotonic()
                        await response.write(out)
                        if exchange.bills:  # what the client was sent, should it go away
                            outcome.usage = reader.usage
            except UpstreamError as exc:
                # The model server broke off mid-stream: tell the client in-band, as vLLM does.
                status, message, code = _failure(exc)
                outcome.status = status
                await response.write(reader.finish() + reader.error_event(message, code))
                await _wait(report())
                await response.write_eof()
                return response
            outcome.upstream_done_at = time.monotonic()
            rest = reader.finish()
            if rest:
                await response.write(rest)
            await _wait(report())
            await response.write_eof(reader.tail())
        except ConnectionResetError:
            # The client went away: the reader holds what it was sent.
            outcome.disconnected = True
        finally:
            if isinstance(reader, StreamFilter) and reader.learned is not None:
                self.trailers[upstream] = reader.learned
        return response
