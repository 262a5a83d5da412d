"""The load generators: wrk for rates and latency, hey where every response must be counted.

wrk runs with the same thread count against every target (two threads; one at concurrency 1,
where wrk needs at least one connection per thread) and prints its numbers through the
``done`` hook of ``bench/wrk/post.lua``. wrk stops at a deadline and drops the requests still in
flight, so its count of responses can be a few short of what the server answered; ``hey -n``
waits for every request it sent, which makes its count exact.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from common import ROOT

WRK_SCRIPT = ROOT / "bench" / "wrk" / "post.lua"
WRK_THREADS = 2


@dataclass
class WrkResult:
    connections: int
    threads: int
    duration_s: float
    requests: int  # responses wrk read in full
    ok: int  # of those, 2xx
    non_2xx: int
    socket_errors: int  # connect + read + write
    timeouts: int
    rps: float  # 2xx responses per second
    mean_us: float
    p50_us: int
    p90_us: int
    p99_us: int
    p999_us: int
    max_us: int

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors + self.timeouts

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "errors": self.errors}


def _header_args(headers: Mapping[str, str]) -> list[str]:
    return [f"{k}: {v}" for k, v in headers.items()]


def wrk(url: str, body: Path, headers: Mapping[str, str], connections: int,
        duration: float, timeout_s: int = 10) -> WrkResult:
    threads = min(WRK_THREADS, connections)
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(duration, 1):.0f}s",
           f"--timeout={timeout_s}s", "-s", str(WRK_SCRIPT), url, "--", str(body),
           *_header_args(headers)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120,
                          check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRK_RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    raw = json.loads(line.removeprefix("WRK_RESULT "))
    # wrk counts a status >= 400 as an error; this line counts every non-2xx/3xx response.
    match = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", done.stdout)
    non_2xx = max(int(match.group(1)) if match else 0, raw["status_errors"])
    requests = raw["requests"]
    seconds = raw["duration_us"] / 1e6
    ok = requests - non_2xx
    return WrkResult(
        connections=connections, threads=threads, duration_s=round(seconds, 3),
        requests=requests, ok=ok, non_2xx=non_2xx,
        socket_errors=raw["connect_errors"] + raw["read_errors"] + raw["write_errors"],
        timeouts=raw["timeouts"], rps=round(ok / seconds, 1), mean_us=raw["mean_us"],
        p50_us=raw["p50_us"], p90_us=raw["p90_us"], p99_us=raw["p99_us"],
        p999_us=raw["p999_us"], max_us=raw["max_us"],
    )


@dataclass
class HeyResult:
    requests: int
    connections: int
    seconds: float
    rps: float
    statuses: dict[int, int]
    errors: dict[str, int]

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)


def hey(url: str, body: Path, headers: Mapping[str, str], requests: int,
        connections: int) -> HeyResult:
    """``requests`` POSTs (rounded down to a multiple of ``connections``, as hey sends them)."""
    requests -= requests % connections
    cmd = ["hey", "-n", str(requests), "-c", str(connections), "-m", "POST",
           "-T", "application/json", "-D", str(body), "-t", "30"]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    done = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"hey failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    out = done.stdout
    statuses = {int(s): int(n) for s, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    errors: dict[str, int] = {}
    if "Error distribution:" in out:
        for count, message in re.findall(r"\[(\d+)\]\s+(.+)",
                                         out.split("Error distribution:", 1)[1]):
            errors[message.strip()] = int(count)
    total = re.search(r"Total:\s+([\d.]+) secs", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return HeyResult(requests, connections, float(total.group(1)) if total else 0.0,
                     float(rate.group(1)) if rate else 0.0, statuses, errors)
