"""The metrics' parts on their own: counting, merging workers, organizations, files, spool."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

from inference_gateway.errors import GatewayError
from inference_gateway.metering.record import UsageRecord
from inference_gateway.metering.spool import Spool
from inference_gateway.observability import catalog as c
from inference_gateway.observability import orgs as org_labels
from inference_gateway.observability.exposition import render
from inference_gateway.observability.orgs import OrgLabels
from inference_gateway.observability.request_metrics import RequestMetrics, route_of
from inference_gateway.observability.series import Snapshot, dumps, loads, merge, put
from inference_gateway.observability.shared import WorkerFiles
from inference_gateway.proxy.relay import Outcome
from inference_gateway.routing.upkeep import read_load, read_samples


def record(org: str = "o", *, status: int = 200, prompt: int = 10, completion: int = 5,
           endpoint: str = "/v1/chat/completions", streamed: bool = False,
           replica: str | None = "http://r1") -> UsageRecord:
    now = time.time()
    return UsageRecord("id", org, "i", "m", "m", endpoint, prompt, completion, status, streamed,
                       False, 20, 10, now - 0.02, now, 2, None, replica)


def outcome(choices: int = 1, stream: bool = False) -> Outcome:
    now = time.monotonic()
    return Outcome(status=200, sent_at=now - 0.019, first_byte_at=now - 0.01,
                   first_chunk_at=now - 0.009 if stream else None, upstream_done_at=now - 0.001,
                   replica="http://r1", choices=choices)


def snapshot(metrics: RequestMetrics) -> Snapshot:
    snap: Snapshot = {}
    metrics.snapshot(snap)
    return snap


def test_requests_tokens_and_timings_are_counted() -> None:
    metrics = RequestMetrics(OrgLabels(5, None))
    for status in (200, 200, 404, 503):
        metrics.started()
        metrics.finished(record(status=status), outcome())
    metrics.started()
    metrics.finished(record(streamed=True), outcome(stream=True))
    snap = snapshot(metrics)
    requests = snap[c.REQUESTS.name]
    assert requests[("m", "/v1/chat/completions", "2xx")] == 3
    assert requests[("m", "/v1/chat/completions", "4xx")] == 1
    assert requests[("m", "/v1/chat/completions", "5xx")] == 1
    assert snap[c.IN_FLIGHT.name][()] == 0
    assert sum(v for k, v in snap[c.TOKENS.name].items() if k[2] == "prompt") == 50
    assert sum(v for k, v in snap[c.TOKENS.name].items() if k[2] == "cached") == 10
    durations = snap[c.SERVER_DURATION.name]
    assert sum(h[-2] for h in durations.values()) == 0  # none beyond the largest bucket
    assert {k[3] for k in durations} == {"", "404", "503"}  # error_type of the failures
    ttft = snap[c.TTFT.name][("chat", "vllm", "m")]
    assert sum(ttft[:-1]) == 1 and 0.009 < ttft[-1] < 0.02
    overhead = snap[c.OVERHEAD.name][("m", "/v1/chat/completions")]
    assert sum(overhead[:-1]) == 5 and 0 < overhead[-1] / 5 < 0.005


def test_vllm_counts_the_prompt_once_per_choice() -> None:
    metrics = RequestMetrics(OrgLabels(5, None))
    metrics.started()
    metrics.finished(record(prompt=36, completion=30), outcome(choices=3))
    snap = snapshot(metrics)
    assert snap[c.BILLED.name][("m", "http://r1", "prompt")] == 36
    assert snap[c.EXPECTED.name][("m", "http://r1", "prompt")] == 108
    assert snap[c.EXPECTED.name][("m", "http://r1", "generation")] == 30


def test_refusals_and_the_rate_limiter() -> None:
    metrics = RequestMetrics(OrgLabels(5, None))
    for error in (GatewayError(429, "slow down", code="rate_limit_exceeded"),
                  GatewayError(404, "no", code="model_not_found")):
        metrics.started()
        metrics.refused("/v1/chat/completions", error)
    snap = snapshot(metrics)
    assert snap[c.RATE_LIMITED.name] == {("rate_limit_exceeded",): 1}
    assert snap[c.REJECTED.name][("/v1/chat/completions", "404", "model_not_found")] == 1
    assert snap[c.IN_FLIGHT.name][()] == 0


def test_a_stored_response_id_is_not_a_label() -> None:
    assert route_of("/v1/responses/resp_123") == "/v1/responses/{id}"
    assert route_of("/v1/responses/resp_123/cancel") == "/v1/responses/{id}/cancel"
    assert route_of("/v1/whatever") == "other"
    metrics = RequestMetrics(OrgLabels(5, None))
    for i in range(50):
        metrics.started()
        metrics.finished(record(endpoint=f"/v1/responses/resp_{i}"), outcome())
    assert len(metrics.slots) == 1


def test_organizations_are_bounded_and_the_biggest_win(tmp_path: Path) -> None:
    labels = OrgLabels(2, tmp_path)
    other = OrgLabels(2, tmp_path)  # another worker of the same instance
    for i in range(1000):  # a thousand small organizations, then two bigger ones
        labels.label(f"small-{i}", 1)
    labels.tick()
    labels.tick()
    assert len(labels.labelled()) == 2
    other.sync()
    assert other.labelled() == labels.labelled()
    assert len(labels._candidates) <= 2 * labels._capacity  # bounded memory
    # A much heavier organization replaces the lightest, once that one has held its label.
    for _ in range(3):
        assert labels.label("big", 1000) == org_labels.OTHER
    labels.tick(now=time.time() + org_labels.TENURE_SEC + 1)
    assert "big" in labels.labelled() and len(labels.labelled()) == 2
    assert labels.label("big", 1) == "big"
    other.sync()
    assert "big" in other.labelled()
    # An organization named like the bucket never gets a label of its own.
    for _ in range(5):
        labels.label("other", 10**6)
    labels.tick(now=time.time() + 2 * org_labels.TENURE_SEC)
    assert "other" not in labels.labelled()


def test_merge_sums_counters_and_combines_gauges() -> None:
    a: Snapshot = {}
    b: Snapshot = {}
    put(a, c.REQUESTS, ("m", "/v1/x", "2xx"), 3.0)
    put(b, c.REQUESTS, ("m", "/v1/x", "2xx"), 4.0)
    put(a, c.IN_FLIGHT, (), 2.0)
    put(b, c.IN_FLIGHT, (), 5.0)
    put(a, c.REPLICA_UP, ("m", "r"), 1.0)
    put(b, c.REPLICA_UP, ("m", "r"), 0.0)
    put(a, c.VLLM, ("m", "r", "prompt"), 100.0)  # the same replica counter, read twice
    put(b, c.VLLM, ("m", "r", "prompt"), 101.0)
    put(a, c.OLDEST, (), 1000.0)
    put(b, c.OLDEST, (), 990.0)
    put(a, c.TTFB, ("m", "/v1/x"), [1.0] + [0.0] * 14 + [0.5])
    put(b, c.TTFB, ("m", "/v1/x"), [0.0, 2.0] + [0.0] * 13 + [0.25])
    total: Snapshot = {}
    merge(total, a)
    merge(total, loads(dumps(b)))
    dead: Snapshot = {}
    put(dead, c.REQUESTS, ("m", "/v1/x", "2xx"), 10.0)
    put(dead, c.IN_FLIGHT, (), 7.0)
    merge(total, dead, live=False)
    assert total[c.REQUESTS.name][("m", "/v1/x", "2xx")] == 17
    assert total[c.IN_FLIGHT.name][()] == 7  # the dead worker's requests are not in flight
    assert total[c.REPLICA_UP.name][("m", "r")] == 0
    assert total[c.VLLM.name][("m", "r", "prompt")] == 101
    text = render(total, now=1000.0)
    assert "gateway_usage_oldest_unwritten_age_seconds 10\n" in text
    assert 'gateway_time_to_first_byte_seconds_bucket{model="m",endpoint="/v1/x",le="0.01"} 1\n' \
        in text
    assert 'gateway_time_to_first_byte_seconds_bucket{model="m",endpoint="/v1/x",le="0.02"} 3\n' \
        in text
    assert 'gateway_time_to_first_byte_seconds_count{model="m",endpoint="/v1/x"} 3\n' in text
    assert 'gateway_time_to_first_byte_seconds_sum{model="m",endpoint="/v1/x"} 0.75\n' in text


def test_label_values_are_escaped_and_bad_files_ignored() -> None:
    snap: Snapshot = {}
    put(snap, c.TOKENS, ("m", 'we "quote"\\', "prompt"), 1.0)
    assert 'organization="we \\"quote\\"\\\\"' in render(snap, 0)
    assert loads(b'{"gateway_requests_total": [["m", 1]], "nope": [], "x": 1}') == {
        "gateway_requests_total": {}}


def _dying_worker(directory: Path) -> None:
    files = WorkerFiles(directory)
    snap: Snapshot = {}
    put(snap, c.REQUESTS, ("m", "/v1/x", "2xx"), 5.0)
    put(snap, c.IN_FLIGHT, (), 3.0)
    files.open(dumps(snap))
    os._exit(0)  # dies without a word: its lock goes with it


def test_a_dead_workers_counters_are_kept_and_adopted(tmp_path: Path) -> None:
    child = multiprocessing.get_context("fork").Process(target=_dying_worker, args=(tmp_path,))
    child.start()
    child.join()
    reader = WorkerFiles(tmp_path / "elsewhere")
    reader.directory = tmp_path
    (found, alive), = reader.others()
    assert not alive and found[c.REQUESTS.name][("m", "/v1/x", "2xx")] == 5
    heir = WorkerFiles(tmp_path)
    adopted = heir.open(dumps({}))
    assert adopted == {c.REQUESTS.name: {("m", "/v1/x", "2xx"): 5.0}}  # no gauge
    assert sorted(p.name for p in tmp_path.glob("w-*")) == [
        f"w-{os.getpid()}.json", f"w-{os.getpid()}.lock"]
    heir.close(dumps(adopted))


def test_spool_counts_pending_records_and_knows_the_oldest(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=1 << 20)
    spool.open()
    for i in range(5):
        spool.append(UsageRecord(f"r{i}", "o", "i", "m", "m", "/v1/x", 1, 1, 200, False, False,
                                 1, 1, 100.0 + i, 200.0 + i))
    batch = spool.read_batch(2)
    assert batch is not None
    spool.ack(batch)
    stats = spool.stats
    assert stats.appended + stats.replayed - stats.acknowledged == 3
    where = spool.oldest_pending()
    assert where is not None
    from inference_gateway.metering.spool_lines import completed_at

    assert completed_at(*where) == 202.0
    os.close(spool._segments[0].fd)  # the process dies; another claims the segment
    spool._segments.clear()
    heir = Spool(tmp_path, segment_bytes=1 << 20)
    heir.open()
    assert heir.stats.replayed == 3


def test_only_the_exact_token_counters_are_read() -> None:
    page = (b'vllm:prompt_tokens_total{engine="0",model_name="a"} 100.0\n'
            b'vllm:prompt_tokens_total{engine="0",model_name="b"} 20.0\n'
            b'vllm:prompt_tokens_cached_total{engine="0",model_name="a"} 999.0\n'
            b'vllm:generation_tokens_total{engine="0",model_name="a"} 7.0\n'
            b'vllm:generation_tokens_created{engine="0",model_name="a"} 1.7e9\n')
    assert read_samples(page) == {"vllm:prompt_tokens_total": 120.0,
                                  "vllm:generation_tokens_total": 7.0}
    assert read_load(page) is None


def test_a_new_run_clears_only_its_own_files(tmp_path: Path) -> None:
    from inference_gateway.observability.shared import clear

    for name in ("w-1.json", "w-1.lock", "orgs.json", "adopt.lock", "keep.txt"):
        (tmp_path / name).write_text("x")
    clear(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
