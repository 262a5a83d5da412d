"""Replica sets: the pick, ejection and return, load from /metrics, DNS, draining."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from inference_gateway.routing import replicas as replicas_module
from inference_gateway.routing.replicas import Replica, ReplicaSet
from inference_gateway.routing.router import Router
from inference_gateway.routing.upkeep import Upkeep, read_load

METRICS = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:prompt_tokens_cached_total{engine="0",model_name="m"} 99.0
vllm:num_requests_running_extra{engine="0"} 1000.0
"""


def replica_set(*loads: int) -> ReplicaSet:
    rs = ReplicaSet("m", rng=random.Random(7))
    for i, load in enumerate(loads):
        rs.replicas.append(Replica(f"http://r{i}:8000", in_flight=load))
    return rs


def test_least_loaded_first_and_a_second_to_retry_on() -> None:
    rs = replica_set(3, 1, 2)
    assert [r.url for r in rs.candidates()] == ["http://r1:8000", "http://r2:8000"]
    assert replica_set(5).candidates()[0].url == "http://r0:8000"  # alone: no retry target


def test_ties_are_spread() -> None:
    rs = replica_set(0, 0, 0)
    picked = Counter(rs.candidates()[0].url for _ in range(300))
    assert len(picked) == 3 and min(picked.values()) > 60


def test_power_of_two_choices_above_four() -> None:
    rs = replica_set(0, 9, 9, 9, 9, 9)
    first = Counter(rs.candidates()[0].url for _ in range(600))
    # r0 wins whenever it is one of the two drawn: 1 - C(5,2)/C(6,2) = 1/3 of the time.
    assert 140 < first["http://r0:8000"] < 260
    assert all(len(rs.candidates()) == 2 for _ in range(10))


def test_remote_load_and_cache_count_too() -> None:
    rs = replica_set(1, 1)
    a, b = rs.replicas
    a.remote_running, a.remote_waiting, a.own_at_scrape = 6, 2, 1  # 7 from other processes
    assert rs.candidates()[0] is b
    a.remote_running = a.remote_waiting = 0
    a.kv_cache = 0.9  # a nearly full cache makes each request there dearer
    assert rs.candidates()[0] is b


def test_failures_eject_with_growing_pauses_and_success_resets() -> None:
    rs = replica_set(0, 5)
    a, b = rs.replicas
    a.start()
    a.finish("unreachable")
    first = a.ejected_until - time.monotonic()
    assert 1.5 < first <= replicas_module.EJECT_SEC
    assert rs.candidates() == [b]
    a.start()
    a.finish("status 503")
    assert a.ejected_until - time.monotonic() > first  # doubled
    a.ejected_until = 0.0
    a.start()
    a.finish(None)
    assert a.failures == 0 and a.in_flight == 0 and a.errors == 2


def test_every_replica_ejected_is_still_tried_but_down_is_not() -> None:
    rs = replica_set(0)
    [a] = rs.replicas
    a.ejected_until = time.monotonic() + 30
    assert rs.candidates() == [a]  # one replica: refusing would turn every failure into 2 s down
    a.healthy = False
    assert rs.candidates() == []


def test_a_returning_replica_ramps_up() -> None:
    now = time.monotonic()
    r = Replica("http://r:1", in_flight=1, back_at=now)
    assert r.weight(now) == replicas_module.MIN_WEIGHT
    assert r.load(now) == pytest.approx(1 / replicas_module.MIN_WEIGHT)
    assert r.weight(now + replicas_module.RAMP_SEC / 2) == pytest.approx(0.5)
    assert r.weight(now + replicas_module.RAMP_SEC) == 1.0
    assert r.state(now) == "returning" and r.state(now + 10) == "up"


def test_prefix_affinity_holds_while_load_is_near_the_least() -> None:
    rs = replica_set(0, 0, 0)
    key = b'[{"role":"system","content":"You are a long shared preamble'
    first = rs.candidates(key)[0]
    assert all(rs.candidates(key)[0] is first for _ in range(20))
    others = {rs.candidates(b"another prefix %d" % i)[0].url for i in range(40)}
    assert len(others) == 3  # other prefixes spread over the replicas
    first.in_flight = 10  # far above the others: affinity gives way
    assert rs.candidates(key)[0] is not first


def test_metrics_are_read_by_exact_name() -> None:
    assert read_load(METRICS) == (3.0, 2.0, 0.25)
    assert read_load(b"# nothing here\n") is None
    assert read_load(b"vllm:kv_cache_usage_perc 7\n") == (0.0, 0.0, 1.0)  # a fraction


async def test_upkeep_probes_scrapes_and_follows_dns() -> None:
    answers: dict[tuple[str, str], tuple[int, bytes]] = {}
    addresses = {"10.0.0.1", "10.0.0.2"}
    retired: list[str] = []

    async def fetch(url: str, path: str, within: float) -> tuple[int, bytes]:
        if (url, path) not in answers:
            raise OSError("connection refused")
        return answers[(url, path)]

    async def resolve(host: str, port: int) -> set[str]:
        assert (host, port) == ("vllm.svc", 8000)
        return set(addresses)

    router = Router({"m": ("http://fixed:1", "dns+http://vllm.svc:8000")}, {},
                    on_retired=retired.append)
    upkeep = Upkeep(router, fetch, resolve)
    await upkeep.refresh_sets()
    assert sorted(r.url for r in router.replicas()) == [
        "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://fixed:1"]

    answers[("http://fixed:1", "/health")] = (200, b"")
    answers[("http://fixed:1", "/metrics")] = (200, METRICS)
    await upkeep.probe_all()
    assert [r.url for r in router.replicas() if r.healthy] == ["http://fixed:1"]
    await upkeep.scrape_all()
    fixed = router.find("http://fixed:1")
    assert fixed is not None and (fixed.remote_running, fixed.kv_cache) == (3.0, 0.25)

    answers[("http://10.0.0.1:8000", "/health")] = (200, b"")
    await upkeep.probe_all()
    back = router.find("http://10.0.0.1:8000")
    assert back is not None and back.healthy and back.state(time.monotonic()) == "returning"

    # 10.0.0.2 leaves DNS with a request in flight: drained, retired once it ended.
    gone = router.find("http://10.0.0.2:8000")
    assert gone is not None
    gone.start()
    addresses.discard("10.0.0.2")
    await upkeep.refresh_sets()
    assert gone.draining and gone not in router.sets["m"].candidates()
    assert retired == []
    gone.finish(None)
    await upkeep.refresh_sets()
    assert retired == ["http://10.0.0.2:8000"] and router.find(gone.url) is None


async def test_a_replica_back_from_down_is_forgiven_its_ejection() -> None:
    async def fetch(url: str, path: str, within: float) -> tuple[int, bytes]:
        return 200, b""

    router = Router({"m": ("http://r:1",)}, {})
    [replica] = router.replicas()
    replica.healthy = False
    replica.failures, replica.ejected_until = 5, time.monotonic() + 30  # failed while it was gone
    await Upkeep(router, fetch).probe_all()
    assert replica.available(time.monotonic()) and replica.failures == 0
