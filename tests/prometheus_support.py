"""A real Prometheus for the tests: started on a free port, scraping the given targets fast."""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness import Proc, free_port, start, wait_http

PROMETHEUS = shutil.which("prometheus")
SCRAPE_SEC = 1


def need_prometheus() -> str:
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (scripts/test.sh installs Debian's package)")
    return PROMETHEUS


def start_prometheus(tmp: Path, targets: list[str], rules: Path | None = None) -> Proc:
    """Prometheus scraping ``targets`` (host:port) every second, with ``rules`` loaded."""
    binary = need_prometheus()
    port = free_port()
    home = tmp / f"prometheus-{port}"
    home.mkdir()
    rule_files = f"rule_files: ['{rules}']\n" if rules is not None else ""
    (home / "prometheus.yml").write_text(
        f"global:\n  scrape_interval: {SCRAPE_SEC}s\n  evaluation_interval: {SCRAPE_SEC}s\n"
        f"{rule_files}"
        "scrape_configs:\n  - job_name: gateway\n    static_configs:\n"
        f"      - targets: {json.dumps(targets)}\n")
    proc = start([binary, f"--config.file={home / 'prometheus.yml'}",
                  f"--storage.tsdb.path={home / 'data'}",
                  f"--web.listen-address=127.0.0.1:{port}"], {}, home / "log", port)
    wait_http(f"{proc.url}/-/ready", proc.popen, timeout=60)
    return proc


def query(prometheus: Proc, promql: str) -> list[dict[str, Any]]:
    """An instant query through the HTTP API: the result's samples."""
    url = f"{prometheus.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def scalar(prometheus: Proc, promql: str) -> float | None:
    """The one value of a query that aggregates to one sample (None when it has none)."""
    result = query(prometheus, promql)
    if not result:
        return None
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.5)
