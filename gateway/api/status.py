"""GET /api/corral/status: the fleet as the gateway sees it, for `corral status`, `corral top` and
the page at /corral/. The document's shape is `gateway.api.status_doc.StatusDoc`.

Everything comes from memory (the pool, the queues, the activity recorder) plus one state-store
read for the GPU inventory, bounded in time so a store that hangs cannot stall the views; no
backend is called. The page asks for it about once a second, so it stays cheap.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict
from importlib import metadata
from typing import Any

from aiohttp import web

from gateway import appkeys
from gateway.api.status_doc import (
    BackendDoc,
    BackendModelDoc,
    BackendStatusWord,
    GatewayDoc,
    GpuDoc,
    ResidentDoc,
    StatusDoc,
    WarningDoc,
)
from gateway.api.status_warnings import fleet_warnings
from gateway.record import BackendState
from gateway.routing.snapshot import BackendView
from launcher.facts.gpuinfo import PublishedGpu

# The inventory read answers in a millisecond when the store is well; past this it is not.
STORE_READ_TIMEOUT_S = 2.0


def corral_version() -> str:
    try:
        return metadata.version("corral")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def gpu_doc(published: PublishedGpu) -> GpuDoc:
    """One card as a launcher published it, with its live memory and sensors."""
    gpu = published.gpu
    return GpuDoc(
        index=gpu.index,
        uuid=gpu.uuid,
        name=gpu.name,
        backend=published.backend,
        memory_total_bytes=gpu.memory_total_bytes,
        memory_used_bytes=gpu.memory_used_bytes,
        memory_free_bytes=gpu.memory_free_bytes,
        memory_planned_bytes=published.planned_bytes,
        utilization_pct=gpu.utilization_pct,
        temperature_c=gpu.temperature_c,
        power_w=gpu.power_w,
        simulated=gpu.simulated,
    )


def status_word(view: BackendView) -> BackendStatusWord:
    record = view.record
    if record.state == BackendState.READY:
        return "ready" if view.healthy else "down"
    if record.state == BackendState.STARTING:
        # Started again after its process died: down until the new one is ready.
        return "down" if record.restarts > 0 else "starting"
    # A failed record is a process that exited (waiting out its restart backoff) or never started.
    return "draining" if record.state == BackendState.DRAINING else "down"


def resident_doc(view: BackendView) -> list[ResidentDoc]:
    return [
        ResidentDoc(
            name=r.name,
            size_bytes=r.size_bytes,
            size_vram_bytes=r.size_vram_bytes,
            context_length=r.context_length,
            expires_at=r.expires_at,
            loaded_with=({k: v for k, v in asdict(r.loaded_with).items() if v is not None} if r.loaded_with else None),
        )
        for r in sorted(view.resident, key=lambda r: r.name)
    ]


def backend_models(view: BackendView) -> list[BackendModelDoc]:
    """Resident models first (as loaded), then planned ones not loaded (with their planned context)."""
    record = view.record
    planned_ctx = dict(zip(record.planned_models, record.planned_num_ctx, strict=False))
    rows: list[BackendModelDoc] = []
    names = sorted({r.name for r in view.resident}) + sorted(
        (set(record.planned_models) | ({view.loading} if view.loading else set())) - {r.name for r in view.resident}
    )
    for name in names:
        resident = view.resident_model(name)
        size_vram = resident.size_vram_bytes if resident else 0
        rows.append(
            BackendModelDoc(
                name=name,
                resident=resident is not None,
                planned=name in record.planned_models,
                loading=view.loading == name,
                context_length=resident.context_length if resident else planned_ctx.get(name, 0),
                size_vram_bytes=size_vram,
                cpu_bytes=max(resident.size_bytes - size_vram, 0) if resident else 0,
                expires_at=resident.expires_at if resident else None,
                busy=int(view.in_flight.get(name, 0)),
                slots=record.num_parallel,
                queued=int(view.queued.get(name, 0)),
            )
        )
    return rows


def backend_status(health: dict[str, Any], view: BackendView, now: float) -> BackendDoc:
    """One backend's row: its record, health bookkeeping (`pool.health`), and what the router sees."""
    record = view.record
    word = status_word(view)
    return BackendDoc(
        id=record.id,
        url=record.url,
        host=record.host,
        gpu_uuids=list(record.gpu_uuids),
        gpu_names=list(record.gpu_names),
        kind=str(record.kind),
        num_parallel=record.num_parallel,
        max_loaded_models=record.max_loaded_models,
        vram_total_bytes=record.vram_total_bytes,
        speed=record.speed,
        planned_models=list(record.planned_models),
        planned_num_ctx=list(record.planned_num_ctx),
        store_id=record.store_id,
        default_num_ctx=record.default_num_ctx,
        state=str(record.state),
        updated_at=record.updated_at,
        started_at=record.started_at,
        restarts=record.restarts,
        last_error=record.last_error,
        status=word,
        uptime_s=round(now - record.started_at, 1) if word == "ready" and record.started_at else None,
        healthy=view.healthy,
        ejected_until=health.get("ejected_until"),
        consecutive_failures=int(health.get("consecutive_failures") or 0),
        health_error=str(health.get("health_error") or ""),
        ollama_version=str(health.get("ollama_version") or ""),
        installed=sorted(view.installed),
        resident=resident_doc(view),
        models=backend_models(view),
        in_flight=dict(sorted(view.in_flight.items())),
        queued=dict(sorted(view.queued.items())),
        free_vram_bytes=view.free_vram_bytes,
        observed={
            model: {
                "tokens_per_s": s.tokens_per_s,
                "load_s": s.load_s,
                "service_s": s.service_s,
                "samples": s.samples,
                "prefill_tokens_per_s": s.prefill_tokens_per_s,
            }
            for model, s in sorted(view.observed.items())
        },
    )


async def read_gpus(app: web.Application) -> tuple[dict[str, list[GpuDoc]], str]:
    """The inventory by host, and "" or why the store could not be read."""
    try:
        rows = await asyncio.wait_for(app[appkeys.STORE].list_gpus(), STORE_READ_TIMEOUT_S)
    except TimeoutError:
        return {}, f"no answer within {STORE_READ_TIMEOUT_S:g}s"
    except Exception as e:  # the rest of the document is still worth showing
        return {}, str(e) or type(e).__name__
    return {host: [gpu_doc(card) for card in cards] for host, cards in sorted(rows.items())}, ""


async def build_status(app: web.Application) -> StatusDoc:
    settings = app[appkeys.SETTINGS]
    pool = app[appkeys.POOL]
    activity = app[appkeys.ACTIVITY]
    queued = app[appkeys.QUEUES].depths()
    started_at = app[appkeys.STARTED_AT]
    gpus, store_error = await read_gpus(app)
    now = time.time()
    views = sorted(pool.views(), key=lambda v: v.id)
    backends = [backend_status(pool.health(view.id), view, now) for view in views]
    in_flight: dict[str, int] = {}
    for view in views:
        for model, count in view.in_flight.items():
            in_flight[model] = in_flight.get(model, 0) + count
    gateway = GatewayDoc(
        version=corral_version(),
        listen=app[appkeys.LISTEN],
        policy=settings.policy,
        started_at=started_at,
        uptime_s=round(now - started_at, 3),
        now=now,
        active_requests=max(app[appkeys.TRACKER].active - 1, 0),  # not counting this status request
        queue_depths=dict(sorted(queued.items())),
        queue_size=settings.queue_size,
        health_interval_s=settings.health_interval_s,
        poll_interval_s=settings.poll_interval_s,
        store=settings.state,
        store_ok=not store_error,
        store_error=store_error,
        stats_window_s=activity.window_s,
        worker=app[appkeys.WORKER],
        pid=os.getpid(),
    )
    warnings: list[WarningDoc] = fleet_warnings(backends)
    if store_error:
        # Not the URL itself: it may carry a password.
        message = f"state store ({settings.state}) unreachable: {store_error}"
        warnings.insert(0, WarningDoc(kind="store_unreachable", subject="", message=message))
    return StatusDoc(
        gateway=gateway,
        gpus=gpus,
        backends=backends,
        models=activity.model_stats(in_flight, queued),
        decisions=activity.decisions(),
        warnings=warnings,
    )


async def status(request: web.Request) -> web.Response:
    return web.json_response(await build_status(request.app), headers={"Cache-Control": "no-store"})


async def ready(request: web.Request) -> web.Response:
    """GET /api/corral/ready: 200 once at least one backend is healthy and ready, 503 before.

    For load balancers and Kubernetes/Docker probes: open without a key (it reveals only a count),
    and it never calls a backend, so a probe cannot load a model.
    """
    pool = request.app[appkeys.POOL]
    count = sum(1 for v in pool.snapshot().backends if v.healthy and v.record.state == "ready")
    if count:
        return web.json_response({"status": "ready", "ready_backends": count})
    return web.json_response({"error": "no backend is ready"}, status=503)
