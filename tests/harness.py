"""Starting and stopping the real processes the tests talk to: simulator, gateway, Postgres."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "inference_gateway"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30,
              status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == status:
                    return
        except Exception as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer {status} within {timeout}s: {last}")


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def start(args: list[str], env: Mapping[str, str], log: Path, port: int) -> Proc:
    full_env = {**os.environ, **env}
    with log.open("ab") as out:
        popen = subprocess.Popen(args, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                 cwd=ROOT, start_new_session=True)
    return Proc(popen, port, log)


def start_simulator(tmp: Path, *extra: str) -> Proc:
    port = free_port()
    proc = start([*CLI, "simulate", "--port", str(port), *extra], {}, tmp / f"sim-{port}.log",
                 port)
    wait_http(f"{proc.url}/health", proc.popen)
    return proc


def start_gateway(tmp: Path, database_url: str, upstream: str, *, wait_ready: bool = True,
                  **env: str) -> Proc:
    port = int(env.pop("WEBSERVER_PORT", None) or free_port())
    settings = {
        "DATABASE_URL": database_url,
        "MODEL_SERVICE_PORT_MAP": f"facebook/opt-125m={upstream}",
        "WEBSERVER_PORT": str(port),
        "WEBSERVER_HOST": "127.0.0.1",
        "WEBSERVER_WORKERS": "1",
        "SPOOL_DIR": str(tmp / f"spool-{port}"),
        "USAGE_FLUSH_INTERVAL_MS": "20",
        "MIGRATE_ON_START": "false",
        **env,
    }
    proc = start([*CLI, "serve"], settings, tmp / f"gateway-{port}.log", port)
    try:
        wait_http(f"{proc.url}/{'ready' if wait_ready else 'lively'}", proc.popen)
    except Exception as exc:
        proc.stop(signal.SIGKILL)
        raise RuntimeError(f"gateway did not start: {exc}\n{proc.log_tail()}") from exc
    return proc


async def wait_rows(database_url: str, where: str, args: tuple[object, ...], count: int,
                    timeout: float = 15) -> list[asyncpg.Record]:
    """Poll ``inference.requests`` until ``count`` rows match (the writer works in batches)."""
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + timeout
        rows: list[asyncpg.Record] = []
        while time.monotonic() < deadline:
            rows = await conn.fetch(
                f"SELECT * FROM inference.requests WHERE {where} ORDER BY completed_at", *args
            )
            if len(rows) >= count:
                return rows
            await _sleep(0.05)
        return rows
    finally:
        await conn.close()


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
