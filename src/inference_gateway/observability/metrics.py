"""``/metrics`` of one gateway instance: this worker's numbers, fresh, and the others' files.

Once a second each worker writes its snapshot to its file (see ``shared``) and takes in the
shared set of labelled organizations (see ``orgs``). A scrape reaches one worker: it takes its
own snapshot, adds the other workers' files, reads the billing watermark, and renders the text.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from aiohttp import web

from inference_gateway.background import stop
from inference_gateway.metering.meter import Meter
from inference_gateway.observability import catalog as c
from inference_gateway.observability import malformed_requests, readings, shared
from inference_gateway.observability.billing_lag import BillingLag
from inference_gateway.observability.exposition import CONTENT_TYPE, render
from inference_gateway.observability.orgs import OTHER, OrgLabels
from inference_gateway.observability.request_metrics import RequestMetrics
from inference_gateway.observability.series import Snapshot, dumps, merge, put
from inference_gateway.observability.shared import WorkerFiles
from inference_gateway.routing.router import Router
from inference_gateway.routing.upkeep import Upkeep
from inference_gateway.settings import Settings
from inference_gateway.tenants.caches import TenantCaches
from inference_gateway.tenants.identity import bearer_token

log = logging.getLogger(__name__)

DUMP_INTERVAL_SEC = 1.0


class Metrics:
    """The metrics of one worker process."""

    def __init__(self, settings: Settings, router: Router, upkeep: Upkeep, meter: Meter,
                 tenants: TenantCaches) -> None:
        directory = shared.directory(settings)
        self.orgs = OrgLabels(settings.metrics_max_orgs, directory)
        self.requests = RequestMetrics(self.orgs)
        self.files = WorkerFiles(directory)
        self.router = router
        self.upkeep = upkeep
        self.tenants = tenants
        self.pipeline = readings.Pipeline(meter)
        self.billing = BillingLag(settings.database_url)
        self.token = settings.metrics_token
        self.malformed = malformed_requests.install()
        self._adopted: Snapshot = {}
        self._tasks: list[asyncio.Task[None]] = []

    def snapshot(self) -> Snapshot:
        """This worker's series now, with the counters it adopted from workers that died."""
        snap: Snapshot = {}
        merge(snap, self._adopted)
        self.requests.snapshot(snap)
        readings.replicas(snap, self.router, self.upkeep.vllm_tokens)
        self.pipeline.read(snap)
        readings.tenants(snap, self.tenants)
        readings.malformed(snap, self.malformed)
        return snap

    async def start(self) -> None:
        self._adopted = self.files.open(dumps(self.snapshot()))
        self._tick()
        self._tasks.append(asyncio.create_task(self._every_second(), name="metrics file"))

    async def close(self) -> None:
        await stop(self._tasks)
        self._tasks.clear()
        self.files.close(dumps(self.snapshot()))
        await self.billing.close()

    async def _every_second(self) -> None:
        while True:
            await asyncio.sleep(DUMP_INTERVAL_SEC)
            try:
                self._tick()
            except Exception as exc:  # the loop must go on; the next second tries again
                log.warning("metrics: cannot write this worker's numbers: %s", exc)

    def _tick(self) -> None:
        self.orgs.tick()
        self.requests.forget_orgs(self.orgs.labelled())
        self.files.write(dumps(self.snapshot()))

    # -- a scrape -------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.Response:
        if self.token is not None and not hmac.compare_digest(
                bearer_token(request.headers) or "", self.token):
            return web.Response(status=401, text="the metrics token is required\n")
        body = await self.page()
        return web.Response(body=body.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def page(self) -> str:
        self.orgs.sync()
        labelled = self.orgs.labelled()
        self.requests.forget_orgs(labelled)
        total = self.snapshot()
        workers = 1
        for snap, alive in self.files.others():
            merge(total, snap, alive)
            workers += alive
        # A worker that has not yet taken in the latest set may still count an organization
        # that lost its label: left out, so that no series goes back.
        tokens = total.get(c.TOKENS.name, {})
        for labels in [k for k in tokens if k[1] != OTHER and k[1] not in labelled]:
            del tokens[labels]
        now = time.time()
        put(total, c.WORKERS, (), float(workers))
        if not total.get(c.OLDEST.name):
            put(total, c.OLDEST, (), now)  # nothing waits: an age of 0
        self.billing.read(total)
        return render(total, now)
