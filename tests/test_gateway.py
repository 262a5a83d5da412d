"""The gateway end to end against the simulator and a real Postgres, with the openai SDK."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import openai
import pytest

from harness import Proc, free_port, start_gateway, wait_rows


def client(gateway: Proc, tenant: tuple[str, str]) -> openai.OpenAI:
    org, inst = tenant
    return openai.OpenAI(
        base_url=f"{gateway.url}/v1",
        api_key="unused",
        default_headers={"X-TEMBO-ORG": org, "X-TEMBO-INSTANCE": inst},
        max_retries=0,
    )


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def rows_for(database_url: str, tenant: tuple[str, str], count: int) -> list[dict[str, object]]:
    rows = asyncio.run(
        wait_rows(database_url, "organization_id = $1 AND instance_id = $2", tenant, count)
    )
    return [dict(r) for r in rows]


def stored_only(gateway: Proc, database_url: str, tenant: tuple[str, str],
                count: int = 0) -> list[dict[str, object]]:
    """The tenant's rows, once the writer is known to have caught up: a marker request is
    sent last, and a worker writes its records in order, so when the marker's row is stored
    everything before it is too. Returns the rows before the marker, which must be ``count``."""
    marker = client(gateway, tenant).chat.completions.with_raw_response.create(
        model="facebook/opt-125m", messages=[{"role": "user", "content": "marker"}],
        max_tokens=1)
    marker_id = marker.headers["X-Request-Id"]
    rows = rows_for(database_url, tenant, count + 1)
    assert str(rows[-1]["request_id"]) == marker_id, "the marker is not the last row"
    assert len(rows) == count + 1, f"{len(rows) - 1} rows stored before the marker, not {count}"
    return rows[:-1]


def assert_openai_error(body: bytes, status: int) -> dict[str, object]:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return dict(error)


def test_readme_curl_flow_stores_a_row(gateway: Proc, database_url: str) -> None:
    org, inst = "MY-TEST-ORG", "MY-TEST-INSTANCE"
    before = len(rows_for(database_url, (org, inst), 0))
    status, headers, body = post(
        f"{gateway.url}/v1/chat/completions",
        json.dumps({"model": "facebook/opt-125m",
                    "messages": [{"role": "user", "content": "San Francisco is a..."}]}).encode(),
        {"X-TEMBO-ORG": org, "X-TEMBO-INSTANCE": inst, "Content-type": "application/json"},
    )
    assert status == 200
    usage = json.loads(body)["usage"]
    rows = rows_for(database_url, (org, inst), before + 1)
    row = next(r for r in rows if str(r["request_id"]) == headers["X-Request-Id"])
    assert row["model"] == "facebook/opt-125m"
    assert row["prompt_tokens"] == usage["prompt_tokens"]
    assert row["completion_tokens"] == usage["completion_tokens"]
    assert row["status"] == 200 and row["endpoint"] == "/v1/chat/completions"
    assert 0 <= row["ttfb_ms"] <= row["duration_ms"]
    # The duration is the time between start and completion, as the row's own times say.
    elapsed_ms = (row["completed_at"] - row["started_at"]).total_seconds() * 1000
    assert abs(elapsed_ms - row["duration_ms"]) <= 2


def test_chat_non_streamed(gateway: Proc, database_url: str, tenant: tuple[str, str]) -> None:
    response = client(gateway, tenant).chat.completions.create(
        model="facebook/opt-125m", messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=7,
    )
    assert response.usage is not None
    [row] = rows_for(database_url, tenant, 1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        response.usage.prompt_tokens, response.usage.completion_tokens)
    assert row["completion_tokens"] == 7
    assert row["streamed"] is False and row["disconnected"] is False


def test_completion_streamed_with_client_usage(
    gateway: Proc, database_url: str, tenant: tuple[str, str]
) -> None:
    chunks = list(client(gateway, tenant).completions.create(
        model="facebook/opt-125m", prompt="Once upon a time", max_tokens=5, stream=True,
        stream_options={"include_usage": True},
    ))
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert all(c.usage is None for c in chunks[:-1])  # no continuous stats: not asked for
    [row] = rows_for(database_url, tenant, 1)
    assert row["prompt_tokens"] == final.usage.prompt_tokens
    assert row["completion_tokens"] == final.usage.completion_tokens == 5
    assert row["streamed"] is True


def test_stream_without_usage_is_hidden_yet_metered(
    gateway: Proc, simulator: Proc, database_url: str, tenant: tuple[str, str]
) -> None:
    org, inst = tenant
    body = json.dumps({"model": "facebook/opt-125m", "stream": True, "max_tokens": 4,
                       "messages": [{"role": "user", "content": "count to four"}]}).encode()
    headers = {"X-TEMBO-ORG": org, "X-TEMBO-INSTANCE": inst, "Content-Type": "application/json"}
    _, _, through = post(f"{gateway.url}/v1/chat/completions", body, headers)
    _, _, direct = post(f"{simulator.url}/v1/chat/completions", body, headers)
    assert b'"usage"' not in through
    strip_ids = [json.loads(e[6:]) | {"id": "", "created": 0}
                 for e in through.split(b"\n\n") if e.startswith(b"data: {")]
    direct_ids = [json.loads(e[6:]) | {"id": "", "created": 0}
                  for e in direct.split(b"\n\n") if e.startswith(b"data: {")]
    assert strip_ids == direct_ids
    assert through.endswith(b"data: [DONE]\n\n")
    [row] = rows_for(database_url, tenant, 1)
    _, _, counted = post(f"{simulator.url}/tokenize", json.dumps(
        {"model": "facebook/opt-125m", "messages": json.loads(body)["messages"]}).encode(),
        headers)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (json.loads(counted)["count"], 4)


def test_chat_streamed_with_sdk(gateway: Proc, database_url: str, tenant: tuple[str, str]) -> None:
    stream = client(gateway, tenant).chat.completions.create(
        model="facebook/opt-125m", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert all(c.usage is not None for c in chunks)  # continuous stats kept: asked for
    [row] = rows_for(database_url, tenant, 1)
    assert row["completion_tokens"] == chunks[-1].usage.completion_tokens == 6


def test_model_rewrite(gateway: Proc, database_url: str, tenant: tuple[str, str]) -> None:
    response = client(gateway, tenant).chat.completions.create(
        model="gpt-alias", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
    )
    assert response.model == "facebook/opt-125m"
    [row] = rows_for(database_url, tenant, 1)
    assert row["model"] == "facebook/opt-125m" and row["requested_model"] == "gpt-alias"


def test_embeddings_metered(gateway: Proc, database_url: str, tenant: tuple[str, str]) -> None:
    result = client(gateway, tenant).embeddings.create(
        model="facebook/opt-125m", input=["one two three", "four"])
    assert len(result.data) == 2
    [row] = rows_for(database_url, tenant, 1)
    assert row["prompt_tokens"] == result.usage.prompt_tokens == 4
    assert row["completion_tokens"] == 0


def test_models_lists_models_and_aliases(gateway: Proc) -> None:
    with urllib.request.urlopen(f"{gateway.url}/v1/models") as resp:
        listing = json.loads(resp.read())
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["facebook/opt-125m", "gpt-alias"]
    sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x")
    assert sdk.models.retrieve("gpt-alias").id == "gpt-alias"


def test_unknown_model_404(gateway: Proc, database_url: str, tenant: tuple[str, str]) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client(gateway, tenant).chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert "no-such-model" in str(err.value)
    assert stored_only(gateway, database_url, tenant) == []  # refused before any upstream


@pytest.mark.parametrize("missing", ["X-TEMBO-ORG", "X-TEMBO-INSTANCE"])
def test_missing_tenant_header_403(gateway: Proc, missing: str) -> None:
    headers = {"X-TEMBO-ORG": "o", "X-TEMBO-INSTANCE": "i", "Content-Type": "application/json"}
    del headers[missing]
    status, _, body = post(f"{gateway.url}/v1/chat/completions",
                           b'{"model": "facebook/opt-125m", "messages": []}', headers)
    assert status == 403
    assert missing in assert_openai_error(body, 403)["message"]  # type: ignore[operator]


@pytest.mark.parametrize("value", ["", "x" * 257, "caf\u00e9"])
def test_bad_tenant_header_400(gateway: Proc, value: str) -> None:
    status, _, body = post(
        f"{gateway.url}/v1/chat/completions", b'{"model": "facebook/opt-125m"}',
        {"X-TEMBO-ORG": value.encode("utf-8").decode("latin-1"), "X-TEMBO-INSTANCE": "i"},
    )
    assert status == 400
    assert_openai_error(body, 400)


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b'"text"', b"", b'{"messages": []}', b'{"model": 42}'],
)
def test_bad_body_400(gateway: Proc, body: bytes) -> None:
    status, _, raw = post(f"{gateway.url}/v1/chat/completions", body,
                          {"X-TEMBO-ORG": "o", "X-TEMBO-INSTANCE": "i"})
    assert status == 400
    assert_openai_error(raw, 400)


def test_body_too_large_413(gateway: Proc) -> None:
    body = b'{"model": "facebook/opt-125m", "prompt": "' + b"a" * (11 * 1024 * 1024) + b'"}'
    status, _, raw = post(f"{gateway.url}/v1/completions", body,
                          {"X-TEMBO-ORG": "o", "X-TEMBO-INSTANCE": "i"})
    assert status == 413
    assert_openai_error(raw, 413)


def test_upstream_error_passed_through(
    gateway: Proc, database_url: str, tenant: tuple[str, str]
) -> None:
    org, inst = tenant
    body = json.dumps({"model": "facebook/opt-125m", "max_tokens": 100000,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, _, raw = post(f"{gateway.url}/v1/chat/completions", body,
                          {"X-TEMBO-ORG": org, "X-TEMBO-INSTANCE": inst})
    assert status == 400
    error = json.loads(raw)["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400  # vLLM's body, unchanged
    [row] = rows_for(database_url, tenant, 1)
    assert row["status"] == 400 and row["completion_tokens"] == 0


def test_unknown_path_is_openai_404(gateway: Proc) -> None:
    try:
        urllib.request.urlopen(f"{gateway.url}/nope")
    except urllib.error.HTTPError as err:
        assert err.code == 404
        assert_openai_error(err.read(), 404)
    else:
        raise AssertionError("expected 404")


def test_probes_and_cors(gateway: Proc) -> None:
    for path in ("/ready", "/lively"):
        with urllib.request.urlopen(gateway.url + path) as resp:
            assert resp.status == 200
    request = urllib.request.Request(f"{gateway.url}/v1/chat/completions", method="OPTIONS",
                                     headers={"Origin": "http://example.test",
                                              "Access-Control-Request-Method": "POST"})
    with urllib.request.urlopen(request) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_client_drops_stream_is_metered_as_disconnected(
    session_tmp: Path, database_url: str, tenant: tuple[str, str]
) -> None:
    from harness import start_simulator

    slow = start_simulator(session_tmp, "--tpot-ms", "50")
    gateway = start_gateway(session_tmp, database_url, slow.url)
    org, inst = tenant
    try:
        async with aiohttp.ClientSession() as session:
            response = await session.post(
                f"{gateway.url}/v1/chat/completions",
                json={"model": "facebook/opt-125m", "stream": True, "max_tokens": 200,
                      "messages": [{"role": "user", "content": "write a long story"}]},
                headers={"X-TEMBO-ORG": org, "X-TEMBO-INSTANCE": inst},
            )
            events = 0
            async for line in response.content:
                if line.startswith(b"data: {"):
                    events += 1
                if events == 5:
                    break
            response.close()  # drop the connection mid-stream
        rows = await wait_rows(database_url, "organization_id = $1", (org,), 1)
        [row] = rows
        assert row["disconnected"] is True and row["streamed"] is True
        # The role chunk plus four content chunks reached the client; tokens billed up to the
        # last chunk relayed, not the 200 asked for.
        assert 4 <= row["completion_tokens"] < 20
    finally:
        gateway.stop()
        slow.stop()


def test_upstream_down_is_a_clear_503(
    session_tmp: Path, database_url: str, tenant: tuple[str, str]
) -> None:
    """Nothing listens where the model's only server should be: its health probe fails, and
    requests get a 503 that says so (never forwarded, so nothing is stored); the gateway
    itself stays ready for the other models."""
    gateway = start_gateway(session_tmp, database_url, f"http://127.0.0.1:{free_port()}")
    try:
        status, _, raw = post(
            f"{gateway.url}/v1/chat/completions",
            b'{"model": "facebook/opt-125m", "messages": [{"role": "user", "content": "x"}]}',
            {"X-TEMBO-ORG": tenant[0], "X-TEMBO-INSTANCE": tenant[1]},
        )
        assert status == 503
        assert assert_openai_error(raw, 503)["code"] == "model_unavailable"
        with urllib.request.urlopen(f"{gateway.url}/ready") as ready:
            assert ready.status == 200
        spool = session_tmp / f"spool-{gateway.port}"
        assert [p.name for p in spool.glob("*.log") if p.stat().st_size] == []
    finally:
        gateway.stop()


def test_upstream_timeout_504(
    session_tmp: Path, database_url: str, tenant: tuple[str, str]
) -> None:
    from harness import start_simulator

    slow = start_simulator(session_tmp, "--ttft-ms", "3000")
    gateway = start_gateway(session_tmp, database_url, slow.url, UPSTREAM_TIMEOUT_SEC="0.5")
    try:
        status, _, raw = post(
            f"{gateway.url}/v1/chat/completions",
            b'{"model": "facebook/opt-125m", "messages": [{"role": "user", "content": "x"}]}',
            {"X-TEMBO-ORG": tenant[0], "X-TEMBO-INSTANCE": tenant[1]},
        )
        assert status == 504
        assert assert_openai_error(raw, 504)["code"] == "upstream_timeout"
        [row] = rows_for(database_url, tenant, 1)
        assert (row["status"], row["prompt_tokens"], row["completion_tokens"]) == (504, 0, 0)
        assert row["duration_ms"] >= 500  # it waited UPSTREAM_TIMEOUT_SEC
    finally:
        gateway.stop()
        slow.stop()


def test_graceful_shutdown_flushes_queued_records(
    session_tmp: Path, database_url: str, simulator: Proc, tenant: tuple[str, str]
) -> None:
    # A flush interval far longer than the test: only the shutdown drain can write these.
    gateway = start_gateway(session_tmp, database_url, simulator.url,
                            USAGE_FLUSH_INTERVAL_MS="600000", USAGE_BATCH_SIZE="100000")
    sdk = client(gateway, tenant)
    for _ in range(20):
        sdk.chat.completions.create(model="facebook/opt-125m",
                                    messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert asyncio.run(wait_rows(database_url, "organization_id = $1", (tenant[0],), 1,
                                 timeout=0.5)) == []
    assert gateway.stop(signal.SIGTERM) == 0
    rows = rows_for(database_url, tenant, 20)
    assert len(rows) == 20
    assert sum(r["completion_tokens"] for r in rows) == 60


def test_malformed_setting_names_the_variable(tmp_path: Path) -> None:
    import os
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "inference_gateway", "serve"],
        env={**os.environ, "WEBSERVER_PORT": "eighty", "MODEL_SERVICE_PORT_MAP": "a=b"},
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "WEBSERVER_PORT" in result.stderr and "MODEL_SERVICE_PORT_MAP" in result.stderr
    assert "Traceback" not in result.stderr


def test_workers_that_keep_dying_at_start_up_stop_the_gateway(
    tmp_path: Path, database_url: str
) -> None:
    import os
    import socket
    import sys

    with socket.socket() as taken:  # a port held without SO_REUSEPORT: no worker can bind it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = subprocess.run(
            [sys.executable, "-m", "inference_gateway", "serve"],
            env={**os.environ, "DATABASE_URL": database_url, "WEBSERVER_HOST": "127.0.0.1",
                 "WEBSERVER_PORT": str(taken.getsockname()[1]), "WEBSERVER_WORKERS": "2",
                 "MIGRATE_ON_START": "false", "SPOOL_DIR": str(tmp_path / "spool")},
            capture_output=True, text=True, timeout=120,
        )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "died at start-up 3 times in a row" in result.stderr
    assert result.stderr.count("starting a new one") <= 2 * 2


def test_workers_stop_when_their_supervisor_is_killed(
    session_tmp: Path, database_url: str, simulator: Proc
) -> None:
    """SIGKILL leaves the supervisor no chance to stop its workers: they stop themselves,
    gracefully, instead of serving the port unsupervised."""
    import signal
    import time

    gateway = start_gateway(session_tmp, database_url, simulator.url, WEBSERVER_WORKERS="2")
    pid = gateway.popen.pid
    deadline = time.monotonic() + 10
    workers: list[int] = []
    while len(workers) < 2:
        assert time.monotonic() < deadline, "the workers did not start"
        workers = [int(w) for w in
                   Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        time.sleep(0.05)
    gateway.stop(signal.SIGKILL)
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{w}").exists() for w in workers):
        assert time.monotonic() < deadline, f"workers {workers} outlived their supervisor"
        time.sleep(0.1)
    with pytest.raises(OSError):  # nobody serves the port any more
        post(f"{gateway.url}/lively", b"", {})
    assert "stopping: finishing in-flight requests" in gateway.log.read_text()


def test_refuses_with_503_rather_than_serve_unmetered(
    session_tmp: Path, database_url: str, simulator: Proc, tenant: tuple[str, str]
) -> None:
    # A disk-space floor no disk can meet: the spool counts as full from the start.
    gateway = start_gateway(session_tmp, database_url, simulator.url,
                            SPOOL_MIN_FREE_BYTES=str(2**62))
    try:
        status, _, raw = post(
            f"{gateway.url}/v1/chat/completions",
            b'{"model": "facebook/opt-125m", "messages": [{"role": "user", "content": "x"}]}',
            {"X-TEMBO-ORG": tenant[0], "X-TEMBO-INSTANCE": tenant[1]},
        )
        assert status == 503
        assert assert_openai_error(raw, 503)["code"] == "metering_unavailable"
        # Refused before it was forwarded: nothing was served, so nothing is owed.
        assert [p.name for p in (session_tmp / f"spool-{gateway.port}").glob("*.log")
                if p.stat().st_size] == []
    finally:
        gateway.stop()
