"""Runs the gateway: migrations once, then ``WEBSERVER_WORKERS`` processes on one port.

Each worker is a separate process with its own event loop, upstream pool and spool, bound with
SO_REUSEPORT so the kernel spreads connections across them. SIGTERM or SIGINT stops accepting,
lets in-flight requests finish, drains the usage spool, and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from inference_gateway.admission.quotas import run_reconciler
from inference_gateway.app import GATEWAY, create_app
from inference_gateway.billing.reporter import run_reporter
from inference_gateway.billing.sinks import open_sink
from inference_gateway.db import leader
from inference_gateway.db.schedule import maintenance_job
from inference_gateway.observability import malformed_requests, shared
from inference_gateway.portal.rollups import rollup_job
from inference_gateway.proxy import handler
from inference_gateway.proxy.endpoints import check_forwarded
from inference_gateway.proxy.http import Limits, ServerCore
from inference_gateway.settings import Settings

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_SEC = 30.0
PR_SET_PDEATHSIG = 1  # prctl(2): a signal for this process when its parent dies (Linux)
# A worker that dies this soon after it started, this many times in a row, stops the gateway.
STARTUP_GRACE_SEC = 10.0
STARTUP_ATTEMPTS = 3


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def build() -> str:
    """Which build runs, for the log: the compiled one's request path is C (setup.py)."""
    return "pure Python" if (handler.__file__ or "").endswith(".py") else "compiled request path"


def background_jobs(settings: Settings) -> list[Coroutine[Any, Any, None]]:
    """The jobs one process of the fleet runs (each process offers; one takes charge)."""
    jobs: list[Coroutine[Any, Any, None]] = []
    if settings.run_billing_reporter:
        jobs.append(run_reporter(settings, open_sink(settings)))
    if settings.run_maintenance_scheduler:
        # It stands by while a pg_cron job does the work.
        jobs.append(leader.run(settings.database_url,
                               maintenance_job(settings.database_url,
                                               settings.maintenance_schedule)))
    if settings.run_usage_rollups:
        jobs.append(leader.run(settings.database_url, rollup_job(settings)))
    if settings.redis_url:
        jobs.append(run_reconciler(settings.redis_url, settings.database_url,
                                   settings.redis_timeout_sec))
    return jobs


def listen(host: str, port: int) -> socket.socket:
    """The worker's listening socket, shared with the other workers through SO_REUSEPORT.

    Bound before anything else starts, so that a worker that cannot listen fails at once.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def _run_worker(settings: Settings) -> None:
    try:
        sock = listen(settings.webserver_host, settings.webserver_port)
    except OSError as exc:
        log.error("worker %d cannot listen on %s:%d: %s", os.getpid(), settings.webserver_host,
                  settings.webserver_port, exc.strerror or exc)
        raise SystemExit(3) from None
    app = create_app(settings)
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_SEC
    )
    await runner.setup()
    core = None
    if settings.http_core == "protocol":  # /v1 on the gateway's own core, the rest on aiohttp
        proxy, app_server = app[GATEWAY].proxy, runner.server
        assert app_server is not None
        malformed = malformed_requests.install()

        def count_malformed() -> None:
            malformed.count += 1

        core = ServerCore(proxy, lambda method, path: proxy.endpoints.match(method, path)
                          is not None, app_server, Limits(settings.max_request_body_bytes),
                          count_malformed)
        await core.start(sock)
    else:
        await web.SockSite(runner, sock).start()
    # Everything allocated so far lives as long as the process: keep it out of the cyclic
    # collector's full passes, which otherwise show up as multi-millisecond latency spikes.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("worker %d listening on %s:%d (%s core, %s)", os.getpid(), settings.webserver_host,
             settings.webserver_port, settings.http_core, build())
    jobs = [asyncio.create_task(job) for job in background_jobs(settings)]
    await stop.wait()
    log.info("worker %d stopping: finishing in-flight requests and draining usage", os.getpid())
    for task in jobs:
        task.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)
    if core is not None:
        await core.close(SHUTDOWN_TIMEOUT_SEC)
    await runner.cleanup()


def _stop_with(supervisor: int) -> None:
    """Be sent SIGTERM (a graceful stop) when the supervisor dies, even by SIGKILL: a worker
    left behind would go on serving the port and holding its spool, unsupervised."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before that took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_worker(settings: Settings, supervisor: int | None = None) -> None:
    # A forked worker starts with the supervisor's handlers, which would forward a stop signal
    # to the other workers instead of stopping this one; until its own are installed, the
    # default applies (it has served nothing yet).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    if supervisor is not None:
        _stop_with(supervisor)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    malformed_requests.install()
    _install_uvloop()
    asyncio.run(_run_worker(settings))


async def _prepare_database(settings: Settings) -> None:
    from inference_gateway.db.migrate import prepare_database

    applied = await prepare_database(settings)
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))


def serve(settings: Settings) -> int:
    # Settings the request path and the jobs read stop the start here, naming the variable.
    check_forwarded(settings.forwarded_endpoints)
    open_sink(settings)
    if settings.migrate_on_start:
        try:
            asyncio.run(_prepare_database(settings))
        except Exception as exc:  # keep serving: usage is spooled until Postgres is back
            log.error("could not migrate the database at start-up: %s", exc)
    if settings.metrics_enabled:  # counters start at zero with each run of the gateway
        shared.clear(shared.directory(settings))
    if settings.webserver_workers == 1:
        run_worker(settings)
        return 0
    return _supervise(settings)


def _supervise(settings: Settings) -> int:
    """Start the workers, restart one that dies, and pass SIGTERM/SIGINT on to all of them.

    A restarted worker claims the spool segments its predecessor left, so a worker crash loses
    no usage record. A worker that keeps dying at start-up (a port taken, a spool it cannot
    write) stops the gateway instead: restarting it forever would only fill the log.
    """
    ctx = multiprocessing.get_context("fork")
    stopping = False

    def spawn(i: int) -> multiprocessing.process.BaseProcess:
        worker = ctx.Process(target=run_worker, args=(settings, os.getpid()),
                             name=f"worker-{i}")
        worker.start()
        started[i] = time.monotonic()
        return worker

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    started = [0.0] * settings.webserver_workers
    early_deaths = [0] * settings.webserver_workers
    workers = [spawn(i) for i in range(settings.webserver_workers)]
    failed = False
    while any(w.is_alive() for w in workers):
        multiprocessing.connection.wait([w.sentinel for w in workers if w.is_alive()],
                                        timeout=1.0)
        for i, worker in enumerate(workers):
            if worker.is_alive() or stopping or worker.exitcode is None:
                continue
            failed = True
            early = time.monotonic() - started[i] < STARTUP_GRACE_SEC
            early_deaths[i] = early_deaths[i] + 1 if early else 0
            if early_deaths[i] >= STARTUP_ATTEMPTS:
                log.error("%s died at start-up %d times in a row (exit code %s); stopping the "
                          "gateway", worker.name, early_deaths[i], worker.exitcode)
                forward(signal.SIGTERM, None)
                break
            log.error("%s exited with %s; starting a new one", worker.name, worker.exitcode)
            time.sleep(0.5)  # do not spin if every start fails
            if stopping:  # a stop signal came during the pause: a new worker would be orphaned
                break
            workers[i] = spawn(i)
    if failed and (not stopping or max(early_deaths) >= STARTUP_ATTEMPTS):
        print("inference-gateway: workers failed", file=sys.stderr)
        return 1
    return 0
