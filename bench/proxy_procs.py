"""The processes the proxy benchmark runs: nginx, the simulator, the gateway and LiteLLM.

Every process is started in its own session with its output in a log file under the run's
scratch directory, and stopped by its own pid. Nothing here listens on anything but 127.0.0.1.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common import ROOT

BENCH = ROOT / "bench"
FIXTURES = BENCH / "fixtures"
NGINX_TEMPLATES = BENCH / "nginx"
LITELLM_VENV = ROOT / ".dev" / "litellm-venv"
GATEWAY_CLI = [sys.executable, "-m", "inference_gateway"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    """One started server: its process, where it listens and where it logs."""

    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log: Path
    info: dict[str, object] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def start(name: str, args: list[str], log: Path, port: int,
          env: Mapping[str, str] | None = None, drop_env: tuple[str, ...] = ()) -> Service:
    full_env = {k: v for k, v in os.environ.items() if k not in drop_env}
    full_env.update(env or {})
    with log.open("ab") as out:
        popen = subprocess.Popen(args, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
    return Service(name, popen, port, log)


def wait_http(service: Service, path: str, timeout: float = 60, *, method: str = "GET",
              body: bytes | None = None, headers: Mapping[str, str] | None = None) -> None:
    """Wait until ``path`` answers 200; fail early if the process exits."""
    url = service.url + path
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if not service.alive():
            raise RuntimeError(f"{service.name} exited with {service.popen.returncode} before "
                               f"{url} answered:\n{service.log_tail()}")
        request = urllib.request.Request(url, data=body, method=method,
                                         headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                if resp.status == 200:
                    resp.read()
                    return
                last = resp.status
        except Exception as exc:
            last = exc
        time.sleep(0.2)
    service.stop(signal.SIGKILL)
    raise RuntimeError(f"{service.name}: {url} did not answer 200 within {timeout:.0f}s "
                       f"({last}):\n{service.log_tail()}")


# -- nginx --------------------------------------------------------------------------------------


def nginx_string(text: str) -> str:
    """``text`` as one single-quoted nginx config parameter."""
    if "$" in text:
        raise ValueError("nginx would read '$' as a variable")
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    if len(escaped) > 4000:
        raise ValueError("nginx limits one parameter to 4 KB")
    return f"'{escaped}'"


def nginx_version() -> str:
    out = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")


def start_nginx(tmp: Path, name: str, template: str, workers: int,
                values: Mapping[str, str]) -> Service:
    """Render ``bench/nginx/<template>`` and run it in the foreground with its own prefix."""
    prefix = tmp / name
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    text = (NGINX_TEMPLATES / template).read_text()
    filled = {
        # Workers run as root when the master does, so they can read the fixtures anywhere.
        "USER": "user root;" if os.geteuid() == 0 else "",
        "WORKERS": str(workers),
        "PREFIX": str(prefix),
        "PORT": str(port),
        **values,
    }
    for key, value in filled.items():
        text = text.replace(f"@{key}@", value)
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    check = subprocess.run(["nginx", "-t", "-q", "-p", str(prefix), "-c", str(conf),
                            "-e", str(prefix / "error.log")],
                           capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise RuntimeError(f"nginx {name}: bad configuration:\n{check.stderr}")
    service = start(name, ["nginx", "-p", str(prefix), "-c", str(conf),
                           "-e", str(prefix / "error.log"), "-g", "daemon off;"],
                    prefix / "stdout.log", port)
    service.info = {"workers": workers, "config": template}
    return service


# -- simulator and gateway ----------------------------------------------------------------------


def start_simulator(tmp: Path, model: str, ttft_ms: float, tpot_ms: float,
                    max_tokens: int) -> Service:
    port = free_port()
    service = start(f"simulator-{model}",
                    [*GATEWAY_CLI, "simulate", "--port", str(port), "--model", model,
                     "--ttft-ms", str(ttft_ms), "--tpot-ms", str(tpot_ms),
                     "--default-max-tokens", str(max_tokens),
                     # A fixed-cost backend: no scheduler of vLLM's size queues the streams.
                     "--max-num-seqs", "100000", "--num-gpu-blocks-override", "10000000"],
                    tmp / f"simulator-{port}.log", port)
    wait_http(service, "/health")
    service.info = {"model": model, "ttft_ms": ttft_ms, "tpot_ms": tpot_ms,
                    "max_tokens": max_tokens}
    return service


def start_gateway(tmp: Path, name: str, database_url: str, models: Mapping[str, str],
                  workers: int, extra: Mapping[str, str] | None = None) -> Service:
    """``inference-gateway serve`` with metering on: every request is spooled and copied."""
    port = free_port()
    env = {
        "DATABASE_URL": database_url,
        "MODEL_SERVICE_PORT_MAP": ",".join(f"{m}={u}" for m, u in models.items()),
        "WEBSERVER_HOST": "127.0.0.1",
        "WEBSERVER_PORT": str(port),
        "WEBSERVER_WORKERS": str(workers),
        "SPOOL_DIR": str(tmp / f"spool-{name}-{port}"),
        "MIGRATE_ON_START": "false",
        **(extra or {}),
    }
    service = start(name, [*GATEWAY_CLI, "serve"], tmp / f"{name}-{port}.log", port, env)
    wait_http(service, "/ready", timeout=60)
    service.info = {"workers": workers}
    return service


def worker_pids(service: Service, expected: int) -> list[int]:
    """The processes that serve requests: the ``serve`` process itself, or its children."""
    if expected == 1:
        return [service.pid]
    deadline = time.monotonic() + 10
    kids: list[int] = []
    while time.monotonic() < deadline:
        kids = children(service.pid)
        if len(kids) >= expected:
            break
        time.sleep(0.1)
    return kids


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(p) for p in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return sorted(kids)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith("socket:"):
                count += 1
        except OSError:
            continue
    return count


def wait_quiet(threshold: float, patience: float) -> float:
    """Wait up to ``patience`` seconds for the CPU to be busy less than ``threshold`` over a
    second (other work on the machine); returns the last fraction measured."""
    deadline = time.monotonic() + patience
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy()
    return busy


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPU time spent busy over ``seconds``, from /proc/stat."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


# -- LiteLLM ------------------------------------------------------------------------------------


def ensure_litellm(log: Path) -> str | None:
    """Install ``litellm[proxy]`` into its own virtualenv once. Returns an error or None."""
    if (LITELLM_VENV / "bin" / "litellm").exists():
        return None
    print("installing litellm[proxy] into .dev/litellm-venv (once)", flush=True)
    steps = [
        ["python3", "-m", "venv", str(LITELLM_VENV)],
        [str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"],
    ]
    with log.open("ab") as out:
        for step in steps:
            try:
                done = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, timeout=1800,
                                      check=False)
            except subprocess.TimeoutExpired:
                return f"{' '.join(step[:3])} timed out"
            if done.returncode != 0:
                return f"{' '.join(step[:3])} failed with exit code {done.returncode} (see {log})"
    if not (LITELLM_VENV / "bin" / "litellm").exists():
        return "litellm installed no 'litellm' command"
    return None


def litellm_version() -> str:
    out = subprocess.run(
        [str(LITELLM_VENV / "bin" / "python"), "-c",
         "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True, text=True, check=False,
    )
    return out.stdout.strip() or "unknown"


def start_litellm(tmp: Path, backend_url: str, model: str, stream_model: str,
                  workers: int = 1) -> Service:
    """LiteLLM's proxy, no database, one model on the backend (and its stream twin)."""
    port = free_port()
    key = "sk-bench-" + secrets.token_hex(8)
    config = tmp / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {model}\n"
        "    litellm_params:\n"
        f"      model: openai/{model}\n"
        f"      api_base: {backend_url}/v1\n"
        "      api_key: unused\n"
        f"  - model_name: {stream_model}\n"
        "    litellm_params:\n"
        f"      model: openai/{model}\n"
        f"      api_base: {backend_url}/stream/v1\n"
        "      api_key: unused\n"
        "general_settings:\n"
        "  master_key: os.environ/LITELLM_MASTER_KEY\n"
    )
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": key}
    service = start("litellm", [str(LITELLM_VENV / "bin" / "litellm"), "--config", str(config),
                                "--host", "127.0.0.1", "--port", str(port),
                                "--num_workers", str(workers)],
                    tmp / f"litellm-{port}.log", port, env,
                    drop_env=("DATABASE_URL", "STORE_MODEL_IN_DB"))
    wait_http(service, "/health/liveliness", timeout=240)
    service.info = {"workers": workers, "key": key}
    return service
