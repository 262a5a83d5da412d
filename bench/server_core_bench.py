"""Which server core for the ``/v1`` path: the same load, in one run, three interleaved rounds.

    python bench/server_core_bench.py [--duration 8] [--rounds 3] [--quick] [--no-compiled]

Targets, all on 127.0.0.1, in front of the same fixed nginx backend (bench/nginx/backend.conf):
  nginx hop     nginx as a keep-alive reverse proxy: the yardstick
  aiohttp       ``inference-gateway serve`` with HTTP_CORE=aiohttp (the default): tenant
                headers, metering into the dev Postgres (scratch database bench_server_core),
                metrics on
  protocol      ``inference-gateway serve`` with HTTP_CORE=protocol: the same gateway, handler,
                relay, pools, meter and observers, behind the asyncio.Protocol core over llhttp
                (proxy/http)
  uvicorn       bench/server_core_asgi.py: uvicorn (httptools, uvloop) and a bare ASGI app that
                forwards through the gateway's upstream client; no tenant, no metering
  ... compiled  the two gateway targets again on the compiled build (scripts/build-compiled.sh,
                made first in the run; --no-compiled leaves them out)
The gateway targets run with one worker and with two. Each round measures every target at
c=1, c=32 and c=128 with wrk (a warm-up first), so a busy spell hits every target alike.
Reported: median req/s over the rounds, p50/p99 at c=1, and the CPU time of the target's
processes per request. Every response the two metering targets answered must be a row.

Writes bench/results/server_core.json and .md (--quick: under .dev/bench/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import proxy_load
import proxy_procs
from proxy_bench import (
    CHAT_PATH,
    JSON_BODY,
    MODEL,
    git_revision,
    machine,
    raise_fd_limit,
    rows_by_instance,
    run_async,
    say,
    wait_rows_stable,
)
from proxy_procs import FIXTURES, Service

from inference_gateway.db.migrate import migrate

from common import ROOT, dev_database_url, scratch_database

RESULTS = ROOT / "bench" / "results"
SCRATCH = ROOT / ".dev" / "bench"
QUIET_BUSY = 0.15
CONNECTIONS = (1, 32, 128)


@dataclass
class Target:
    key: str
    label: str
    services: list[Service]
    metered: bool
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.services[0].url

    def pids(self) -> list[int]:
        pids: list[int] = []
        for service in self.services:
            pids += [service.pid, *descendants(service.pid)]
        return pids


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    for kid in proxy_procs.children(pid):
        out += [kid, *descendants(kid)]
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User and system time of the processes so far, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / tick


def build_compiled(tmp: Path) -> Path:
    """The compiled build, installed into a directory to put first on PYTHONPATH."""
    out = tmp / "compiled"
    subprocess.run([str(ROOT / "scripts" / "build-compiled.sh"), str(out)], check=True,
                   env={**os.environ, "PYTHON": sys.executable}, stdout=subprocess.DEVNULL)
    return out / "site"


def start_uvicorn(tmp: Path, backend: str) -> Service:
    port = proxy_procs.free_port()
    service = proxy_procs.start("uvicorn", [sys.executable, str(ROOT / "bench" /
                                                                "server_core_asgi.py"),
                                            str(port), backend], tmp / "uvicorn.log", port)
    proxy_procs.wait_http(service, "/ready", timeout=60)
    return service


def measure(target: Target, org: str, round_no: int, duration: float, warmup: float,
            quiet_wait: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in CONNECTIONS:
        busy = proxy_procs.wait_quiet(QUIET_BUSY, quiet_wait)
        url = target.url + CHAT_PATH
        tenant = {"X-TEMBO-ORG": org, "X-TEMBO-INSTANCE": f"{target.key}-r{round_no}-c{c}"}
        warm = proxy_load.wrk(url, JSON_BODY, {**tenant, "X-TEMBO-INSTANCE":
                                               tenant["X-TEMBO-INSTANCE"] + "-warmup"},
                              c, warmup)
        pids = target.pids()
        cpu0 = cpu_seconds(pids)
        result = proxy_load.wrk(url, JSON_BODY, tenant, c, duration)
        cpu = cpu_seconds(pids) - cpu0
        out[f"c{c}"] = {**result.as_dict(), "idle_cpu_busy": round(busy, 2),
                        "cpu_us_per_request": round(cpu / max(result.requests, 1) * 1e6, 1),
                        "warmup_ok": warm.ok, "warmup_connections": warm.connections}
        say(f"  round {round_no} {target.label:<26} c={c:<4} {result.rps:>9,.0f} req/s  "
            f"p50 {result.p50_us / 1000:6.3f} ms  p99 {result.p99_us / 1000:6.3f} ms  "
            f"CPU {out[f'c{c}']['cpu_us_per_request']:6.1f} us/req  errors {result.errors}  "
            f"(other load {busy:.0%})")
    return out


def summarise(target: Target) -> dict[str, Any]:
    """Medians over the rounds."""
    out: dict[str, Any] = {"label": target.label}
    for c in CONNECTIONS:
        runs = [r[f"c{c}"] for r in target.rounds if f"c{c}" in r]
        if not runs:
            continue
        out[f"c{c}"] = {
            "rps": round(statistics.median(r["rps"] for r in runs), 1),
            "p50_us": statistics.median(r["p50_us"] for r in runs),
            "p99_us": statistics.median(r["p99_us"] for r in runs),
            "cpu_us_per_request": round(statistics.median(r["cpu_us_per_request"]
                                                          for r in runs), 1),
            "errors": sum(r["errors"] for r in runs),
            "rps_each_round": [r["rps"] for r in runs],
            "other_load": [r["idle_cpu_busy"] for r in runs],
        }
    return out


def metering(database_url: str, org: str, targets: list[Target]) -> dict[str, Any]:
    """Rows stored against 2xx responses, for the targets that meter."""
    rows = run_async(rows_by_instance(database_url, org))
    out: dict[str, Any] = {}
    for target in targets:
        if not target.metered:
            continue
        served = stored = bound = 0
        for i, r in enumerate(target.rounds, 1):
            for c in CONNECTIONS:
                run = r[f"c{c}"]
                instance = f"{target.key}-r{i}-c{c}"
                for suffix, ok, conns in (("", run["ok"], run["connections"]),
                                          ("-warmup", run["warmup_ok"],
                                           run["warmup_connections"])):
                    served += ok
                    stored += rows.get(instance + suffix, {}).get("rows_2xx", 0)
                    bound += conns
        out[target.key] = {"responses_2xx": served, "rows_2xx": stored,
                           "within_bound": 0 <= stored - served <= bound}
    return out


def ratios(summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def rps(key: str, c: int) -> float | None:
        return summary.get(key, {}).get(f"c{c}", {}).get("rps")

    out: dict[str, Any] = {}
    for build in ("", "_compiled"):
        for workers in (1, 2):
            a, p = f"aiohttp_{workers}w{build}", f"protocol_{workers}w{build}"
            for c in (32, 128):
                ra, rp = rps(a, c), rps(p, c)
                if ra and rp:
                    out[f"protocol_over_aiohttp_{workers}w{build}_c{c}"] = round(rp / ra, 2)
            for key in (a, p):
                rk, hop, pure = rps(key, 32), rps("nginx_hop", 32), rps(key.removesuffix(build), 32)
                if rk and hop:
                    out[f"{key}_over_nginx_hop_c32"] = round(rk / hop, 3)
                if build and rk and pure:
                    out[f"{key}_over_pure_c32"] = round(rk / pure, 2)
    uv, a1 = rps("uvicorn", 32), rps("aiohttp_1w", 32)
    if uv and a1:
        out["uvicorn_bare_over_aiohttp_1w_c32"] = round(uv / a1, 2)
    hop1 = summary.get("nginx_hop", {}).get("c1", {})
    for key, target in summary.items():
        c1 = target.get("c1")
        if key != "nginx_hop" and c1 and hop1:
            out[f"{key}_added_p50_ms_vs_hop"] = round((c1["p50_us"] - hop1["p50_us"]) / 1000, 3)
            out[f"{key}_added_p99_ms_vs_hop"] = round((c1["p99_us"] - hop1["p99_us"]) / 1000, 3)
    return out


def render(results: dict[str, Any]) -> str:
    run = results["run"]
    lines = [
        "# Server core: aiohttp against a protocol-level server over httptools",
        "",
        f"Run of {run['started']} at {run['gateway_revision']}, {run['machine']['cpus']} cores "
        f"({run['machine']['cpu_model']}), {run['rounds']} interleaved rounds of "
        f"{run['duration_s']:.0f} s per measurement; medians over the rounds. The load "
        "generator, every server and Postgres share the cores.",
        "",
        "| target | req/s c=32 | req/s c=128 | p50 c=1 (ms) | p99 c=1 (ms) | "
        "CPU µs/req c=32 | other load |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for summary in results["summary"].values():
        c1, c32, c128 = summary.get("c1", {}), summary.get("c32", {}), summary.get("c128", {})
        loads = [x for c in ("c1", "c32", "c128") for x in summary.get(c, {}).get(
            "other_load", [])]
        lines.append(
            f"| {summary['label']} | {c32.get('rps', 0):,.0f} | {c128.get('rps', 0):,.0f} | "
            f"{c1.get('p50_us', 0) / 1000:.3f} | {c1.get('p99_us', 0) / 1000:.3f} | "
            f"{c32.get('cpu_us_per_request', 0):.0f} | {max(loads, default=0):.0%} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in results["ratios"].items()]
    lines += ["", "| metering (rows against 2xx responses) | responses | rows | ok |",
              "|---|---:|---:|---|"]
    for key, m in results["metering"].items():
        lines.append(f"| {key} | {m['responses_2xx']:,} | {m['rows_2xx']:,} | "
                     f"{'yes' if m['within_bound'] else 'NO'} |")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def stopping(services: list[Service]) -> Iterator[None]:
    """Stop every server started, also on SIGTERM or Ctrl-C."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        for service in reversed(services):
            with contextlib.suppress(Exception):
                service.stop(timeout=30)
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 s per measurement, one round")
    parser.add_argument("--quiet-wait", type=float, default=30.0)
    parser.add_argument("--no-compiled", action="store_true",
                        help="leave out the gateway on the compiled build")
    args = parser.parse_args(argv)
    duration = 2.0 if args.quick else args.duration
    rounds = 1 if args.quick else args.rounds
    warmup = max(1.0, round(duration / 4))
    out_dir = SCRATCH if args.quick else RESULTS
    raise_fd_limit()
    tmp = Path(tempfile.mkdtemp(prefix="server-core-bench-"))
    database_url = run_async(scratch_database(dev_database_url(), "bench_server_core"))
    run_async(migrate(database_url))
    org = f"core-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"
    results: dict[str, Any] = {"run": {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "gateway_revision": git_revision(),
        "machine": machine(), "duration_s": duration, "warmup_s": warmup, "rounds": rounds,
        "organization": org, "load_before": os.getloadavg()[0],
        "load_generator": f"wrk -t{proxy_load.WRK_THREADS} (-t1 at c=1), bench/wrk/post.lua",
    }}
    services: list[Service] = []
    ok = True
    with stopping(services):
        fixture = (FIXTURES / "chat_completion.json").read_text()
        backend = proxy_procs.start_nginx(
            tmp, "backend", "backend.conf", 2,
            {"FIXTURES": str(FIXTURES), "CHAT_COMPLETION": proxy_procs.nginx_string(fixture)})
        services.append(backend)
        hop = proxy_procs.start_nginx(tmp, "nginx_hop", "hop.conf", 2,
                                      {"BACKEND_PORT": str(backend.port)})
        services.append(hop)
        for svc in (backend, hop):
            proxy_procs.wait_http(svc, CHAT_PATH, method="POST", body=JSON_BODY.read_bytes())
        targets = [Target("nginx_hop", "nginx hop (2 workers)", [hop], False)]
        builds: list[tuple[str, str, dict[str, str]]] = [("", "", {})]
        if not args.no_compiled:
            say("server core benchmark: building the compiled gateway")
            site = build_compiled(tmp)
            builds.append(("_compiled", ", compiled", {"PYTHONPATH": str(site)}))
        for build, build_label, env in builds:
            for workers in (1, 2):
                for core, label in (("aiohttp", "aiohttp"), ("protocol", "the protocol core")):
                    key = f"{core}_{workers}w{build}"
                    gw = proxy_procs.start_gateway(tmp, key, database_url, {MODEL: backend.url},
                                                   workers, {"HTTP_CORE": core, **env})
                    services.append(gw)
                    targets.append(Target(key, f"gateway on {label}, {workers}w{build_label}",
                                          [gw], True))
        uv = start_uvicorn(tmp, backend.url)
        services.append(uv)
        targets.append(Target("uvicorn", "uvicorn + bare ASGI app, 1w", [uv], False))
        say(f"server core benchmark: {rounds} round(s), {duration:.0f} s per measurement, "
            f"{os.cpu_count()} cores shared by the load generator and every server")
        for i in range(1, rounds + 1):
            for target in targets:
                target.rounds.append(measure(target, org, i, duration, warmup,
                                             args.quiet_wait))
        results["rounds"] = {t.key: t.rounds for t in targets}
        results["summary"] = {t.key: summarise(t) for t in targets}
        results["ratios"] = ratios(results["summary"])
        for target in targets:  # stop the gateways, which drains their spools
            if target.metered:
                for service in target.services:
                    service.stop(timeout=60)
        run_async(wait_rows_stable(database_url, org, quiet=1.0))
        results["metering"] = metering(database_url, org, targets)
        ok = all(m["within_bound"] for m in results["metering"].values())
    results["run"]["load_after"] = os.getloadavg()[0]
    report = render(results)
    say("\n" + report)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "server_core.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "server_core.md").write_text(report)
    say(f"wrote {(out_dir / 'server_core.json').relative_to(ROOT)} and server_core.md")
    if ok:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        say(f"rows and responses disagree; logs kept in {tmp}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
