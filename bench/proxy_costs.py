"""What a feature costs the request path, measured in pairs.

A cost of a few per cent, or a few hundredths of a millisecond, is smaller than what this kind
of machine moves from one measurement to the next (the load generator, the backend and Postgres
share its cores). Measured one gateway after the other, such a cost is lost in that noise, and
the order of the measurements decides the answer. So the gateways being compared run side by
side, each round measures every one of them for a few seconds in an order that changes with the
round (each takes every place, and follows every other, equally often), and the result is the
median over the rounds of each gateway's ratio and difference against the base measured in the
same round. Beside them, the CPU time each gateway process used per request: where the
machine's noise moves req/s by a quarter from one round to the next, it moves CPU per request
much less. And for one connection, where that noise is largest, ``alternating`` sends one
request at a time to each gateway in turn: a difference of a few hundredths of a millisecond
shows there.
"""

from __future__ import annotations

import itertools
import socket
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools
import proxy_load
import proxy_procs
from proxy_load import WrkResult

QUIET_BUSY = 0.15  # before each measurement, wait (a while) for the last one's tail to end
QUIET_WAIT_SEC = 10.0


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    url: str
    headers: Mapping[str, str]
    pid: int  # the one worker process, for its CPU time


def order(items: list[Variant], turn: int) -> list[Variant]:
    """The round's order: every order in turn, so that over ``len(items)!`` rounds each item
    takes each place, and follows each other item, equally often (what one measurement leaves
    behind, a gateway still writing its rows, falls on every other gateway alike)."""
    orders = list(itertools.permutations(items))
    return list(orders[turn % len(orders)])


def measure(base: Variant, others: list[Variant], path: str, body: Any,
            connections: tuple[int, ...], rounds: int, seconds: float,
            say: Callable[[str], None]) -> dict[str, Any]:
    """Per connection count and variant: the median ratio of req/s and difference of p50 and
    p99 (ms) against ``base`` over the rounds, with every round's figures beside them."""
    every = [base, *others]
    for variant in every:  # connections opened, caches filled, before anything counts
        proxy_load.wrk(variant.url + path, body, variant.headers, 32, 2)
    out: dict[str, Any] = {"rounds": rounds, "round_seconds": seconds, "base": base.label}
    for c in connections:
        runs: dict[str, list[WrkResult]] = {v.key: [] for v in every}
        cpu_us: dict[str, list[float]] = {v.key: [] for v in every}  # per request
        for turn in range(rounds):
            for variant in order(every, turn):
                proxy_procs.wait_quiet(QUIET_BUSY, QUIET_WAIT_SEC)
                before = proxy_procs.cpu_seconds(variant.pid)
                result = proxy_load.wrk(variant.url + path, body, variant.headers, c, seconds)
                used = proxy_procs.cpu_seconds(variant.pid) - before
                runs[variant.key].append(result)
                cpu_us[variant.key].append(used * 1e6 / max(result.requests, 1))
        per_c: dict[str, Any] = {}
        for variant in others:
            pairs = list(zip(runs[base.key], runs[variant.key], strict=True))
            ratios = [v.rps / b.rps for b, v in pairs if b.rps]
            p50 = [(v.p50_us - b.p50_us) / 1000 for b, v in pairs]
            p99 = [(v.p99_us - b.p99_us) / 1000 for b, v in pairs]
            per_c[variant.key] = {
                "label": variant.label,
                "rps_ratio": round(statistics.median(ratios), 4) if ratios else None,
                "p50_added_ms": round(statistics.median(p50), 4),
                "p99_added_ms": round(statistics.median(p99), 4),
                "rps_base": round(statistics.median(b.rps for b, _ in pairs), 1),
                "rps": round(statistics.median(v.rps for _, v in pairs), 1),
                "p50_base_ms": round(statistics.median(b.p50_us for b, _ in pairs) / 1000, 4),
                "mean_base_ms": round(statistics.median(b.mean_us for b, _ in pairs) / 1000, 4),
                "p50_ms": round(statistics.median(v.p50_us for _, v in pairs) / 1000, 4),
                "cpu_us_base": round(statistics.median(cpu_us[base.key]), 1),
                "cpu_us": round(statistics.median(cpu_us[variant.key]), 1),
                "rounds_cpu_us_added": [round(v - b, 1) for b, v in zip(
                    cpu_us[base.key], cpu_us[variant.key], strict=True)],
                "rounds_rps_ratio": [round(r, 3) for r in ratios],
                "rounds_p50_added_ms": [round(d, 3) for d in p50],
                "errors": sum(v.errors for v in runs[variant.key]),
            }
            s = per_c[variant.key]
            say(f"  c={c:<3} {variant.label:<26} req/s x{s['rps_ratio']:.3f} "
                f"(rounds {min(ratios):.3f}-{max(ratios):.3f}), p50 "
                f"{s['p50_added_ms']:+.3f} ms (rounds {min(p50):+.3f} to {max(p50):+.3f}), "
                f"CPU per request {s['cpu_us_base']:.0f} -> {s['cpu_us']:.0f} us")
        per_c["base_errors"] = sum(b.errors for b in runs[base.key])
        out[f"c{c}"] = per_c
    return out


class _Answer:
    """One answer read with llhttp (httptools), the way wrk reads them in C: the client's
    own time is the same whatever headers the answer has (Python's ``http.client`` spends
    some 3 µs on each header line, and would count that as the gateway's)."""

    def __init__(self) -> None:
        self.done = False

    def on_message_complete(self) -> None:
        self.done = True


class _Connection:
    def __init__(self, url: str, path: str, body: bytes, headers: Mapping[str, str]) -> None:
        where = urlsplit(url)
        self.sock = socket.create_connection((where.hostname, where.port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = "".join(f"{name}: {value}\r\n" for name, value in {
            **headers, "Host": where.netloc, "Content-Type": "application/json",
            "Content-Length": str(len(body))}.items())
        self.request = f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + body

    def ask(self) -> int:
        """One request, its whole answer read; its status."""
        answer = _Answer()
        parser = httptools.HttpResponseParser(answer)
        self.sock.sendall(self.request)
        while not answer.done:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the gateway closed the connection")
            parser.feed_data(data)
        return int(parser.get_status_code())


def alternating(base: Variant, others: list[Variant], path: str, body: bytes, requests: int,
                say: Callable[[str], None]) -> dict[str, Any]:
    """One request at a time, to each gateway in turn, on a kept-alive connection each.

    A shift in the machine's speed lasts seconds, a turn well under a millisecond, so it falls
    on every gateway alike: what is left of the difference between their latencies is theirs.
    The client's own time is in every latency alike (see ``_Answer``); it does not move the
    differences. Each turn starts one place further along the list, so that every gateway
    takes every place equally often and a request never follows one to the same gateway: a
    gateway asked twice in a row answers faster the second time (its memory is still in
    the processor's caches), and one that never is would seem to cost more.
    """
    every = [base, *others]
    conns = {v.key: _Connection(v.url, path, body, v.headers) for v in every}
    times: dict[str, list[float]] = {v.key: [] for v in every}
    failed: dict[str, int] = {v.key: 0 for v in every}
    try:
        for i in range(requests + 200):  # the first 200 turns only warm up
            turn = i % len(every) if len(every) > 2 else 0
            for variant in every[turn:] + every[:turn]:
                conn = conns[variant.key]
                start = time.perf_counter()
                status = conn.ask()
                took = time.perf_counter() - start
                if i >= 200:
                    times[variant.key].append(took)
                    failed[variant.key] += status != 200
    finally:
        for conn in conns.values():
            conn.sock.close()
    out: dict[str, Any] = {"requests": requests, "base": base.label,
                           "base_p50_ms": round(statistics.median(times[base.key]) * 1000, 4),
                           "base_mean_ms": round(statistics.fmean(times[base.key]) * 1000, 4),
                           "base_failed": failed[base.key]}
    for variant in others:
        p50 = (statistics.median(times[variant.key]) - statistics.median(times[base.key])) * 1000
        mean = (statistics.fmean(times[variant.key]) - statistics.fmean(times[base.key])) * 1000
        out[variant.key] = {
            "label": variant.label,
            "p50_ms": round(statistics.median(times[variant.key]) * 1000, 4),
            "p50_added_ms": round(p50, 4), "mean_added_ms": round(mean, 4),
            "failed": failed[variant.key]}
        say(f"  alternating, c=1 {variant.label:<26} p50 {p50:+.3f} ms, mean {mean:+.3f} ms "
            f"(base p50 {out['base_p50_ms']:.3f} ms)")
    return out
