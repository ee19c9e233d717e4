"""GET /api/corral/status: the fleet as the gateway sees it, for `corral status` and dashboards.

Everything comes from memory (the pool, the queues) plus one state-store read for the GPU
inventory; no backend is called.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from importlib import metadata
from typing import Any

from aiohttp import web

from gateway import appkeys
from gateway.fleet.pool import LiveBackend
from gateway.routing.snapshot import BackendView


def corral_version() -> str:
    try:
        return metadata.version("corral")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def backend_status(live: LiveBackend, view: BackendView) -> dict[str, Any]:
    """One backend's row: its record, health bookkeeping, and what the router sees of it."""
    return {
        **live.record.to_json(),
        "healthy": live.healthy,
        "ejected_until": live.ejected_until or None,
        "consecutive_failures": live.failures,
        "health_error": live.last_error,
        "ollama_version": live.version,
        "installed": sorted(view.installed),
        "resident": [
            {
                "name": r.name,
                "size_bytes": r.size_bytes,
                "size_vram_bytes": r.size_vram_bytes,
                "context_length": r.context_length,
                "expires_at": r.expires_at,
                "loaded_with": (
                    {k: v for k, v in asdict(r.loaded_with).items() if v is not None} if r.loaded_with else None
                ),
            }
            for r in sorted(view.resident, key=lambda r: r.name)
        ],
        "in_flight": dict(sorted(view.in_flight.items())),
        "queued": dict(sorted(view.queued.items())),
        "free_vram_bytes": view.free_vram_bytes,
        "observed": {model: asdict(stats) for model, stats in sorted(view.observed.items())},
    }


async def status(request: web.Request) -> web.Response:
    app = request.app
    settings = app[appkeys.SETTINGS]
    pool = app[appkeys.POOL]
    queued = app[appkeys.QUEUES].depths()
    started_at = app[appkeys.STARTED_AT]
    gpus: dict[str, Any]
    try:
        gpus = {host: [g.to_json() for g in rows] for host, rows in (await app[appkeys.STORE].list_gpus()).items()}
    except Exception as e:  # the rest of the page is still worth showing
        gpus = {"error": str(e)}
    body = {
        "gateway": {
            "version": corral_version(),
            "listen": app[appkeys.LISTEN],
            "policy": settings.policy,
            "started_at": started_at,
            "uptime_s": round(time.time() - started_at, 3),
            "active_requests": max(app[appkeys.TRACKER].active - 1, 0),  # not counting this status request
            "queue_depths": dict(sorted(queued.items())),
            "queue_size": settings.queue_size,
        },
        "gpus": gpus,
        "backends": [backend_status(pool.backends[view.id], view) for view in sorted(pool.views(), key=lambda v: v.id)],
    }
    return web.json_response(body)
