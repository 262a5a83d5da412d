"""Wires the pieces into one aiohttp application: tenant, payload, routing, relay, metering.

The request path never waits on Postgres: a finished usage record is handed to the meter, which
appends it to the local spool and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import asyncpg
import orjson
from aiohttp import web

from inference_gateway.billing.reporter import start_reporter
from inference_gateway.db.maintenance import run_scheduler
from inference_gateway.db.migrate import pending_migrations
from inference_gateway.metering.meter import Meter
from inference_gateway.metering.record import UsageRecord, new_request_id
from inference_gateway.proxy.errors import GatewayError, error_response
from inference_gateway.proxy.payload import parse, upstream_body
from inference_gateway.proxy.relay import CLIENT_CLOSED, Outcome, Relay
from inference_gateway.proxy.sse import StreamFilter
from inference_gateway.routing.router import Router
from inference_gateway.settings import Settings
from inference_gateway.tenants.caches import TenantCaches
from inference_gateway.tenants.identity import Tenant

log = logging.getLogger(__name__)

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "X-Request-Id",
}
PREFLIGHT_HEADERS = {
    **CORS_HEADERS,
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "*",
    "Access-Control-Max-Age": "86400",
}
READINESS_INTERVAL_SEC = 2.0


class Gateway:
    """Per-process state shared by the handlers."""

    def __init__(self, settings: Settings, meter: Meter | None = None) -> None:
        self.settings = settings
        self.router = Router(settings.model_service_port_map, settings.model_rewrites)
        self.meter = meter or Meter(settings)
        self.tenants = TenantCaches(settings)
        self.relay: Relay | None = None
        self.ready = False
        self.started = int(time.time())
        self._models_body = orjson.dumps(
            {
                "object": "list",
                "data": [self._model(name) for name in self.router.model_ids()],
            }
        )

    def _model(self, name: str) -> dict[str, object]:
        route = self.router.resolve(name)
        model: dict[str, object] = {
            "id": name, "object": "model", "created": self.started, "owned_by": "inference-gateway",
        }
        if route is not None and route.served_model != name:
            model["root"] = route.served_model
        return model

    def identify(self, request: web.Request) -> Tenant:
        """The request's tenant, from in-memory caches only (see ``tenancy``)."""
        return self.tenants.identify(request.headers)

    # -- handlers -------------------------------------------------------------------------------

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        t0 = time.monotonic()
        started_at = time.time()
        request_id = new_request_id()
        headers = {"X-Request-Id": request_id, **CORS_HEADERS}
        try:
            tenant = self.identify(request)
            if not self.meter.accepting():
                raise GatewayError(503, "usage metering is unavailable (spool full); retry later",
                                   code="metering_unavailable")
            raw = await self._read_body(request)
            payload = parse(raw)
            route = self.router.resolve(payload.model)
            if route is None:
                raise GatewayError(404, f"The model `{payload.model}` does not exist.",
                                   param="model", code="model_not_found")
        except GatewayError as exc:
            return exc.response(headers)
        assert self.relay is not None
        body = upstream_body(raw, payload, route.served_model)
        stream_filter = (
            # vLLM ignores continuous_usage_stats without include_usage, and so does the filter.
            StreamFilter(payload.client_usage,
                         payload.client_usage and payload.client_continuous_usage)
            if payload.stream else None
        )
        outcome = Outcome()
        metered = False

        def finish() -> None:
            nonlocal metered
            if metered:
                return
            metered = True
            usage = outcome.usage
            self.meter.submit(
                UsageRecord(
                    request_id=request_id,
                    organization_id=tenant.organization_id,
                    instance_id=tenant.instance_id,
                    model=route.served_model,
                    requested_model=payload.model,
                    endpoint=request.path,
                    prompt_tokens=usage.prompt_tokens if usage else 0,
                    completion_tokens=usage.completion_tokens if usage else 0,
                    status=outcome.status or CLIENT_CLOSED,
                    streamed=payload.stream,
                    disconnected=outcome.disconnected,
                    duration_ms=int((time.monotonic() - t0) * 1000),
                    ttfb_ms=(
                        None if outcome.first_byte_at is None
                        else int((outcome.first_byte_at - t0) * 1000)
                    ),
                    started_at=started_at,
                    completed_at=time.time(),
                )
            )

        try:
            return await self.relay.forward(
                request, route.upstream, body, outcome, headers, stream_filter,
                finish,
            )
        except asyncio.CancelledError:
            outcome.disconnected = True  # the client went away; the relay closed the upstream
            raise
        finally:
            finish()  # errors and disconnects are metered too

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.settings.max_request_body_bytes
        too_large = GatewayError(413, f"request body is larger than {limit} bytes",
                                 code="request_too_large")
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large from None

    async def models(self, request: web.Request) -> web.Response:
        return web.Response(body=self._models_body, content_type="application/json",
                            headers=CORS_HEADERS)

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if self.router.resolve(name) is None:
            return error_response(404, f"The model `{name}` does not exist.", param="model",
                                  code="model_not_found", headers=CORS_HEADERS)
        return web.Response(body=orjson.dumps(self._model(name)),
                            content_type="application/json", headers=CORS_HEADERS)

    async def ready_probe(self, request: web.Request) -> web.Response:
        if self.ready:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    async def lively(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=PREFLIGHT_HEADERS)

    async def not_found(self, request: web.Request) -> web.Response:
        return error_response(404, f"Unknown endpoint: {request.method} {request.path}",
                              code="unknown_url", headers=CORS_HEADERS)

    # -- background -----------------------------------------------------------------------------

    async def _watch_readiness(self) -> None:
        """Ready once Postgres answers and every migration is applied; re-checked periodically."""
        conn: asyncpg.Connection | None = None
        while True:
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(self.settings.database_url, timeout=5)
                missing = await pending_migrations(conn)
                if missing and self.ready:
                    log.error("not ready: migrations not applied: %s",
                              ", ".join(m.version for m in missing))
                self.ready = not missing
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                if self.ready:
                    log.warning("not ready: Postgres unreachable: %s", exc)
                self.ready = False
                if conn is not None:
                    conn.terminate()
                    conn = None
            await asyncio.sleep(READINESS_INTERVAL_SEC)

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        settings = self.settings
        reporter = start_reporter(settings)  # first: it rejects incomplete sink settings
        self.relay = Relay(self.router.upstreams(), settings.upstream_connect_timeout_sec,
                           settings.upstream_timeout_sec, settings.upstream_max_connections)
        await self.meter.start()
        await self.tenants.start()
        readiness = asyncio.create_task(self._watch_readiness(), name="readiness")
        scheduler = None
        if settings.run_maintenance_scheduler:
            # One process holds the scheduler lock; it stands by while pg_cron is in charge.
            scheduler = asyncio.create_task(run_scheduler(settings), name="maintenance")
        try:
            yield
        finally:
            for task in (readiness, reporter, scheduler):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await self.tenants.close()
            self.relay.close()
            await self.meter.close()


def create_app(settings: Settings, meter: Meter | None = None) -> web.Application:
    gateway = Gateway(settings, meter)
    app = web.Application(client_max_size=settings.max_request_body_bytes)
    app[GATEWAY] = gateway
    app.cleanup_ctx.append(gateway.lifespan)
    app.router.add_post("/v1/{tail:.+}", gateway.proxy)
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_get("/v1/models/{name:.+}", gateway.model)
    app.router.add_get("/ready", gateway.ready_probe)
    app.router.add_get("/lively", gateway.lively)
    app.router.add_route("OPTIONS", "/{tail:.*}", gateway.preflight)
    app.router.add_route("*", "/{tail:.*}", gateway.not_found)
    return app


GATEWAY = web.AppKey("gateway", Gateway)
