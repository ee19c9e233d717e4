"""Run the simulated backend: bind, log one start line, serve until SIGTERM/SIGINT, exit 0.

Like `ollama serve` on a signal, in-flight requests are ended promptly (a streaming one gets an error
line when its runner stops), loaded models are unloaded, and the process exits.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import sys
from dataclasses import replace

from aiohttp import web

from launcher.signals import on_stop_signals
from launcher.sim.app import create_app
from launcher.sim.clock import SimClock
from launcher.sim.env import GIB, ServeSettings
from launcher.sim.handlers_infer import SERVICE
from launcher.sim.service import VERSION

log = logging.getLogger("corral.sim")
SHUTDOWN_TIMEOUT_S = 2.0


def describe(settings: ServeSettings) -> str:
    """The start line: address, visible cards, key settings."""
    if settings.cards:
        cards = ", ".join(f"{c.index}:{c.name} {c.memory_total_bytes / GIB:.0f}GiB ({c.uuid})" for c in settings.cards)
    else:
        cards = "none (CPU only)"
    keep_alive = "forever" if settings.keep_alive_s == float("inf") else f"{settings.keep_alive_s:g}s"
    return (
        f"Listening on {settings.host}:{settings.port} (simulated Ollama {VERSION}); cards: {cards}; "
        f"num_parallel={settings.num_parallel} keep_alive={keep_alive} max_loaded_models={settings.max_runners} "
        f"max_queue={settings.max_queue} sched_spread={int(settings.sched_spread)} "
        f"num_ctx={settings.default_num_ctx} kv_cache_type={settings.kv_cache_type} speed={settings.speed:g} "
        f"models={settings.models_dir}"
    )


async def serve(settings: ServeSettings) -> int:
    """Serve until a signal; returns the exit status (0 on a clean stop, 1 when the port is taken)."""
    app = create_app(settings, SimClock(settings.speed))
    runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True)
    await runner.setup()
    host = settings.host or None  # an empty host ("OLLAMA_HOST=:11434") listens on every interface
    site = web.TCPSite(runner, host, settings.port, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        if e.errno == errno.EADDRINUSE:
            print(
                f"corral-sim: listen tcp {settings.host}:{settings.port}: bind: address already in use",
                file=sys.stderr,
            )
        else:
            print(f"corral-sim: listen tcp {settings.host}:{settings.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    if settings.port == 0:  # "OLLAMA_HOST=127.0.0.1:0": the kernel picked the port; say which
        bound = runner.addresses[0]
        settings = replace(settings, port=int(bound[1]))
    log.info("%s", describe(settings))
    stop = asyncio.Event()
    try:
        with on_stop_signals(lambda _sig: stop.set()):
            await stop.wait()
    finally:
        log.info("shutting down")
        # Stop the models first so streaming requests end now, then close the sockets.
        await app[SERVICE].scheduler.close()
        await runner.cleanup()
    return 0
