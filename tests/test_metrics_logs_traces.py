"""The JSON access log and the OTLP traces of a real gateway process.

The traces go to an OTLP/HTTP receiver run by the test, which decodes them with the protocol's
own message types, as a collector would. The trace context the gateway hands on is read by a
model server of the test's own that records each request's headers.
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

from inference_gateway.proxy.trace_context import parse, start, upstream_headers

from harness import Proc, free_port, start_gateway

pb = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
MODEL = "facebook/opt-125m"


class Receiver:
    """An OTLP/HTTP endpoint on a thread of its own, keeping every span it is sent."""

    def __init__(self) -> None:
        self.port = free_port()
        self.spans: list[object] = []
        self.headers: list[dict[str, str]] = []  # of each chat request, as a model server
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

    async def _chat(self, request: web.Request) -> web.Response:
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        await request.read()
        return web.json_response({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._health)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def _traced(tmp_path: Path, database_url: str, upstream: str | None,
            **env: str) -> Iterator[tuple[Proc, Receiver]]:
    """A gateway sending its traces to a receiver (and its requests there too: no upstream)."""
    receiver = Receiver()
    gateway = start_gateway(tmp_path, database_url,
                            upstream or f"http://127.0.0.1:{receiver.port}",
                            OTEL_TRACES_EXPORTER="otlp",
                            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}",
                            **env)
    try:
        yield gateway, receiver
    finally:
        gateway.stop()
        receiver.close()


@pytest.fixture
def traced(tmp_path: Path, database_url: str, simulator: Proc) -> Iterator[tuple[Proc, Receiver]]:
    yield from _traced(tmp_path, database_url, simulator.url, ACCESS_LOG="json")


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


def test_traceparent_is_read_and_checked() -> None:
    trace, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    assert parse(f"00-{trace}-{parent}-01") == (trace, parent, True)
    assert parse(f"00-{trace}-{parent}-00") == (trace, parent, False)
    assert parse(f"01-{trace}-{parent}-01-extra") == (trace, parent, True)  # a later version
    for bad in (None, "", "junk", f"00-{trace}-{parent}-01-extra", f"ff-{trace}-{parent}-01",
                f"00-{'0' * 32}-{parent}-01", f"00-{trace}-{'0' * 16}-01",
                f"00-{trace.upper()}-{parent}-01", f"00-{trace[:-1]}-{parent}-01",
                f"00-{trace}-{parent}-0x"):
        assert parse(bad) is None, bad
    mine = start({"traceparent": f"00-{trace}-{parent}-01"}, lambda _: False)
    assert (mine.trace_id, mine.parent_id, mine.sampled) == (trace, parent, True)
    assert mine.traceparent() == f"00-{trace}-{mine.client_id}-01"
    assert len({mine.server_id, mine.client_id, parent}) == 3
    fresh = start({"traceparent": "junk"}, lambda trace_id: trace_id < "8")  # the sampler's
    assert fresh.parent_id is None and len(fresh.trace_id) == 32
    assert fresh.sampled == (fresh.trace_id < "8")
    assert upstream_headers([], mine, {"tracestate": "a=1"})[-1] == ("tracestate", "a=1")
    assert upstream_headers([], fresh, {"tracestate": "a=1"}) == [
        ("traceparent", fresh.traceparent())]  # a new trace starts without the client's state


@pytest.fixture
def traced_to_own_server(tmp_path: Path, database_url: str) -> Iterator[tuple[Proc, Receiver]]:
    yield from _traced(tmp_path, database_url, None)  # the collector is the model server too


def test_the_trace_goes_on_to_the_model_server(
        traced_to_own_server: tuple[Proc, Receiver]) -> None:
    """A client's trace is continued, and the model server is sent the gateway's upstream
    span as its parent (vLLM puts its spans under it); without one the gateway starts one."""
    gateway, receiver = traced_to_own_server
    tag = uuid.uuid4().hex[:8]
    headers = {"X-TEMBO-ORG": f"org-{tag}", "X-TEMBO-INSTANCE": f"inst-{tag}"}
    chat = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    trace, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    sent = [{**headers, "traceparent": f"00-{trace}-{parent}-01", "tracestate": "vendor=1"},
            headers, {**headers, "traceparent": "00-not-a-trace-01", "tracestate": "vendor=2"}]
    ids = []
    for extra in sent:
        resp = requests.post(f"{gateway.url}/v1/chat/completions", json=chat, headers=extra,
                             timeout=10)
        assert resp.status_code == 200, resp.text
        ids.append(resp.headers["X-Request-Id"])
    assert gateway.stop() == 0
    assert len(receiver.headers) == 3

    attrs = {span.span_id: _attributes(span) for span in receiver.spans}
    servers = {attrs[s.span_id].get("inference_gateway.request_id"): s for s in receiver.spans}
    for i, request_id in enumerate(ids):
        server = servers[request_id]
        (client,) = [s for s in receiver.spans if s.parent_span_id == server.span_id]
        upstream = parse(receiver.headers[i].get("traceparent"))
        assert upstream == (client.trace_id.hex(), client.span_id.hex(), True)
        assert client.trace_id == server.trace_id
        if i == 0:  # the client's trace, under the client's span
            assert server.trace_id.hex() == trace and server.parent_span_id.hex() == parent
            assert receiver.headers[i]["tracestate"] == "vendor=1"
        else:  # a trace of the gateway's own
            assert server.trace_id.hex() != trace and not server.parent_span_id
            assert "tracestate" not in receiver.headers[i]
