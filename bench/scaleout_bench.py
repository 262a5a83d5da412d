"""Two gateway instances against one, behind HAProxy, sharing one Postgres, in one run.

    scripts/bench.sh                       # after the proxy benchmark
    .venv/bin/python bench/scaleout_bench.py [--duration 10] [--rounds 3] [--quick]

Every configuration but the first goes through the same balancer (deploy/haproxy/haproxy.cfg,
as shipped); all go to the same fixed-cost backend (nginx with a recorded vLLM answer,
bench/nginx/backend.conf), with metering on into the dev Postgres (scratch database
bench_scaleout):

  one instance, no balancer    wrk straight to the gateway: what the balancer's hop costs
  one instance, 1 worker       both of HAProxy's servers are the same instance
  two instances, 1 worker each own ports, own spools, one Postgres
  one instance, 2 workers      the same CPU as two instances, in one process tree

Every layout runs at once (idle ones cost next to nothing) and they are measured in turn, round
after round (3 by default), so that other work on the machine weighs on all of them alike; each
layout's median round is reported. Measured with wrk (two threads) at c=32 and c=128 after a
warm-up: 2xx responses per second, latency, and the CPU time the gateways' processes (and
HAProxy) spent per 2xx response, read from /proc, which other work on the machine disturbs less
than req/s. Then every instance is stopped (it drains its spool) and the rows of each layout
are counted against the 2xx responses wrk saw.

Writes bench/results/scaleout.json (--quick: .dev/bench/scaleout.json). The load generator,
balancer, gateways, backend and Postgres all share this machine's cores: on two cores a second
instance cannot double anything, and the numbers say how much it adds here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import proxy_load
import proxy_procs
from proxy_procs import FIXTURES, Service

from inference_gateway.db.migrate import migrate

from common import ROOT, dev_database_url, scratch_database

MODEL = "facebook/opt-125m"
CHAT_PATH = "/v1/chat/completions"
BODY = FIXTURES / "chat_request.json"
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
CONCURRENCY = (32, 128)
QUIET_BUSY = 0.15


@dataclass(frozen=True)
class Layout:
    key: str
    label: str
    instances: int
    workers: int
    balanced: bool = True


LAYOUTS = (
    Layout("direct_1w", "one instance, no balancer", 1, 1, balanced=False),
    Layout("one_1w", "one instance, 1 worker", 1, 1),
    Layout("two_1w", "two instances, 1 worker each", 2, 1),
    Layout("one_2w", "one instance, 2 workers", 1, 2),
)


def say(text: str) -> None:
    print(text, flush=True)


def start_haproxy(tmp: Path, name: str, gateways: list[Service]) -> Service:
    """The shipped configuration; with one instance, both of its servers point at it."""
    port = proxy_procs.free_port()
    second = gateways[1] if len(gateways) > 1 else gateways[0]
    env = {"LISTEN": f"127.0.0.1:{port}", "GATEWAY_1": f"127.0.0.1:{gateways[0].port}",
           "GATEWAY_2": f"127.0.0.1:{second.port}"}
    service = proxy_procs.start(name, ["haproxy", "-db", "-f", str(HAPROXY_CFG)],
                                tmp / f"{name}.log", port, env)
    proxy_procs.wait_http(service, "/ready")
    return service


async def count_rows(database_url: str, org: str) -> dict[str, int]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT instance_id, count(*) AS n FROM inference.requests "
            "WHERE organization_id = $1 AND status BETWEEN 200 AND 299 GROUP BY instance_id", org)
        return {r["instance_id"]: r["n"] for r in rows}
    finally:
        await conn.close()


@dataclass
class Stack:
    """One layout's running processes: its gateway instances and, if balanced, HAProxy."""

    layout: Layout
    gateways: list[Service]
    balancer: Service | None

    @property
    def url(self) -> str:
        return (self.balancer or self.gateways[0]).url + CHAT_PATH

    def gateway_pids(self) -> list[int]:
        """Every process of every instance: the ``serve`` process and its workers."""
        return [pid for g in self.gateways for pid in (g.pid, *proxy_procs.children(g.pid))]

    def stop(self) -> None:
        if self.balancer is not None:
            self.balancer.stop()
        for gateway in self.gateways:
            gateway.stop()  # SIGTERM: the spool is drained before it exits


def start_stack(layout: Layout, tmp: Path, database_url: str, backend: Service) -> Stack:
    stack = Stack(layout, [], None)
    try:
        for i in range(layout.instances):
            stack.gateways.append(proxy_procs.start_gateway(
                tmp, f"{layout.key}-{i + 1}", database_url, {MODEL: backend.url},
                layout.workers))
        if layout.balanced:
            stack.balancer = start_haproxy(tmp, f"haproxy-{layout.key}", stack.gateways)
    except Exception:
        stack.stop()
        raise
    return stack


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time the processes have used so far."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def measure(stack: Stack, connections: int, org: str, duration: float, warmup: float,
            quiet_wait: float) -> dict[str, Any]:
    """req/s and latency, and the CPU the gateways (and HAProxy) spent per 2xx response: the
    CPU per response depends less than req/s on what else the machine is doing."""
    busy = proxy_procs.wait_quiet(QUIET_BUSY, quiet_wait)
    tenant = {"X-TEMBO-ORG": org, "X-TEMBO-INSTANCE": f"{stack.layout.key}-c{connections}"}
    proxy_load.wrk(stack.url, BODY, {**tenant, "X-TEMBO-INSTANCE": "warmup"}, connections,
                   warmup)
    pids = stack.gateway_pids()
    balancer = [stack.balancer.pid] if stack.balancer is not None else []
    before, before_lb = cpu_seconds(pids), cpu_seconds(balancer)
    result = proxy_load.wrk(stack.url, BODY, tenant, connections, duration)
    gateway_us = (cpu_seconds(pids) - before) / max(result.ok, 1) * 1e6
    balancer_us = (cpu_seconds(balancer) - before_lb) / max(result.ok, 1) * 1e6
    say(f"  {stack.layout.label:30} c={connections:<4} {result.rps:>9,.0f} req/s  "
        f"p50 {result.p50_us / 1000:.2f} ms  p99 {result.p99_us / 1000:.2f} ms  "
        f"gateway CPU {gateway_us:.0f} us/req  errors {result.errors}  other load {busy:.0%}")
    return {**result.as_dict(), "other_load": round(busy, 3),
            "gateway_cpu_us_per_request": round(gateway_us, 1),
            "balancer_cpu_us_per_request": round(balancer_us, 1)}


def summarise(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The median round of one layout at one concurrency, and every round's numbers."""
    ordered = sorted(samples, key=lambda r: r["rps"])
    middle = ordered[len(ordered) // 2]
    cpu = sorted(r["gateway_cpu_us_per_request"] for r in samples)[len(samples) // 2]
    lb = sorted(r["balancer_cpu_us_per_request"] for r in samples)[len(samples) // 2]
    return {"rps": middle["rps"], "p50_us": middle["p50_us"], "p99_us": middle["p99_us"],
            "gateway_cpu_us_per_request": cpu, "balancer_cpu_us_per_request": lb,
            "errors": sum(r["errors"] for r in samples), "ok": sum(r["ok"] for r in samples),
            "connections": middle["connections"], "rounds": samples}


def metering(results: dict[str, Any], rows: dict[str, int]) -> dict[str, Any]:
    """Rows against wrk's 2xx count: never fewer, and at most one more per connection and round
    (wrk stops reading at its deadline, after the gateway answered)."""
    checked: dict[str, Any] = {}
    for key, layout in results.items():
        for run_key, run in layout["runs"].items():
            stored = rows.get(f"{key}-{run_key}", 0)
            extra = stored - run["ok"]
            bound = run["connections"] * len(run["rounds"])
            checked[f"{key}-{run_key}"] = {"ok": run["ok"], "rows": stored,
                                           "consistent": 0 <= extra <= bound}
    return checked


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--quick", action="store_true", help="3 s runs, results under .dev/")
    parser.add_argument("--rounds", type=int, default=None,
                        help="measure every layout this many times, interleaved (default 3; "
                             "--quick: 1)")
    parser.add_argument("--quiet-wait", type=float, default=30.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    if shutil.which("haproxy") is None:
        say("scale-out bench: haproxy is not installed (scripts/bench.sh installs it)")
        return 1
    duration = 3.0 if args.quick else args.duration
    rounds = args.rounds or (1 if args.quick else 3)
    warmup = max(1.0, duration / 5)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    tmp = Path(tempfile.mkdtemp(prefix="scaleout-bench-"))
    database_url = asyncio.run(scratch_database(dev_database_url(), "bench_scaleout"))
    asyncio.run(migrate(database_url))
    org = f"scaleout-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"
    say(f"scale-out benchmark: {duration:.0f} s per measurement after {warmup:.0f} s of warm-up; "
        f"{os.cpu_count()} cores shared by wrk, HAProxy, the gateways, nginx and Postgres")
    fixture = (FIXTURES / "chat_completion.json").read_text()
    backend = proxy_procs.start_nginx(
        tmp, "backend", "backend.conf", 1,
        {"FIXTURES": str(FIXTURES), "CHAT_COMPLETION": proxy_procs.nginx_string(fixture)})
    stacks: list[Stack] = []
    samples: dict[tuple[str, int], list[dict[str, Any]]] = {}
    try:
        proxy_procs.wait_http(backend, CHAT_PATH, method="POST", body=BODY.read_bytes())
        for layout in LAYOUTS:
            stacks.append(start_stack(layout, tmp, database_url, backend))
        # Every layout is measured once per round, so a change in what else runs on the machine
        # weighs on all of them alike; each layout's median round is reported.
        for i in range(rounds):
            say(f"round {i + 1} of {rounds}")
            for stack in stacks:
                for connections in CONCURRENCY:
                    samples.setdefault((stack.layout.key, connections), []).append(
                        measure(stack, connections, org, duration, warmup, args.quiet_wait))
    finally:
        for stack in stacks:
            stack.stop()
        backend.stop()
    layouts = {layout.key: {"label": layout.label, "instances": layout.instances,
                            "workers": layout.workers, "balanced": layout.balanced,
                            "runs": {f"c{c}": summarise(samples[(layout.key, c)])
                                     for c in CONCURRENCY}}
               for layout in LAYOUTS}
    checked = metering(layouts, asyncio.run(count_rows(database_url, org)))

    def rps(key: str, c: int) -> float:
        return float(layouts[key]["runs"][f"c{c}"]["rps"])

    ratios = {f"two_instances_vs_one_c{c}": round(rps("two_1w", c) / rps("one_1w", c), 3)
              for c in CONCURRENCY}
    ratios |= {f"two_instances_vs_two_workers_c{c}": round(rps("two_1w", c) / rps("one_2w", c), 3)
               for c in CONCURRENCY}
    ratios |= {f"balancer_hop_c{c}": round(rps("one_1w", c) / rps("direct_1w", c), 3)
               for c in CONCURRENCY}

    def cpu(key: str, c: int) -> float:
        return float(layouts[key]["runs"][f"c{c}"]["gateway_cpu_us_per_request"])

    ratios |= {f"gateway_cpu_per_request_two_instances_vs_one_c{c}":
               round(cpu("two_1w", c) / cpu("one_1w", c), 3) for c in CONCURRENCY}
    results = {
        "run": {"started_by": "bench/scaleout_bench.py", "mode": "quick" if args.quick else "full",
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "duration_s": duration,
                "warmup_s": warmup, "rounds": rounds, "reported": "median round",
                "cores": os.cpu_count(), "revision": revision(),
                "haproxy": haproxy_version(), "balancer": "deploy/haproxy/haproxy.cfg",
                "backend": "nginx, 1 worker, bench/fixtures/chat_completion.json",
                "database": "dev Postgres, scratch database bench_scaleout",
                "organization": org},
        "layouts": layouts,
        "ratios": ratios,
        "metering": checked,
    }
    say("")
    for c in CONCURRENCY:
        say(f"c={c}: two instances / one = {ratios[f'two_instances_vs_one_c{c}']:.2f} x; "
            f"two instances / one instance with two workers = "
            f"{ratios[f'two_instances_vs_two_workers_c{c}']:.2f} x; one instance through "
            f"HAProxy / direct = {ratios[f'balancer_hop_c{c}']:.2f} x; gateway CPU per request, "
            f"two instances / one = "
            f"{ratios[f'gateway_cpu_per_request_two_instances_vs_one_c{c}']:.2f} x")
    consistent = all(m["consistent"] for m in checked.values())
    say(f"metering: rows against 2xx responses, every run: "
        f"{'consistent' if consistent else 'NOT consistent'}")
    out = (ROOT / ".dev" / "bench" if args.quick else ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaleout.json").write_text(json.dumps(results, indent=2) + "\n")
    say(f"wrote {(out / 'scaleout.json').relative_to(ROOT)}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if consistent else 1


def revision() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=ROOT, check=False)
    return done.stdout.strip() or "unknown"


def haproxy_version() -> str:
    done = subprocess.run(["haproxy", "-v"], capture_output=True, text=True, check=False)
    return done.stdout.split("\n", 1)[0].removeprefix("HAProxy version ").split(" ")[0]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
