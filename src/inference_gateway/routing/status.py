"""The replicas as one gateway process sees them, for operators (``/status/replicas``)."""

from __future__ import annotations

import time
from typing import Any

from inference_gateway.routing.router import Router


def describe(router: Router) -> dict[str, Any]:
    """Every model's replicas with their state, load and counts, as JSON-ready data."""
    now = time.monotonic()
    models: dict[str, list[dict[str, Any]]] = {}
    for model, replica_set in router.sets.items():
        models[model] = [
            {
                "url": r.url,
                "state": r.state(now),
                "in_flight": r.in_flight,
                "load": round(r.load(now), 2),
                "running": r.remote_running,
                "waiting": r.remote_waiting,
                "kv_cache_usage": r.kv_cache,
                "scraped_sec_ago": round(now - r.scraped_at, 1) if r.scraped_at else None,
                "served": r.served,
                "errors": r.errors,
            }
            for r in replica_set.replicas
        ]
    return {"object": "replicas", "models": models,
            "dns": {model: names for model, names in router.dns.items()}}
