"""The simulator's own machinery, fast and without vLLM: its /metrics, its load model, its faults.

Each test runs a simulator in this process, built from the command's own flags, and talks to it
over HTTP. That the answers have vLLM's shapes is the conformance suite's business
(``tests/e2e/test_simulator_conformance.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from inference_gateway.simulator.app import create_app
from inference_gateway.simulator.load import Job, Scheduler
from inference_gateway.simulator.metrics import number
from inference_gateway.simulator.server import add_arguments, config_from_args

MODEL = "facebook/opt-125m"
CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
RESPONSES, MESSAGES = "/v1/responses", "/v1/messages"
LONG = "hello world " * 30  # 60 words: over three 16-token blocks in a chat prompt
SAMPLE = re.compile(r'^(vllm:[a-z_]+)\{engine="0",model_name="([^"]+)"\} (\S+)$')


class Sim:
    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url, self.session = url, session

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        async with self.session.post(self.url + path, json=body) as response:
            return response.status, await response.json(content_type=None)

    async def metrics(self) -> dict[str, float]:
        async with self.session.get(self.url + "/metrics") as response:
            text = await response.text()
        found = (SAMPLE.match(line) for line in text.splitlines())
        return {m[1]: float(m[3]) for m in found if m}

    async def until(self, name: str, value: float, timeout: float = 5.0) -> None:
        """Wait for a gauge to show ``value``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while (await self.metrics())[name] != value:
            assert asyncio.get_running_loop().time() < deadline, (name, await self.metrics())
            await asyncio.sleep(0.01)


@asynccontextmanager
async def simulator(*flags: str) -> AsyncIterator[Sim]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    runner = web.AppRunner(create_app(config_from_args(parser.parse_args(list(flags)))),
                           handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            yield Sim(f"http://127.0.0.1:{port}", session)
    finally:
        await runner.cleanup()


def chat(**members: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": 4, **members}


async def raw(sim: Sim, path: str, body: dict[str, Any],
              wait: float = 5.0) -> tuple[bytes, BaseException | None]:
    """Everything the server sends on its own connection, and how the connection ended
    (``None``: a clean close; the error of a reset; ``TimeoutError`` if it stayed open)."""
    host, port = sim.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data = json.dumps(body).encode()
    writer.write(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                 % (path.encode(), len(data), data))
    received, ending = b"", None
    try:
        while block := await asyncio.wait_for(reader.read(65536), wait):
            received += block
    except (ConnectionError, TimeoutError) as exc:
        ending = exc
    writer.close()
    return received, ending


# /metrics

async def test_metrics_in_vllm_text_format() -> None:
    async with simulator("--model", MODEL, "--model", "other") as sim, \
            sim.session.get(sim.url + "/metrics") as response:
        assert response.headers["Content-Type"] == "text/plain; version=1.0.0; charset=utf-8"
        lines = (await response.text()).splitlines()
    assert lines[:4] == [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{engine="0",model_name="facebook/opt-125m"} 0.0',
        'vllm:num_requests_running{engine="0",model_name="other"} 0.0']
    types = dict(line.split()[2:4] for line in lines if line.startswith("# TYPE"))
    assert types == {
        "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge",
        "vllm:prefix_cache_queries_total": "counter", "vllm:prefix_cache_queries_created": "gauge",
        "vllm:prefix_cache_hits_total": "counter", "vllm:prefix_cache_hits_created": "gauge",
        "vllm:prompt_tokens_total": "counter", "vllm:prompt_tokens_created": "gauge",
        "vllm:generation_tokens_total": "counter", "vllm:generation_tokens_created": "gauge"}


def test_numbers_as_the_prometheus_client_writes_them() -> None:
    assert [number(v) for v in (0, 35, 0.25, 1796161113.398367, 1234567.0)] == [
        "0.0", "35.0", "0.25", "1.796161113398367e+09", "1.234567e+06"]


async def test_counters_count_the_prompt_once_per_sequence() -> None:
    """vLLM prefills each of the ``n`` sequences: the prompt counts ``n`` times, and the ones
    after the first find its full blocks in the prefix cache."""
    async with simulator("--enable-prompt-tokens-details") as sim:
        status, answer = await sim.post(CHAT, chat(n=3, messages=[
            {"role": "user", "content": LONG}]))
        assert status == 200
        usage, counted = answer["usage"], await sim.metrics()
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert cached == 64  # whole 16-token blocks of the 66-token prompt, reported by the last
    assert counted["vllm:prompt_tokens_total"] == 3 * usage["prompt_tokens"]
    assert counted["vllm:prefix_cache_queries_total"] == 3 * usage["prompt_tokens"]
    assert counted["vllm:prefix_cache_hits_total"] == 2 * cached
    assert counted["vllm:generation_tokens_total"] == usage["completion_tokens"] == 12


async def test_pooling_counts_its_prompt_only() -> None:
    async with simulator() as sim:
        _, answer = await sim.post("/v1/embeddings", {"model": MODEL, "input": ["a b", "c"]})
        counted = await sim.metrics()
    assert counted["vllm:prompt_tokens_total"] == answer["usage"]["prompt_tokens"] == 3
    assert counted["vllm:generation_tokens_total"] == 0


# The load model

async def test_at_most_max_num_seqs_run_and_the_rest_wait_in_order() -> None:
    async with simulator("--max-num-seqs", "3", "--tpot-ms", "50") as sim:
        finished: list[str] = []

        async def ask(name: str, n: int, max_tokens: int) -> None:
            await sim.post(CHAT, chat(n=n, max_tokens=max_tokens))
            finished.append(name)

        # The second is shorter than the third, so if the third waits its turn it ends half a
        # second after the second; had it run beside the first, it would end with the first.
        tasks = [asyncio.create_task(ask("first", 2, 20))]
        await sim.until("vllm:num_requests_running", 2)
        tasks.append(asyncio.create_task(ask("second", 2, 10)))  # does not fit beside the first
        await sim.until("vllm:num_requests_waiting", 2)
        tasks.append(asyncio.create_task(ask("third", 1, 20)))  # fits, but waits its turn
        await sim.until("vllm:num_requests_waiting", 3)
        assert (await sim.metrics())["vllm:num_requests_running"] == 2
        await asyncio.gather(*tasks)
        assert finished == ["first", "second", "third"]
        assert (await sim.metrics())["vllm:num_requests_running"] == 0


async def test_the_kv_cache_fills_as_tokens_are_made_and_holds_back_requests() -> None:
    async with simulator("--num-gpu-blocks-override", "10", "--tpot-ms", "20") as sim:
        async with sim.session.post(sim.url + TEXT, json={
                "model": MODEL, "prompt": "a " * 15, "max_tokens": 40, "stream": True,
                "x_simulate": {"stall_after": 1}}) as first:
            await first.content.readline()  # the first token: 16 tokens, one block
            assert (await sim.metrics())["vllm:kv_cache_usage_perc"] == pytest.approx(0.1)
            await sim.post("/simulate/reset", {})
            await sim.until("vllm:kv_cache_usage_perc", 0.2)  # the 17th token opens a block
            # A request that will need 7 blocks does not fit beside the 4 the first will hold.
            second = asyncio.create_task(sim.post(TEXT, {
                "model": MODEL, "prompt": "b " * 60, "max_tokens": 40}))
            await sim.until("vllm:num_requests_waiting", 1)
            await first.read()
        assert (await second)[0] == 200
        await sim.until("vllm:kv_cache_usage_perc", 0)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_leaves_frees_its_place(stream: bool) -> None:
    async with simulator("--max-num-seqs", "1", "--tpot-ms", "50") as sim:
        running = asyncio.create_task(sim.post(CHAT, chat(max_tokens=200, stream=stream)))
        await sim.until("vllm:num_requests_running", 1)
        waiting = asyncio.create_task(sim.post(CHAT, chat(max_tokens=200)))
        await sim.until("vllm:num_requests_waiting", 1)
        waiting.cancel()
        await sim.until("vllm:num_requests_waiting", 0)
        running.cancel()
        await sim.until("vllm:num_requests_running", 0)
        counted = await sim.metrics()
    assert 0 < counted["vllm:generation_tokens_total"] < 200


async def test_a_waiting_request_that_is_cancelled_lets_the_next_one_in() -> None:
    scheduler = Scheduler(max_seqs=2, blocks=100, block_size=16)
    first, big, small = Job([5], 2, 4), Job([5], 2, 4), Job([5], 1, 4)
    await scheduler.admit(first)
    waiting_big = asyncio.create_task(scheduler.admit(big))
    waiting_small = asyncio.create_task(scheduler.admit(small))
    await asyncio.sleep(0)
    assert scheduler.waiting_seqs == 3
    scheduler.release(first)
    waiting_big.cancel()  # admitted, but cancelled before it ran: its place is given back
    await asyncio.gather(waiting_big, return_exceptions=True)
    await waiting_small
    assert scheduler.running == [small] and scheduler.waiting_seqs == 0


# Faults named in the body

async def test_a_status_in_vllms_error_shape_before_any_work() -> None:
    async with simulator() as sim:
        assert await sim.post(CHAT, chat(x_simulate={"status": 503})) == (503, {"error": {
            "message": "Simulated error 503", "type": "ServiceUnavailableError", "param": None,
            "code": 503}})
        status, answer = await sim.post(MESSAGES, chat(x_simulate={"status": 429}))
        assert (status, answer) == (429, {"type": "error", "error": {
            "type": "Too Many Requests", "message": "Simulated error 429"}})
        assert (await sim.metrics())["vllm:prompt_tokens_total"] == 0


@pytest.mark.parametrize("spec", [5, [], {"status": 200}, {"status": 599}, {"status": "503"},
                                  {"break_after": -1}, {"stall_after": True}, {"other": 1}])
async def test_a_malformed_fault_is_a_400(spec: object) -> None:
    async with simulator() as sim:
        status, answer = await sim.post(CHAT, chat(x_simulate=spec))
    assert status == 400 and answer["error"]["param"] == "x_simulate"


async def test_members_it_does_not_know_are_ignored_as_by_vllm() -> None:
    async with simulator() as sim:
        assert (await sim.post(CHAT, chat(unknown_member={"a": 1})))[0] == 200


def _events(data: bytes) -> list[bytes]:
    return re.findall(rb"(?:event: [^\n]+\n)?data: [^\n]+\n\n", data)


@pytest.mark.parametrize(("path", "body"), [
    (CHAT, chat(stream=True)),
    (TEXT, {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "stream": True}),
    (RESPONSES, {"model": MODEL, "input": "Hi", "max_output_tokens": 4, "stream": True}),
    (MESSAGES, chat(stream=True)),
])
async def test_a_stream_broken_off_after_n_events(path: str, body: dict[str, Any]) -> None:
    async with simulator() as sim:
        whole, _ = await raw(sim, path, body)
        cut, ending = await raw(sim, path, {**body, "x_simulate": {"break_after": 3}})
    assert len(_events(whole)) > 3
    assert isinstance(ending, ConnectionResetError)
    assert _events(cut) == _events(whole)[:3] or len(_events(cut)) == 3
    assert not cut.endswith(b"0\r\n\r\n")  # the chunked body never ends


async def test_a_whole_answer_broken_off_after_n_tokens() -> None:
    async with simulator() as sim:
        received, ending = await raw(sim, CHAT, chat(max_tokens=10,
                                                     x_simulate={"break_after": 4}))
        counted = await sim.metrics()
    assert received == b"" and isinstance(ending, ConnectionResetError)
    assert counted["vllm:generation_tokens_total"] == 4


@pytest.mark.parametrize(("stream", "after"), [(False, 2), (True, 0), (True, 2)])
async def test_a_stalled_answer_keeps_its_connection_until_reset(stream: bool,
                                                                 after: int) -> None:
    async with simulator() as sim:
        body = chat(stream=stream, max_tokens=6, x_simulate={"stall_after": after})
        stalled, ending = await raw(sim, CHAT, body, wait=0.3)
        assert isinstance(ending, TimeoutError)  # still open, then closed by the client ...
        assert len(_events(stalled)) == (after if stream else 0)
        await sim.until("vllm:num_requests_running", 0)  # ... which frees its place
        resumed = asyncio.create_task(raw(sim, CHAT, body))
        await sim.until("vllm:num_requests_running", 1)
        await asyncio.sleep(0.2)
        assert not resumed.done()
        async with sim.session.post(sim.url + "/simulate/reset") as response:
            assert response.status == 200
        received, ending = await resumed
    assert ending is None
    assert b"data: [DONE]" in received if stream else b'"completion_tokens":6' in received


async def test_no_tokens_are_made_while_stalled() -> None:
    async with simulator("--tpot-ms", "200") as sim:
        body = chat(stream=True, max_tokens=50, x_simulate={"stall_after": 3})
        stalled, _ = await raw(sim, CHAT, body, wait=0.5)
        assert len(_events(stalled)) == 3  # the role, then two tokens
        await sim.until("vllm:num_requests_running", 0)
        assert (await sim.metrics())["vllm:generation_tokens_total"] in (2, 3)


# Faults of the process

async def test_health_answers_the_status_it_is_given_until_reset() -> None:
    async with simulator() as sim:
        async def health() -> int:
            async with sim.session.get(sim.url + "/health") as response:
                return response.status

        assert (await sim.post("/simulate/health", {"status": 503}))[1]["health"] == 503
        assert await health() == 503
        assert (await sim.post(CHAT, chat()))[0] == 200  # only the probe fails
        await sim.post("/simulate/health", {"status": 200})
        assert await health() == 200
        await sim.post("/simulate/health", {"status": 500})
        await sim.post("/simulate/reset", {})
        assert await health() == 200
        assert (await sim.post("/simulate/health", {"status": "down"}))[0] == 400


async def test_a_fault_for_every_request_or_the_next_few() -> None:
    async with simulator() as sim:
        await sim.post("/simulate/faults", {"status": 503, "count": 2})
        statuses = [(await sim.post(CHAT, chat()))[0] for _ in range(3)]
        assert statuses == [503, 503, 200]
        await sim.post("/simulate/faults", {"status": 500})
        assert (await sim.post(CHAT, chat(x_simulate={})))[0] == 200  # its own fault: none
        assert (await sim.post(TEXT, {"model": MODEL, "prompt": "Hi"}))[0] == 500
        assert (await sim.post("/simulate/reset", {}))[1]["faults"]["status"] is None
        assert (await sim.post(CHAT, chat()))[0] == 200
        assert (await sim.post("/simulate/faults", {"count": 0}))[0] == 400
