"""What watches a worker's requests, as the settings ask: metrics, the access log, traces.

Each is an observer of the request path (see ``proxy.handler.Observer``). Those switched off
are not built, and OpenTelemetry is not even imported unless traces are on.
"""

from __future__ import annotations

from aiohttp import web

from inference_gateway.metering.meter import Meter
from inference_gateway.observability.access_log import AccessLog
from inference_gateway.observability.metrics import Metrics
from inference_gateway.observability.offload import Offload
from inference_gateway.proxy.handler import Observer
from inference_gateway.proxy.trace_context import Sampler
from inference_gateway.routing.router import Router
from inference_gateway.routing.upkeep import Upkeep
from inference_gateway.settings import ConfigError, Settings
from inference_gateway.tenants.caches import TenantCaches


class Observability:
    def __init__(self, settings: Settings, router: Router, upkeep: Upkeep, meter: Meter,
                 tenants: TenantCaches) -> None:
        self.metrics = Metrics(settings, router, upkeep, meter, tenants) \
            if settings.metrics_enabled else None
        self.observers: list[Observer] = []
        self.threads: list[Offload] = []
        self.trace_sampler: Sampler | None = None  # with traces on: the trace goes on to vLLM
        if self.metrics is not None:
            self.observers.append(self.metrics.requests)
        if settings.access_log == "json":
            access_log = AccessLog()
            self.observers.append(access_log)
            self.threads.append(access_log)
        if settings.otel_traces_exporter == "otlp":
            try:
                from inference_gateway.observability.tracing import Tracing
            except ImportError as exc:
                raise ConfigError("invalid OTEL_TRACES_EXPORTER: otlp needs OpenTelemetry: "
                                  f"pip install 'inference-gateway[otel]' ({exc})") from None
            tracing = Tracing(settings.otel_exporter_otlp_endpoint, settings.otel_service_name)
            self.observers.append(tracing)
            self.threads.append(tracing)
            self.trace_sampler = tracing.sampled

    async def start(self) -> None:
        if self.metrics is not None:
            await self.metrics.start()
        for thread in self.threads:
            thread.start()

    async def close(self) -> None:
        for thread in self.threads:
            thread.close()
        if self.metrics is not None:
            await self.metrics.close()

    async def page(self, request: web.Request) -> web.Response:
        """``GET /metrics``; a 404 with metrics off."""
        if self.metrics is None:
            raise web.HTTPNotFound(text="metrics are off (METRICS_ENABLED=false)\n")
        return await self.metrics.handle(request)
