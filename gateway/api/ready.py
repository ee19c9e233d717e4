"""GET /api/corral/ready: the gateway's readiness, for probes, the benchmark harness and deploy files.

`corral up` listens at once (while models are still pulled and loaded), so "the port answers" no
longer means "ready". This route does: 200 once at least one backend is healthy and ready, 503
before. It is open to probes (no key, any Host) and reveals only counts.
"""

from __future__ import annotations

from aiohttp import web

from gateway import appkeys
from gateway.record import BackendState


async def ready(request: web.Request) -> web.Response:
    pool = request.app[appkeys.POOL]
    lives = list(pool.backends.values())
    ready_count = sum(1 for b in lives if b.healthy and b.record.state == BackendState.READY)
    body = {"ready": ready_count > 0, "backends_ready": ready_count, "backends": len(lives)}
    headers = None if ready_count else {"Retry-After": "1"}
    return web.json_response(body, status=200 if ready_count else 503, headers=headers)
