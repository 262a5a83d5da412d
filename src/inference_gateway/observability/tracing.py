"""OpenTelemetry traces over OTLP/HTTP: a span for each request and one for its upstream call.

Imported only when ``OTEL_TRACES_EXPORTER=otlp`` (the ``otel`` extra installs the SDK); off, the
gateway neither imports OpenTelemetry nor spends anything on it. The spans are made after the
fact, with the request's own times, in a thread of their own (see ``offload``); the SDK's batch
processor sends them from another.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from inference_gateway.errors import GatewayError
from inference_gateway.metering.record import UsageRecord
from inference_gateway.observability.catalog import PROVIDER, operation
from inference_gateway.observability.offload import Offload
from inference_gateway.observability.request_metrics import route_of
from inference_gateway.proxy.relay import Outcome

NS = 1_000_000_000


def _ns(epoch: float) -> int:
    return int(epoch * NS)


class Tracing(Offload):
    """An ``Observer`` whose thread turns finished requests into spans."""

    def __init__(self, endpoint: str, service: str) -> None:
        super().__init__("traces")
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        url = endpoint.rstrip("/") + "/v1/traces"
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        self.tracer = self.provider.get_tracer("inference_gateway")

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
                  time.time() - time.monotonic()))

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
                 offset: float) -> None:
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
            f"POST {route}", kind=SpanKind.SERVER, start_time=_ns(record.started_at),
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
