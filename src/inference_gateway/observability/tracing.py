"""OpenTelemetry traces over OTLP/HTTP: a span for each request and one for its upstream call.

Imported only when ``OTEL_TRACES_EXPORTER=otlp`` (the ``otel`` extra installs the SDK); off, the
gateway neither imports OpenTelemetry nor spends anything on it. The spans are made after the
fact, with the request's own times and the ids the request path gave them (see
``proxy.trace_context``: the upstream request carried its span's id to vLLM), in a thread of
their own (see ``offload``); the SDK's batch processor sends them from another.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from inference_gateway.errors import GatewayError
from inference_gateway.metering.record import UsageRecord
from inference_gateway.observability.catalog import PROVIDER, operation
from inference_gateway.observability.offload import Offload
from inference_gateway.observability.request_metrics import route_of
from inference_gateway.proxy.relay import Outcome
from inference_gateway.proxy.trace_context import TraceIds

NS = 1_000_000_000


def _ns(epoch: float) -> int:
    return int(epoch * NS)


class _GivenIds(RandomIdGenerator):
    """The ids the request path chose, for the spans made next; random ones otherwise."""

    def __init__(self) -> None:
        self.trace_id: int | None = None
        self.span_ids: list[int] = []

    def generate_trace_id(self) -> int:
        return self.trace_id if self.trace_id is not None else super().generate_trace_id()

    def generate_span_id(self) -> int:
        return self.span_ids.pop(0) if self.span_ids else super().generate_span_id()

    def give(self, ids: TraceIds | None) -> None:
        if ids is None:
            self.trace_id, self.span_ids = None, []
        else:
            self.trace_id = int(ids.trace_id, 16)
            self.span_ids = [int(ids.server_id, 16), int(ids.client_id, 16)]


def _parent(ids: TraceIds | None) -> Any:
    """The client's span, as the context of the gateway's request span (None: a new trace)."""
    if ids is None or ids.parent_id is None:
        return None
    flags = TraceFlags(TraceFlags.SAMPLED if ids.sampled else TraceFlags.DEFAULT)
    remote = SpanContext(int(ids.trace_id, 16), int(ids.parent_id, 16), is_remote=True,
                         trace_flags=flags)
    return trace.set_span_in_context(NonRecordingSpan(remote))


class Tracing(Offload):
    """An ``Observer`` whose thread turns finished requests into spans."""

    def __init__(self, endpoint: str, service: str) -> None:
        super().__init__("traces")
        self.ids = _GivenIds()
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}),
                                       id_generator=self.ids)
        url = endpoint.rstrip("/") + "/v1/traces"
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        self.tracer = self.provider.get_tracer("inference_gateway")

    def sampled(self, trace_id: str) -> bool:
        """Whether the sampler (``OTEL_TRACES_SAMPLER``) records a trace the gateway starts:
        vLLM is told the same in the ``traceparent`` it is sent."""
        result = self.provider.sampler.should_sample(None, int(trace_id, 16), "request")
        return result.decision is Decision.RECORD_AND_SAMPLE

    def close(self) -> None:
        super().close()
        self.provider.shutdown()  # sends what is left

    # -- the Observer (request path: one queue put) ---------------------------------------------

    def started(self) -> None:
        return

    def refused(self, path: str, error: GatewayError) -> None:
        self.put((time.time(), path, error.status, error.code))

    def finished(self, record: UsageRecord, outcome: Outcome) -> None:
        self.put((record, outcome.sent_at, outcome.upstream_done_at,
                  time.time() - time.monotonic(), outcome.trace))

    # -- the thread -----------------------------------------------------------------------------

    def handle(self, items: list[tuple[Any, ...]]) -> None:
        for item in items:
            if isinstance(item[0], UsageRecord):
                self._request(*item)
            else:
                self._refused(*item)

    def _refused(self, at: float, path: str, status: int, code: str | None) -> None:
        span = self.tracer.start_span(f"POST {route_of(path)}", kind=SpanKind.SERVER,
                                      start_time=_ns(at), attributes={
                                          "http.route": route_of(path),
                                          "http.response.status_code": status,
                                          "error.type": code or str(status)})
        span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=_ns(at))

    def _request(self, record: UsageRecord, sent: float | None, done: float | None,
                 offset: float, ids: TraceIds | None) -> None:
        self.ids.give(ids)
        try:
            self._spans(record, sent, done, offset, ids)
        finally:
            self.ids.give(None)  # what was not used must not name the next request's spans

    def _spans(self, record: UsageRecord, sent: float | None, done: float | None,
               offset: float, ids: TraceIds | None) -> None:
        route = route_of(record.endpoint)
        op = operation(route)
        common: dict[str, Any] = {
            "gen_ai.operation.name": op, "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": record.requested_model,
            "gen_ai.response.model": record.model,
            "gen_ai.usage.input_tokens": record.prompt_tokens,
            "gen_ai.usage.output_tokens": record.completion_tokens,
        }
        if record.status >= 400:
            common["error.type"] = str(record.status)
        span = self.tracer.start_span(
            f"POST {route}", context=_parent(ids), kind=SpanKind.SERVER,
            start_time=_ns(record.started_at),
            attributes={**common, "http.route": route,
                        "http.response.status_code": record.status,
                        "inference_gateway.request_id": record.request_id,
                        "inference_gateway.organization_id": record.organization_id,
                        "inference_gateway.instance_id": record.instance_id,
                        "inference_gateway.streamed": record.streamed,
                        "inference_gateway.disconnected": record.disconnected})
        if sent is not None:
            end = done if done is not None else record.completed_at - offset
            upstream = self.tracer.start_span(
                f"{op} {record.model}", context=trace.set_span_in_context(span),
                kind=SpanKind.CLIENT, start_time=_ns(sent + offset),
                attributes={**common, "server.address": record.replica or "",
                            "gen_ai.response.id": record.upstream_id or ""})
            if record.status >= 500:
                upstream.set_status(Status(StatusCode.ERROR))
            upstream.end(end_time=_ns(end + offset))
        if record.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=_ns(record.completed_at))
