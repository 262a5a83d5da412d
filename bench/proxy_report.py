"""The proxy benchmark's results as Markdown tables (bench/results/proxy.md)."""

from __future__ import annotations

import math
from typing import Any


def _ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.3f}"


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i in left else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _targets(results: dict[str, Any]) -> list[str]:
    rows = []
    for target in results.get("targets", {}).values():
        if "error" in target:
            rows.append([target.get("label", "?"), f"failed: {target['error'][:120]}",
                         *[""] * 8])
            continue
        runs = [target[k] for k in ("json_c1", "json_c32", "json_c128", "sse_c32")
                if k in target]
        errors = sum(r["errors"] for r in runs)
        c1, c32 = target.get("json_c1", {}), target.get("json_c32", {})
        rows.append([
            target["label"],
            _num(c32.get("rps")),
            _num(target.get("json_c128", {}).get("rps")),
            _num(target.get("sse_c32", {}).get("rps")),
            _ms(c1.get("p50_us")), _ms(c1.get("p99_us")),
            _ms(c32.get("p50_us")), _ms(c32.get("p99_us")),
            str(errors),
            f"{max(target.get('idle_cpu_busy') or [0]) * 100:.0f}%",
        ])
    return _table(["target", "req/s c=32", "req/s c=128", "SSE req/s c=32", "p50 c=1 (ms)",
                   "p99 c=1 (ms)", "p50 c=32 (ms)", "p99 c=32 (ms)", "errors",
                   "other load"], rows)


def _checks(results: dict[str, Any]) -> list[str]:
    rows = []
    for c in results.get("targets_check", []):
        met = "n/a" if c["met"] is None else ("met" if c["met"] else "**not met**")
        value = "-" if c["value"] is None else f"{c['value']}{c['unit'] and ' ' + c['unit']}"
        rows.append([c["check"], value, c["target"], met])
    return _table(["check", "measured", "target", ""], rows, left=(0, 3))


def _metering(results: dict[str, Any]) -> list[str]:
    meter = results.get("metering", {})
    lines = ["Rows in `inference.requests` for this run's organization "
             f"({meter.get('organization')}) against the 2xx responses the load generators "
             "counted:", ""]
    for key, g in meter.get("gateways", {}).items():
        e = g["exact"]
        extra = sum(r["extra"] for r in g["wrk_runs"])
        lines.append(
            f"- {key}: exact count (hey -n {e['requests']}, c=128): {e['ok']} responses 2xx, "
            f"{e['rows']} rows: **{'equal' if e['equal'] else 'NOT EQUAL'}**. wrk runs: "
            f"{g['responses_2xx_counted'] - e['ok']:,} 2xx counted, "
            f"{g['rows_2xx'] - e['rows']:,} rows with status 2xx ({extra} answered after wrk "
            f"stopped reading, at most one per connection per run): "
            f"**{'consistent' if g['wrk_runs_within_bound'] else 'INCONSISTENT'}**. "
            f"{g['rows']:,} rows in all; the count had stopped growing before the gateway was "
            f"stopped: {'yes' if g['flushed_before_stop'] else 'no'}."
        )
    streams = meter.get("streams", [])
    if streams:
        equal = all(s["equal"] for s in streams)
        lines.append(f"- streams through the gateway: {sum(s['ok'] for s in streams)} completed, "
                     f"{sum(s['rows'] for s in streams)} rows: "
                     f"**{'equal' if equal else 'NOT EQUAL'}**.")
    for h in meter.get("held_streams", []):
        lines.append(f"- {h['instance']}: {h['opened']} streams opened and hung up by the "
                     f"client, {h['rows']} rows ({h['disconnected']} marked disconnected).")
    return lines


def _streaming(results: dict[str, Any]) -> list[str]:
    stream = results.get("streaming")
    if not stream or "runs" not in stream:
        return [f"Streaming: {stream.get('error') if stream else 'skipped'}"]
    sim = stream["simulator"]
    rows = []
    for key, s in stream["runs"].items():
        path, conc = key.rsplit("_c", 1)
        rows.append([path, conc, f"{s['ok']}/{s['streams']}", _num(s["ttft_p50_ms"], 2),
                     _num(s["ttft_p99_ms"], 2), _num(s["total_p50_ms"], 1),
                     _num(s["total_p99_ms"], 1), f"{s['reads_per_event']:.2f}",
                     f"{s.get('idle_cpu_busy', 0) * 100:.0f}%"])
    head = (f"Simulator: time to first token {sim['ttft_ms']:.0f} ms, {sim['tpot_ms']:.0f} ms per "
            f"token, {sim['max_tokens']} tokens; gateway with {stream['gateway_workers']} "
            "workers. TTFT is measured to the first body bytes.")
    return [head, "", *_table(["path", "streams at once", "ok", "TTFT p50 (ms)",
                               "TTFT p99 (ms)", "total p50 (ms)", "total p99 (ms)",
                               "reads per event", "other load"], rows)]


def _memory(results: dict[str, Any]) -> list[str]:
    memory = results.get("memory")
    if not memory or "gateways" not in memory:
        return [f"Memory: {memory.get('error') if memory else 'skipped'}"]
    rows = []
    for g in memory["gateways"].values():
        if "rss_peak_mb" not in g:
            continue
        rows.append([f"{g['workers']} worker(s)", f"{g['opened']}/{memory['streams']}",
                     ", ".join(f"{x:.0f}" for x in g["rss_idle_mb"]),
                     ", ".join(f"{x:.0f}" for x in g["rss_peak_mb"]),
                     ", ".join(str(x) for x in g["sockets"]),
                     f"{g.get('idle_cpu_busy', 0) * 100:.0f}%"])
    return _table(["gateway", "streams open", "RSS idle per worker (MB)",
                   "RSS with the streams open (MB)", "sockets per worker", "other load"], rows)


def _profile(results: dict[str, Any]) -> list[str]:
    prof = results.get("profile")
    if not prof:
        return []
    if "top_own" not in prof:
        return ["## Profile", "", f"py-spy: {prof.get('error')}"]
    rows = [[str(i + 1), f"{f['own'] * 100:.1f}", f"{f['total'] * 100:.1f}", f"`{f['frame']}`"]
            for i, f in enumerate(prof["top_own"])]
    return ["## Where a gateway worker spends its time", "",
            f"py-spy, {prof['samples']} samples of one worker over {prof['sample_seconds']:.0f} "
            f"s, {prof['load']}. own = samples where the function was the innermost Python "
            "frame (time in C code it called included); total = anywhere on the stack.", "",
            *_table(["#", "own %", "total %", "function"], rows, left=(3,))]


def _costs(results: dict[str, Any]) -> list[str]:
    costs = results.get("costs")
    if not costs or "error" in costs:
        return [f"Not measured: {costs.get('error') if costs else 'skipped'}"]
    rows = []
    for key, per_c in costs.items():
        if not key.startswith("c") or not isinstance(per_c, dict):
            continue
        for v in per_c.values():
            if not isinstance(v, dict):
                continue
            rows.append([v["label"], key[1:], _num(v["rps_base"]), _num(v["rps"]),
                         f"{v['rps_ratio']:.3f}", f"{v['p50_base_ms']:.3f}",
                         f"{v['p50_ms']:.3f}", f"{v['p50_added_ms']:+.3f}",
                         f"{v.get('cpu_us_base', 0):.0f} → {v.get('cpu_us', 0):.0f}",
                         " ".join(f"{r:.2f}" for r in v["rounds_rps_ratio"])])
    turns = costs.get("alternating") or {}
    alternating = []
    if turns:
        rows2 = [[v["label"], f"{turns['base_p50_ms']:.3f}", f"{v['p50_ms']:.3f}",
                  f"{v['p50_added_ms']:+.3f}", f"{v['mean_added_ms']:+.3f}"]
                 for v in turns.values() if isinstance(v, dict)]
        alternating = [
            "", f"One request at a time to each gateway in turn, {turns['requests']:,} each "
            "(kept-alive connections, answers read with llhttp; the client's own time is in "
            "every latency alike):", "",
            *_table(["gateway", "base p50 (ms)", "p50 (ms)", "p50 added (ms)",
                     "mean added (ms)"], rows2)]
    return [f"Three one-worker gateways side by side, {costs['rounds']} rounds of "
            f"{costs['round_seconds']:.0f} s per gateway in an order that changes with each round; "
            f"medians over the rounds, each against the base ({costs['base']}) measured in "
            "the same round.", "",
            *_table(["gateway", "c", "base req/s", "req/s", "ratio", "base p50 (ms)",
                     "p50 (ms)", "p50 added (ms)", "CPU µs per request", "ratio per round"],
                    rows, left=(0, 9)), *alternating]


def render(results: dict[str, Any]) -> str:
    run = results["run"]
    m = run["machine"]
    lines = [
        f"# Proxy benchmark ({run['mode']} run, {run['started']})",
        "",
        f"{m['cpus']} cores ({m['cpu_model']}), {m['memory_gb']} GB; gateway "
        f"{run['gateway_revision']}, {run['versions']['nginx']}, {run['versions']['wrk']}. "
        f"{run['duration_s']:.0f} s per measurement after {run['warmup_s']:.0f} s of warm-up. "
        f"Load: {run['load_generator']}. Backend: {run['backend']}. Hop: {run['nginx_hop']}. "
        f"The {run['note']}. Load average before the run: {run['load_before']:.2f}.",
        "",
        "req/s counts 2xx responses only. Latency percentiles are wrk's, in ms. \"other load\": "
        "the most CPU that other work on the machine used in the second before one of the "
        "target's measurements (the run waits for it to drop below "
        f"{run.get('quiet_busy', 0.15) * 100:.0f}%, for a while).",
        "",
        *_targets(results),
        "",
        "## Targets",
        "",
        *_checks(results),
        "",
        "## What metrics and rate limits cost",
        "",
        *_costs(results),
        "",
        "## Metering",
        "",
        *_metering(results),
        "",
        "## Streaming",
        "",
        *_streaming(results),
        "",
        "## Memory",
        "",
        *_memory(results),
        "",
        *_profile(results),
    ]
    return "\n".join(lines).rstrip() + "\n"
