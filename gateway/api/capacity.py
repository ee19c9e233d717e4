"""GET /api/corral/capacity[?model=M]: how many requests the fleet can work on at once, per model.

`corral batch --concurrency auto` (and any client key) reads this to keep the fleet's slots busy
without flooding the queues; the full /api/corral/status is admin-only when admin keys exist, and
says far more than a client needs. A model's `slots` are the parallel slots of every healthy, ready
backend that holds it (resident there, or installed and able to load it): resident copies serve at
once, the others after a load the router starts when the queue makes it worth it. `free_slots` is
what this gateway fleet does not have in flight for the model now. Answered from memory, no I/O.

    {"models": {"llama3.1:8b": {"slots": 12, "free_slots": 9, "in_flight": 3, "queued": 0,
                                "resident_copies": 2, "backends": {"g0": 4, "g1": 4, "g2": 4}}}}
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway import appkeys
from gateway.api.errors import error_for
from gateway.record import BackendState
from gateway.routing.cost import can_ever_fit, min_need_bytes, model_size_bytes, num_slots
from gateway.routing.snapshot import BackendView, LoadOptions, Snapshot
from launcher.facts.catalog import normalize_name


def _may_serve(view: BackendView, model: str) -> bool:
    if not (view.healthy and view.record.state == BackendState.READY):
        return False
    return model in view.installed or view.resident_model(model) is not None


def model_capacity(model: str, snapshot: Snapshot, queued: int = 0) -> dict[str, Any]:
    """The capacity row of one (normalized) model. Pure: reads the snapshot only."""
    facts = snapshot.models.get(model)
    size = model_size_bytes(model, snapshot)
    per_backend: dict[str, int] = {}
    in_flight = resident_copies = 0
    for view in sorted(snapshot.backends, key=lambda v: v.id):
        if not _may_serve(view, model):
            continue
        resident = view.resident_model(model) is not None
        if not resident and not can_ever_fit(view, min_need_bytes(view, LoadOptions(), facts, size)):
            continue
        per_backend[view.id] = num_slots(view, facts)
        in_flight += view.in_flight.get(model, 0)
        resident_copies += resident
    slots = sum(per_backend.values())
    return {
        "slots": slots,
        "free_slots": max(slots - in_flight, 0),
        "in_flight": in_flight,
        "queued": queued,
        "resident_copies": resident_copies,
        "backends": per_backend,
    }


async def capacity(request: web.Request) -> web.Response:
    app = request.app
    snapshot = app[appkeys.POOL].snapshot()
    depths = app[appkeys.QUEUES].depths()
    asked = request.query.get("model", "").strip()
    if "model" in request.query and not asked:
        return error_for(request, 400, "model: must not be empty")
    if asked:
        models = [normalize_name(asked)]
    else:
        models = sorted({m for v in snapshot.backends for m in v.installed} | {
            r.name for v in snapshot.backends for r in v.resident
        })  # fmt: skip
    body = {"models": {m: model_capacity(m, snapshot, depths.get(m, 0)) for m in models}}
    return web.json_response(body)
