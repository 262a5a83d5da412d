"""Naming the tenant (headers, keys, either) and the org gate: rules in memory, then for real."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from multidict import CIMultiDict

from inference_gateway.errors import GatewayError
from inference_gateway.settings import Settings
from inference_gateway.tenants import caches as caches_module
from inference_gateway.tenants.caches import TenantCaches
from inference_gateway.tenants.identity import AuthMode, identify
from inference_gateway.tenants.keys import KeyRing, hash_key, new_key
from inference_gateway.tenants.orgs import OrgGate
from inference_gateway.tenants.tenant import Tenant

from harness import Proc, free_port, start_gateway

# -- in memory ----------------------------------------------------------------------------------


class FakeConn:
    """Answers the cache reloads from lists, and records what they write."""

    def __init__(self, orgs: list[str] | None = None,
                 keys: list[tuple[int, str, str, str]] | None = None,
                 events: list[tuple[str, str, float]] | None = None) -> None:
        self.orgs = orgs or []
        self.keys = keys or []
        self.executed: list[tuple[Any, ...]] = []
        self.fail = False
        self.events = events  # ("load", cache, 0) for every reload, if given

    async def fetch(self, query: str, *args: object) -> list[dict[str, object]]:
        if self.fail:
            raise OSError("connection refused")
        if self.events is not None:
            cache = "org gate" if "org_validation" in query else "API keys"
            self.events.append(("load", cache, 0.0))
        if "org_validation" in query:
            return [{"org_id": org} for org in self.orgs]
        return [{"id": i, "key_hash": hash_key(k), "organization_id": o, "instance_id": n}
                for i, k, o, n in self.keys]

    async def execute(self, query: str, *args: object) -> str:
        if self.fail:
            raise OSError("connection refused")
        self.executed.append(args)
        return "UPDATE 1"


KEY = new_key()
OTHER_KEY = new_key()


@pytest.fixture
def keys() -> KeyRing:
    ring = KeyRing()
    asyncio.run(ring.refresh(FakeConn(keys=[(1, KEY, "org-k", "inst-k")])))
    return ring


def headers(org: str | None = None, inst: str | None = None,
            token: str | None = None) -> dict[str, str]:
    h = {}
    if org is not None:
        h["X-TEMBO-ORG"] = org
    if inst is not None:
        h["X-TEMBO-INSTANCE"] = inst
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    return h


def error_of(call: Any) -> GatewayError:
    with pytest.raises(GatewayError) as err:
        call()
    return err.value


def test_headers_mode_ignores_keys(keys: KeyRing) -> None:
    assert identify(headers("o", "i", KEY), "headers", None, None) == Tenant("o", "i")
    assert error_of(lambda: identify(headers(token=KEY), "headers", None, None)).status == 403


def test_either_mode_header_flow_with_any_other_token(keys: KeyRing) -> None:
    for token in (None, "unused", "sk-proj-abc"):
        assert identify(headers("o", "i", token), "either", keys, None) == Tenant("o", "i")
    err = error_of(lambda: identify(headers("o"), "either", keys, None))
    assert (err.status, err.code) == (403, "missing_tenant_header")


def test_either_mode_key_names_the_tenant(keys: KeyRing) -> None:
    assert identify(headers(token=KEY), "either", keys, None) == Tenant("org-k", "inst-k")
    assert identify(headers("org-k", "inst-k", KEY), "either", keys, None) == Tenant(
        "org-k", "inst-k")
    assert identify(headers("org-k", None, KEY), "either", keys, None).instance_id == "inst-k"
    lower = CIMultiDict({"authorization": f"bearer {KEY}"})  # as aiohttp hands headers over
    assert identify(lower, "either", keys, None).organization_id == "org-k"


@pytest.mark.parametrize("mode", ["either", "keys"])
def test_unknown_key_401(keys: KeyRing, mode: AuthMode) -> None:
    err = error_of(lambda: identify(headers("o", "i", OTHER_KEY), mode, keys, None))
    assert (err.status, err.code) == (401, "invalid_api_key")
    assert OTHER_KEY not in err.message


@pytest.mark.parametrize("sent", [("other-org", None), (None, "other-inst"),
                                  ("org-k", "other-inst")])
def test_headers_must_match_the_key(keys: KeyRing, sent: tuple[str | None, str | None]) -> None:
    for mode in ("either", "keys"):
        err = error_of(lambda m=mode: identify(headers(*sent, KEY), m, keys, None))
        assert (err.status, err.code) == (403, "tenant_mismatch")


def test_malformed_header_with_key_is_400(keys: KeyRing) -> None:
    err = error_of(lambda: identify(headers("", None, KEY), "either", keys, None))
    assert err.status == 400


def test_keys_mode_needs_a_key(keys: KeyRing) -> None:
    for h in (headers("o", "i"), headers("o", "i", "unused"), {"Authorization": f"Basic {KEY}"}):
        err = error_of(lambda h=h: identify(h, "keys", keys, None))
        assert err.status == 401
    assert identify(headers(token=KEY), "keys", keys, None) == Tenant("org-k", "inst-k")


def test_org_gate(keys: KeyRing) -> None:
    gate = OrgGate()
    err = error_of(lambda: identify(headers("o", "i"), "either", keys, gate))
    assert (err.status, err.code) == (403, "organization_not_authorized")
    asyncio.run(gate.refresh(FakeConn(orgs=["o", "org-k"])))
    assert identify(headers("o", "i"), "either", keys, gate) == Tenant("o", "i")
    assert identify(headers(token=KEY), "either", keys, gate).organization_id == "org-k"
    asyncio.run(gate.refresh(FakeConn(orgs=["o"])))
    assert error_of(lambda: identify(headers(token=KEY), "either", keys, gate)).status == 403


def test_last_used_is_batched_and_kept_on_failure(keys: KeyRing) -> None:
    conn = FakeConn(keys=[(1, KEY, "org-k", "inst-k")])
    for _ in range(100):
        keys.lookup(KEY)
    keys.lookup(OTHER_KEY)
    conn.fail = True
    with pytest.raises(OSError):
        asyncio.run(keys.refresh(conn))
    conn.fail = False
    asyncio.run(keys.refresh(conn))
    [(ids, times)] = conn.executed  # one statement for a hundred uses
    assert ids == [1] and len(times) == 1
    asyncio.run(keys.refresh(conn))
    assert len(conn.executed) == 1  # nothing new to write


class FakePool:
    def __init__(self, conn: FakeConn) -> None:
        self.conn = conn

    async def close(self) -> None:
        pass

    def terminate(self) -> None:
        pass

    def acquire(self) -> Any:
        pool = self

        class Acquire:
            async def __aenter__(self) -> FakeConn:
                if pool.conn.fail:
                    raise OSError("connection refused")
                return pool.conn

            async def __aexit__(self, *exc: object) -> None:
                return None

        return Acquire()


def test_failed_reload_keeps_the_last_copy(caplog: pytest.LogCaptureFixture) -> None:
    caches = TenantCaches(Settings(org_auth_enabled=True, auth_mode="headers"))
    conn = FakeConn(orgs=["allowed"])
    caches._pool = FakePool(conn)
    assert caches.orgs is not None
    asyncio.run(caches._refresh("org gate", caches.orgs.refresh))
    conn.fail = True
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            asyncio.run(caches._refresh("org gate", caches.orgs.refresh))
    assert len([r for r in caplog.records if "keeping the last copy" in r.message]) == 1
    assert caches.identify(headers("allowed", "i")) == Tenant("allowed", "i")
    assert error_of(lambda: caches.identify(headers("unknown", "i"))).status == 403


def test_gate_stays_closed_when_the_first_load_fails() -> None:
    dead = f"postgresql://nobody@127.0.0.1:{free_port()}/none"
    caches = TenantCaches(Settings(org_auth_enabled=True, database_url=dead))

    async def check() -> None:
        await caches.start()
        try:
            err = error_of(lambda: caches.identify(headers("any", "i")))
            assert err.code == "organization_not_authorized"
        finally:
            await caches.close()

    asyncio.run(check())


def test_each_cache_is_reloaded_every_its_own_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """A change takes effect within one interval: each reload loop waits exactly its setting
    between two reloads (its waits are noted instead of slept)."""
    events: list[tuple[str, str, float]] = []
    conn = FakeConn(orgs=["o"], keys=[(1, KEY, "org-k", "inst-k")], events=events)

    class Clock:
        """``asyncio`` for the caches module, with the sleeps noted and not slept."""

        def __getattr__(self, name: str) -> Any:
            return getattr(asyncio, name)

        async def sleep(self, seconds: float) -> None:
            task = asyncio.current_task()
            assert task is not None
            events.append(("wait", task.get_name().removeprefix("refresh "), seconds))
            await asyncio.sleep(0)

    async def create_pool(*args: object, **kwargs: object) -> FakePool:
        return FakePool(conn)

    monkeypatch.setattr(caches_module, "asyncio", Clock())
    monkeypatch.setattr(caches_module.asyncpg, "create_pool", create_pool)
    caches = TenantCaches(Settings(org_auth_enabled=True, auth_mode="either",
                                   org_auth_cache_refresh_interval_sec=0.25,
                                   api_key_cache_refresh_interval_sec=0.75))

    def of(cache: str) -> list[tuple[str, float]]:
        return [(kind, seconds) for kind, name, seconds in events if name == cache]

    async def run() -> None:
        await caches.start()
        try:
            for _ in range(1000):
                if all(len(of(c)) >= 7 for c in ("org gate", "API keys")):
                    break
                await asyncio.sleep(0)
        finally:
            await caches.close()

    asyncio.run(run())
    for cache, interval in (("org gate", 0.25), ("API keys", 0.75)):
        seen = of(cache)[:7]  # the first load, then a wait of one interval before each reload
        assert seen == [("load", 0.0)] + [("wait", interval), ("load", 0.0)] * 3, cache


# -- a real gateway ---------------------------------------------------------------------------

REFRESH_SEC = 0.5


def cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inference_gateway", *args],
        env={**os.environ, "DATABASE_URL": database_url, "LOG_LEVEL": "WARNING"},
        capture_output=True, text=True, timeout=30, check=False,
    )


@pytest.fixture(scope="module")
def gated(session_tmp: Path, database_url: str, simulator: Proc) -> Iterator[Proc]:
    proc = start_gateway(session_tmp, database_url, simulator.url, ORG_AUTH_ENABLED="true",
                         ORG_AUTH_CACHE_REFRESH_INTERVAL_SEC=str(REFRESH_SEC))
    yield proc
    proc.stop()


def chat(gateway: Proc, org: str) -> int:
    sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0,
                        default_headers={"X-TEMBO-ORG": org, "X-TEMBO-INSTANCE": "inst"})
    try:
        sdk.chat.completions.create(model="facebook/opt-125m", max_tokens=1,
                                    messages=[{"role": "user", "content": "hi"}])
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


def wait_status(gateway: Proc, org: str, status: int, within: float = 20.0) -> None:
    """Wait until requests of ``org`` get ``status``; fail after a generous deadline. How
    soon is the reload interval's business (test_each_cache_is_reloaded_every_its_own_interval)."""
    deadline = time.monotonic() + within
    while (got := chat(gateway, org)) != status:
        assert time.monotonic() < deadline, f"still {got} after {within}s"
        time.sleep(0.05)


def test_gate_allow_and_deny_reach_a_running_gateway(gated: Proc, database_url: str) -> None:
    org = f"org-{uuid.uuid4().hex[:12]}"
    with pytest.raises(openai.PermissionDeniedError) as err:
        openai.OpenAI(base_url=f"{gated.url}/v1", api_key="unused", max_retries=0,
                      default_headers={"X-TEMBO-ORG": org, "X-TEMBO-INSTANCE": "i"},
                      ).chat.completions.create(model="facebook/opt-125m", messages=[])
    assert err.value.code == "organization_not_authorized"

    assert cli(database_url, "orgs", "allow", org).returncode == 0
    wait_status(gated, org, 200)
    listing = cli(database_url, "orgs", "list", org).stdout
    assert f"{org}\tallowed" in listing

    assert cli(database_url, "orgs", "deny", org).returncode == 0
    wait_status(gated, org, 403)
    assert f"{org}\tdenied" in cli(database_url, "orgs", "list").stdout


def test_gate_off_lets_any_org_in(gateway: Proc) -> None:
    assert chat(gateway, f"org-{uuid.uuid4().hex[:12]}") == 200


def test_gate_error_is_openai_shaped(gated: Proc) -> None:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"{gated.url}/v1/chat/completions", data=b'{"model": "facebook/opt-125m"}',
        headers={"X-TEMBO-ORG": "never-allowed", "X-TEMBO-INSTANCE": "i"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 403
    body = json.loads(err.value.read())["error"]
    assert body["type"] == "permission_error" and body["code"] == "organization_not_authorized"
