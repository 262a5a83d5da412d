"""Rate limits and quotas through a gateway of two workers sharing a real Redis; keys, org gate
and limits reaching every worker at once through Postgres's notifications."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import Proc, free_port, start_gateway, start_simulator

MODEL = "facebook/opt-125m"
SLOW_RELOAD = "600"  # the periodic reloads are far off: only notifications can be this quick


def cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "inference_gateway", *args],
                            env={**os.environ, "DATABASE_URL": database_url},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result


def chat(gateway: Proc, headers: dict[str, str],
         max_tokens: int | None = 3) -> tuple[int, dict[str, str], dict[str, object]]:
    fields: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    body = json.dumps(fields).encode()
    request = urllib.request.Request(f"{gateway.url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json",
                                              "Connection": "close", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def tenant_headers(tenant: tuple[str, str]) -> dict[str, str]:
    return {"X-TEMBO-ORG": tenant[0], "X-TEMBO-INSTANCE": tenant[1]}


@pytest.fixture(scope="module")
def limited(session_tmp: Path, database_url: str, redis_url: str) -> Iterator[Proc]:
    sim = start_simulator(session_tmp, "--model", MODEL)
    gateway = start_gateway(session_tmp, database_url, sim.url, REDIS_URL=redis_url,
                            WEBSERVER_WORKERS="2",
                            API_KEY_CACHE_REFRESH_INTERVAL_SEC=SLOW_RELOAD,
                            LIMITS_REFRESH_INTERVAL_SEC=SLOW_RELOAD)
    yield gateway
    gateway.stop()
    sim.stop()


def test_a_new_key_works_at_once_and_a_revoked_one_stops_within_a_second(
    limited: Proc, database_url: str, tenant: tuple[str, str]
) -> None:
    created = cli(database_url, "keys", "create", "--org", tenant[0], "--instance", tenant[1])
    key = created.stdout.strip()
    auth = {"Authorization": f"Bearer {key}"}
    # Each request on a new connection: the kernel spreads them over both workers.
    assert [chat(limited, auth)[0] for _ in range(6)] == [200] * 6
    cli(database_url, "keys", "revoke", key[:12])
    revoked_at = time.monotonic()
    statuses: list[int] = []
    while time.monotonic() - revoked_at < 1.0:
        statuses.append(chat(limited, auth)[0])
    assert statuses[-6:] == [401] * 6 if len(statuses) >= 6 else statuses[-1] == 401, statuses
    assert all(chat(limited, auth)[0] == 401 for _ in range(6))


def test_requests_per_minute_429_and_headers(limited: Proc, database_url: str,
                                             tenant: tuple[str, str]) -> None:
    cli(database_url, "limits", "set", "--org", tenant[0], "--requests-per-minute", "3",
        "--tokens-per-minute", "100000")
    headers = tenant_headers(tenant)
    answers = [chat(limited, headers) for _ in range(4)]
    assert [status for status, _, _ in answers] == [200, 200, 200, 429]
    _, first, _ = answers[0]
    assert first["x-ratelimit-limit-requests"] == "3"
    assert first["x-ratelimit-remaining-requests"] == "2"
    assert first["x-ratelimit-limit-tokens"] == "100000"
    assert first["x-ratelimit-reset-requests"].endswith("s")
    assert answers[2][1]["x-ratelimit-remaining-requests"] == "0"
    _, refused, body = answers[3]
    retry = int(refused["Retry-After"])
    assert 55 <= retry <= 61 and int(refused["retry-after-ms"]) <= retry * 1000
    error = body["error"]
    assert isinstance(error, dict)
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert "limit 3" in error["message"]
    other = (tenant[0], f"{tenant[1]}-other")  # the organization's limit holds for it too
    assert chat(limited, tenant_headers(other))[0] == 429


def test_tokens_per_minute_settle_with_what_was_used(limited: Proc, database_url: str,
                                                     tenant: tuple[str, str]) -> None:
    # Without max_tokens a request reserves what is left of the minute (up to 4096 tokens);
    # it uses 7 + 16 (the simulator's answer), and settling gives back the rest.
    cli(database_url, "limits", "set", "--org", tenant[0], "--instance", tenant[1],
        "--tokens-per-minute", "400")
    headers = tenant_headers(tenant)
    answers = [chat(limited, headers, max_tokens=None) for _ in range(12)]
    assert [status for status, _, _ in answers] == [200] * 12
    used = sum(int(body["usage"]["total_tokens"]) for _, _, body in answers)  # type: ignore
    assert used == 12 * 23
    status, _, body = chat(limited, headers, max_tokens=200)  # named: 200 must fit whole
    assert status == 429 and "please try again" in str(body).lower()
    status, _, body = chat(limited, headers, max_tokens=100_000)  # more than the limit itself
    assert status == 429 and "Request too large" in str(body)


def test_a_quota_answers_insufficient_quota(limited: Proc, database_url: str,
                                            tenant: tuple[str, str]) -> None:
    cli(database_url, "limits", "set", "--org", tenant[0], "--model", MODEL,
        "--tokens-per-day", "300")
    headers = tenant_headers(tenant)
    statuses = []
    for _ in range(30):
        status, refused, body = chat(limited, headers, max_tokens=50)
        statuses.append(status)
        if status == 429:
            break
    assert statuses[-1] == 429 and statuses.count(200) >= 2, statuses
    error = body["error"]
    assert isinstance(error, dict) and error["code"] == "insufficient_quota"
    assert int(refused["Retry-After"]) <= 86_400


def test_limits_list_and_rm(database_url: str, tenant: tuple[str, str]) -> None:
    cli(database_url, "limits", "set", "--org", tenant[0], "--max-concurrent", "2")
    listing = cli(database_url, "limits", "list", "--org", tenant[0]).stdout
    [line] = [row for row in listing.splitlines() if tenant[0] in row]
    limit_id = line.split()[0]
    cli(database_url, "limits", "rm", limit_id)
    assert tenant[0] not in cli(database_url, "limits", "list", "--org", tenant[0]).stdout


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is missing")
def test_redis_away_the_gateway_keeps_serving_with_its_share(
    session_tmp: Path, database_url: str, tenant: tuple[str, str]
) -> None:
    port = free_port()
    redis_dir = session_tmp / f"redis-{port}"
    redis_dir.mkdir()
    redis = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port),
                              "--dir", str(redis_dir), "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)
    sim = start_simulator(session_tmp, "--model", MODEL)
    gateway = start_gateway(session_tmp, database_url, sim.url,
                            REDIS_URL=f"redis://127.0.0.1:{port}/0",
                            LIMITS_REFRESH_INTERVAL_SEC=SLOW_RELOAD)
    try:
        cli(database_url, "limits", "set", "--org", tenant[0], "--requests-per-minute", "4")
        headers = tenant_headers(tenant)
        assert chat(gateway, headers)[0] == 200
        redis.terminate()
        redis.wait()
        # One worker holds the whole limit then (its share); it keeps serving, says why, and
        # counts the request Redis admitted.
        statuses = [chat(gateway, headers)[0] for _ in range(6)]
        assert statuses == [200] * 3 + [429] * 3, statuses
        deadline = time.monotonic() + 10
        while "Redis cannot be reached" not in gateway.log.read_text():
            assert time.monotonic() < deadline, gateway.log_tail()
            time.sleep(0.1)
        other = (f"org-{uuid.uuid4().hex[:8]}", "i")  # no limits: nothing to count
        assert chat(gateway, tenant_headers(other))[0] == 200
    finally:
        gateway.stop()
        sim.stop()
        if redis.poll() is None:
            redis.kill()
