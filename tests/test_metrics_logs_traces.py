"""The JSON access log and the OTLP traces of a real gateway process.

The traces go to an OTLP/HTTP receiver run by the test, which decodes them with the protocol's
own message types, as a collector would.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import requests
from aiohttp import web

from harness import Proc, free_port, start_gateway

pb = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
MODEL = "facebook/opt-125m"


class Receiver:
    """An OTLP/HTTP endpoint on a thread of its own, keeping every span it is sent."""

    def __init__(self) -> None:
        self.port = free_port()
        self.spans: list[object] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    async def _traces(self, request: web.Request) -> web.Response:
        message = pb.ExportTraceServiceRequest.FromString(await request.read())
        for resource in message.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        return web.Response(body=pb.ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture
def traced(tmp_path: Path, database_url: str, simulator: Proc) -> Iterator[tuple[Proc, Receiver]]:
    receiver = Receiver()
    gateway = start_gateway(tmp_path, database_url, simulator.url, ACCESS_LOG="json",
                            OTEL_TRACES_EXPORTER="otlp",
                            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}")
    try:
        yield gateway, receiver
    finally:
        gateway.stop()
        receiver.close()


def test_each_request_is_a_log_line_and_a_trace(traced: tuple[Proc, Receiver]) -> None:
    gateway, receiver = traced
    tag = uuid.uuid4().hex[:8]
    headers = {"X-TEMBO-ORG": f"org-{tag}", "X-TEMBO-INSTANCE": f"inst-{tag}"}
    chat = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    ids = []
    for body in (chat, {**chat, "stream": True}):
        resp = requests.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers,
                             timeout=10)
        assert resp.status_code == 200
        ids.append(resp.headers["X-Request-Id"])
    refused = requests.post(f"{gateway.url}/v1/chat/completions", headers=headers, timeout=10,
                            json={**chat, "model": "no-such-model"})
    assert refused.status_code == 404
    assert gateway.stop() == 0  # sends what the exporter still holds

    lines = [orjson.loads(line) for line in gateway.log.read_text().splitlines()
             if line.startswith("{")]
    mine = {line["request_id"]: line for line in lines if line.get("request_id") in ids}
    assert set(mine) == set(ids)
    plain, stream = mine[ids[0]], mine[ids[1]]
    assert plain["organization_id"] == f"org-{tag}" and plain["instance_id"] == f"inst-{tag}"
    assert plain["model"] == MODEL and plain["status"] == 200
    assert plain["completion_tokens"] == 5 and plain["prompt_tokens"] > 0
    assert plain["duration_ms"] >= plain["upstream_ms"] > 0 and plain["ttft_ms"] is None
    assert stream["streamed"] and 0 < stream["ttft_ms"] <= stream["duration_ms"]
    assert any(line["kind"] == "refused" and line["status"] == 404 for line in lines)

    attrs = {span.span_id: _attributes(span) for span in receiver.spans}
    by_id = {attrs[s.span_id]["inference_gateway.request_id"]: s for s in receiver.spans
             if "inference_gateway.request_id" in attrs[s.span_id]}
    assert set(ids) <= set(by_id)
    for request_id in ids:
        server = by_id[request_id]
        assert server.name == "POST /v1/chat/completions" and server.kind == 2  # SERVER
        (client,) = [s for s in receiver.spans if s.parent_span_id == server.span_id]
        assert client.name == f"chat {MODEL}" and client.kind == 3  # CLIENT
        assert client.trace_id == server.trace_id
        assert server.start_time_unix_nano <= client.start_time_unix_nano
        assert client.end_time_unix_nano <= server.end_time_unix_nano
        assert attrs[server.span_id]["gen_ai.usage.output_tokens"] == 5
        assert str(attrs[client.span_id]["server.address"]).startswith("http://127.0.0.1:")


def _attributes(span: object) -> dict[str, object]:
    values: dict[str, object] = {}
    for kv in span.attributes:  # type: ignore[attr-defined]
        values[kv.key] = getattr(kv.value, kv.value.WhichOneof("value"))
    return values
