"""The ``/v1`` handler: tenant, endpoint, payload, route, relay, and the usage record at the end.

The request path never waits on Postgres: the finished record is handed to the meter, which
appends it to the local spool. Only a stream that ended before its usage arrived (the client
went away) waits for the model server to count what was relayed, in a task of its own, after
the client is gone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, cast

import orjson
from aiohttp import web
from multidict import istr

from inference_gateway.admission.gate import Admission, Ticket
from inference_gateway.errors import GatewayError
from inference_gateway.metering.meter import Meter
from inference_gateway.metering.readers import Usage
from inference_gateway.metering.record import UsageRecord, new_request_id
from inference_gateway.proxy import tokenize, trace_context
from inference_gateway.proxy.endpoints import (
    Endpoint,
    EndpointTable,
    dialect_of,
    is_normal,
    not_normal,
)
from inference_gateway.proxy.event_streams import EventStream
from inference_gateway.proxy.payload import Caps, Payload, choices, parse, upstream_body
from inference_gateway.proxy.relay import (
    CLIENT_CLOSED,
    REQUEST_HEADERS,
    Answer,
    Exchange,
    OpenStream,
    Outcome,
    Pending,
    Relay,
    Whole,
    aiohttp_stream,
)
from inference_gateway.proxy.sse import StreamFilter
from inference_gateway.proxy.stored_responses import Owner, StoredResponses, not_found
from inference_gateway.proxy.trace_context import TraceIds
from inference_gateway.routing.replicas import Replica
from inference_gateway.routing.router import Router
from inference_gateway.tenants.caches import TenantCaches
from inference_gateway.tenants.tenant import Tenant

log = logging.getLogger(__name__)

# Header names as ``istr``: aiohttp's header map takes them without working out their case.
REQUEST_ID: str = istr("X-Request-Id")
CORS_HEADERS: dict[str, str] = {
    istr("Access-Control-Allow-Origin"): "*",
    istr("Access-Control-Expose-Headers"): "X-Request-Id",
}


@dataclass(slots=True)  # never changed once made; not frozen: 1.8 us to make, plain 0.25
class Context:
    """What the usage record needs to know besides the outcome."""

    request_id: str
    tenant: Tenant
    served_model: str
    requested_model: str
    endpoint: str
    streamed: bool
    bills: bool
    started: float  # monotonic
    started_at: float  # epoch
    payload: Payload | None
    ticket: Ticket | None  # what it reserved against its limits
    trace: TraceIds | None  # its spans' ids, with traces on


class Incoming(Protocol):
    """What the handler reads of a request: aiohttp's, or the server core's."""

    @property
    def method(self) -> str: ...

    @property
    def path(self) -> str: ...  # decoded, without the query

    @property
    def raw_path(self) -> str: ...  # as sent, with the query

    @property
    def headers(self) -> Mapping[str, str]: ...  # looked up case-insensitively

    @property
    def content_length(self) -> int | None: ...

    async def read(self) -> bytes: ...


class Observer(Protocol):
    """What watches requests go by (metrics, logs): told of each one, never consulted.

    Called on the request path, so an observer only counts: no I/O, nothing that waits.
    """

    def started(self) -> None: ...

    def refused(self, path: str, error: GatewayError) -> None: ...

    def finished(self, record: UsageRecord, outcome: Outcome) -> None: ...


class ProxyHandler:
    """Forwards the allow-listed ``/v1`` endpoints and meters each request once."""

    def __init__(self, endpoints: EndpointTable, router: Router, tenants: TenantCaches,
                 meter: Meter, relay: Relay, stored: StoredResponses, caps: Caps,
                 max_body_bytes: int, affinity_chars: int = 0,
                 observers: Sequence[Observer] = (), admission: Admission | None = None,
                 traced: trace_context.Sampler | None = None) -> None:
        self.endpoints = endpoints
        self.router = router
        self.tenants = tenants
        self.meter = meter
        self.relay = relay
        self.stored = stored
        self.caps = caps
        self.max_body_bytes = max_body_bytes
        self.affinity_chars = affinity_chars
        self.observers = tuple(observers)
        self.admission = admission
        self.traced = traced  # with traces on: hand the trace on to the model server
        self._estimates: set[asyncio.Task[None]] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The aiohttp route."""
        answer = await self.serve(request, functools.partial(aiohttp_stream, request))
        if isinstance(answer, Whole):
            return answer.for_aiohttp()
        return cast(web.StreamResponse, answer)  # a stream it opened is aiohttp's own

    async def serve(self, request: Incoming, open_stream: OpenStream) -> Answer:
        """Answer one ``/v1`` request, whichever server read it."""
        started, started_at = time.monotonic(), time.time()
        request_id = new_request_id()
        headers = {REQUEST_ID: request_id, **CORS_HEADERS}
        dialect = dialect_of(request.path)
        for observer in self.observers:
            observer.started()
        try:
            exchange, context = await self._prepare(request, request_id, started, started_at)
        except GatewayError as exc:
            for observer in self.observers:
                observer.refused(request.path, exc)
            return exc.response(headers, dialect)
        except (asyncio.CancelledError, ConnectionError):  # the client left while it was read
            gone = GatewayError(CLIENT_CLOSED, "the client went away", code="client_closed")
            for observer in self.observers:
                observer.refused(request.path, gone)
            raise
        if context.ticket is not None:
            headers.update(context.ticket.headers)

        def done(outcome: Outcome) -> Pending:
            return self._finish(context, outcome)

        return await self.relay.forward(open_stream, exchange, headers, done)

    async def drain(self) -> None:
        """Wait for the records still being counted (at shutdown, before the meter closes)."""
        if self._estimates:
            await asyncio.gather(*self._estimates, return_exceptions=True)

    # -- before forwarding ----------------------------------------------------------------------

    async def _prepare(self, request: Incoming, request_id: str, started: float,
                       started_at: float) -> tuple[Exchange, Context]:
        if not is_normal(request.raw_path):
            raise not_normal()
        match = self.endpoints.match(request.method, request.path)
        if match is None:
            raise GatewayError(404, f"Unknown endpoint: {request.method} {request.path}",
                               code="unknown_url")
        endpoint, response_id = match
        tenant = self.tenants.identify(request.headers)
        if not self.meter.accepting():
            raise GatewayError(503, "usage metering is unavailable (spool full); retry later",
                               code="metering_unavailable")
        path = request.path
        query = request.raw_path.partition("?")[2]
        targets: list[Replica]
        if response_id is not None:
            owner = await self._owned(response_id, tenant, "response_id")
            served = requested = owner.model
            targets = [self._holder(owner, response_id)]
            body = await self._read_body(request) if request.method == "POST" else b""
            payload = None
        else:
            raw = await self._read_body(request)
            payload = parse(raw, endpoint, self.caps)
            route = self.router.resolve(payload.model)
            if route is None:
                raise GatewayError(404, f"The model `{payload.model}` does not exist.",
                                   param="model", code="model_not_found")
            served, requested = route.served_model, payload.model
            if payload.previous_response_id is not None:
                owner = await self._owned(payload.previous_response_id, tenant,
                                          "previous_response_id")
                targets = [self._holder(owner, payload.previous_response_id)]
            else:
                targets = route.replicas.candidates(self._affinity(payload))
                if not targets:
                    raise GatewayError(503, f"no server of the model `{served}` is available "
                                       "right now; retry later", code="model_unavailable")
            body = upstream_body(raw, endpoint, payload, served)
        ticket = None
        if payload is not None and self.admission is not None:  # the last step before sending
            ticket = await self.admission.admit(tenant, served, payload.fields, len(body),
                                                endpoint.generates)
        streamed = payload is not None and payload.stream
        trace = None if self.traced is None else trace_context.start(request.headers,
                                                                     self.traced)
        exchange = Exchange(
            method=request.method, targets=targets, path=f"{path}?{query}" if query else path,
            body=body, shape=endpoint.shape, bills=endpoint.bills, dialect=endpoint.dialect,
            reader=self._reader(endpoint, payload) if streamed else None,
            headers=None if trace is None else trace_context.upstream_headers(
                REQUEST_HEADERS, trace, request.headers),
        )
        context = Context(request_id, tenant, served, requested, path, streamed,
                          endpoint.bills, started, started_at, payload, ticket, trace)
        return exchange, context

    def _affinity(self, payload: Payload) -> bytes | None:
        """The prompt's first characters, to send requests that share them to one replica."""
        if not self.affinity_chars:
            return None
        fields = payload.fields
        prompt = fields.get("messages") or fields.get("input") or fields.get("prompt")
        return orjson.dumps(prompt)[:self.affinity_chars] if prompt else None

    async def _read_body(self, request: Incoming) -> bytes:
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise self._too_large()
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise self._too_large() from None

    def _too_large(self) -> GatewayError:
        return GatewayError(413, f"request body is larger than {self.max_body_bytes} bytes",
                            code="request_too_large")

    async def _owned(self, response_id: str, tenant: Tenant, param: str) -> Owner:
        owner = await self.stored.owner(response_id)
        if owner is None or owner.tenant != tenant:
            raise not_found(response_id, param)
        return owner

    def _holder(self, owner: Owner, response_id: str) -> Replica:
        """The replica that holds a stored response: only it has it."""
        replica = self.router.find(owner.replica) if owner.replica else None
        if replica is None or replica.draining:
            raise not_found(response_id, "response_id")  # its server is gone, and it with it
        if not replica.available(time.monotonic()):
            raise GatewayError(503, "the server that holds this response is not available "
                               "right now; retry later", code="model_unavailable")
        return replica

    @staticmethod
    def _reader(endpoint: Endpoint, payload: Payload | None) -> StreamFilter | EventStream:
        if endpoint.shape != "openai":
            return EventStream(endpoint.shape)
        assert payload is not None
        # vLLM ignores continuous_usage_stats without include_usage, and so does the filter.
        return StreamFilter(payload.client_usage,
                            payload.client_usage and payload.client_continuous_usage)

    # -- after the answer -----------------------------------------------------------------------

    def _finish(self, context: Context, outcome: Outcome) -> Pending:
        if self.observers and context.payload is not None:
            outcome.choices = choices(context.payload.fields)
        outcome.trace = context.trace
        record = self._record(context, outcome)
        reader = outcome.reader
        if context.endpoint == "/v1/responses" and record.upstream_id and record.status == 200:
            self.stored.remember(record.upstream_id, Owner(context.tenant, context.served_model,
                                                          outcome.replica))
        if isinstance(reader, EventStream) and context.bills and not outcome.final:
            task = asyncio.get_running_loop().create_task(
                self._estimate(record, reader, context, outcome))
            self._estimates.add(task)
            task.add_done_callback(self._estimates.discard)
            return None
        return self._submit(record, outcome, context.ticket)

    def _submit(self, record: UsageRecord, outcome: Outcome, ticket: Ticket | None) -> Pending:
        """The finished record: to the spool first (it must not be lost), then the limits
        settle its reservation and the observers hear of it."""
        self.meter.submit(record)
        settling = None
        if ticket is not None and self.admission is not None:
            try:
                settling = self.admission.settle(ticket, record)
            except Exception:  # a bug there must not cost the client an answer it was metered
                log.exception("rate limits: a reservation could not be settled")
        for observer in self.observers:
            observer.finished(record, outcome)
        return settling

    @staticmethod
    def _record(context: Context, outcome: Outcome) -> UsageRecord:
        usage = outcome.usage or Usage(0, 0)
        return UsageRecord(
            request_id=context.request_id,
            organization_id=context.tenant.organization_id,
            instance_id=context.tenant.instance_id,
            model=context.served_model,
            requested_model=context.requested_model,
            endpoint=context.endpoint,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            status=outcome.status or CLIENT_CLOSED,
            streamed=context.streamed,
            disconnected=outcome.disconnected,
            duration_ms=int((time.monotonic() - context.started) * 1000),
            ttfb_ms=(None if outcome.first_byte_at is None
                     else int((outcome.first_byte_at - context.started) * 1000)),
            started_at=context.started_at,
            completed_at=time.time(),
            cached_tokens=usage.cached_tokens,
            upstream_id=outcome.upstream_id,
            replica=outcome.replica,
            api_key_id=context.tenant.key_id,
        )

    async def _estimate(self, record: UsageRecord, reader: EventStream, context: Context,
                        outcome: Outcome) -> None:
        """Bill a stream that ended without its usage for what it relayed (see ``tokenize``)."""
        pool = self.relay.pool(outcome.replica or "")
        prompt: int | None = record.prompt_tokens
        if reader.usage is None and context.payload is not None:  # a Responses stream
            prompt = await tokenize.count_messages(
                pool, context.served_model, tokenize.responses_messages(context.payload.fields))
        counted = await tokenize.count_text(pool, context.served_model, reader.relayed_text())
        if prompt is None or counted is None:
            log.warning("request %s: billed %d relayed events as tokens; the model server "
                        "could not count them", record.request_id, reader.deltas)
        self._submit(replace(record, prompt_tokens=prompt or record.prompt_tokens,
                             completion_tokens=tokenize.relayed_tokens(
                                 reader.deltas, reader.most_tokens, counted,
                                 context.payload.fields if context.payload else None)),
                     outcome, context.ticket)
