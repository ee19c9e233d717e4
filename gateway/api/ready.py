"""GET /api/corral/ready: the gateway's readiness, for probes, the benchmark harness and deploy files.

`corral up` listens at once (while models are still pulled and loaded), so "the port answers" no
longer means "ready". This route does: 200 once at least one backend is healthy and ready, 503
before. It is open to probes (no key, any Host) and reveals only counts.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from gateway import appkeys
from gateway.record import BackendState


class StartupGate:
    """Set while the launcher that runs this gateway (`corral up`) is still starting its backends:
    a model call that no backend could take yet waits in the queue as "starting" (bounded by
    queue_timeout_s) instead of getting 503 or, for a model still being pulled, 404."""

    def __init__(self, active: bool = False) -> None:
        self.active = active
        self._on_end: list[Callable[[], object]] = []

    def on_end(self, callback: Callable[[], object]) -> None:
        self._on_end.append(callback)

    def end(self) -> None:
        """Startup is over: waiting requests decide again, and now get the fleet's real answer."""
        if not self.active:
            return
        self.active = False
        for callback in self._on_end:
            callback()


async def ready(request: web.Request) -> web.Response:
    pool = request.app[appkeys.POOL]
    lives = list(pool.backends.values())
    ready_count = sum(1 for b in lives if b.healthy and b.record.state == BackendState.READY)
    body = {"ready": ready_count > 0, "backends_ready": ready_count, "backends": len(lives)}
    headers = None if ready_count else {"Retry-After": "1"}
    return web.json_response(body, status=200 if ready_count else 503, headers=headers)
