"""The gateway application: `create_app(settings, store)` wires every piece into one aiohttp app.

Routes mirror Ollama's (server/routes.go GenerateRoutes): model-scoped calls are routed, listings
are merged over the fleet, management calls act once per model store. Unknown paths and wrong
methods answer like Ollama's gin router (`404 page not found`, `405 method not allowed`, text).

Resources live in cleanup contexts, one each, started in this order and stopped in reverse: the
metrics collector, the static backend records, the ClientSession and the lean upstream client
(gateway/api/upstream.py), then the poller (which needs the session and does a first full round of
health checks and polls before the app serves).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from gateway import appkeys
from gateway.api import fleetwide as fleet
from gateway.api.accesslog import stamp_reply
from gateway.api.activity import Activity
from gateway.api.admission import WaitQueues
from gateway.api.auth import ApiKeys, load_keys
from gateway.api.capacity import capacity
from gateway.api.cors import OriginPolicy, add_cors_headers
from gateway.api.dispatch import handle_model_call
from gateway.api.front import front_middleware
from gateway.api.hosts import HostCheck
from gateway.api.lifecycle import RequestTracker
from gateway.api.page.serve import add_routes as add_page_routes
from gateway.api.ready import StartupGate
from gateway.api.status import ready, status
from gateway.api.upstream import UpstreamPool
from gateway.config import GatewaySettings, StaticBackend
from gateway.fleet.inflight import InFlight
from gateway.fleet.poller import Poller
from gateway.fleet.pool import BackendPool
from gateway.fleet.storewatch import StoreWatch
from gateway.fleet.work import Change
from gateway.metrics import FleetCollector, Metrics, metrics_response
from gateway.record import BackendKind, BackendRecord
from gateway.routing.policy import make_policy
from gateway.state.health import StoreHealth, reraise_if_cancelled
from gateway.state.store import StateStore

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

GIB = 1024**3
# Static backends are written to the store with this TTL and rewritten well within it, so a
# gateway that stops (or drops one from its config) leaves no record behind in a shared store.
STATIC_RECORD_TTL_S = 60.0
STATIC_HEARTBEAT_S = 15.0


def static_record(backend: StaticBackend) -> BackendRecord:
    """A `[[gateway.backends]]` entry as a backend record; entries of `gpus` that look like NVML
    UUIDs ("GPU-...") count as UUIDs, the rest as names."""
    uuids = tuple(g for g in backend.gpus if g.startswith(("GPU-", "MIG-")))
    names = tuple(g for g in backend.gpus if g not in uuids)
    return BackendRecord(
        id=backend.backend_id,
        url=backend.url.rstrip("/"),
        gpu_uuids=uuids,
        gpu_names=names,
        kind=BackendKind(backend.kind),
        num_parallel=backend.num_parallel,
        max_loaded_models=backend.max_loaded_models,
        vram_total_bytes=int(backend.vram_gb * GIB),
        speed=backend.speed,
        store_id=backend.store_id,
        default_num_ctx=backend.num_ctx,
    )


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Headers every reply gets as it is prepared (streams inside their handler): the request id,
    the moment its first byte left, and the CORS headers of an allowed browser origin."""
    stamp_reply(request, response)
    add_cors_headers(request, response)


def _routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/", fleet.root)  # also HEAD
    r.add_get("/api/version", fleet.version)  # also HEAD
    r.add_get("/api/tags", fleet.tags)  # also HEAD
    r.add_get("/api/ps", fleet.ps, allow_head=False)
    r.add_get("/api/status", fleet.passthrough, allow_head=False)
    for path in ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show"):
        r.add_post(path, handle_model_call)
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages"):
        r.add_post(path, handle_model_call)
    r.add_get("/v1/models", fleet.openai_models, allow_head=False)
    r.add_get("/v1/models/{model:.+}", handle_model_call, allow_head=False)
    r.add_post("/api/pull", fleet.pull)
    r.add_post("/api/create", fleet.create)
    r.add_post("/api/push", fleet.push)
    r.add_post("/api/copy", fleet.copy)
    r.add_delete("/api/delete", fleet.delete)
    r.add_head("/api/blobs/{digest}", fleet.blob_head)
    r.add_post("/api/blobs/{digest}", fleet.blob_upload)
    r.add_get("/metrics", _metrics, allow_head=False)
    r.add_get("/api/corral/status", status, allow_head=False)
    r.add_get("/api/corral/ready", ready)  # also HEAD
    r.add_get("/api/corral/capacity", capacity, allow_head=False)
    add_page_routes(r)  # the fleet page at /corral/


async def _metrics(request: web.Request) -> web.Response:
    return await metrics_response(request.app[appkeys.METRICS])


# -- cleanup contexts (one per resource) ---------------------------------------------------------


async def _fleet_gauges(app: web.Application) -> AsyncIterator[None]:
    collector = FleetCollector(app[appkeys.POOL].snapshot, app[appkeys.QUEUES].depths, app[appkeys.STORE_WATCH])
    app[appkeys.METRICS].attach_fleet(collector)
    yield
    app[appkeys.METRICS].detach_fleet(collector)


async def _static_backends(app: web.Application) -> AsyncIterator[None]:
    settings = app[appkeys.SETTINGS]
    store = app[appkeys.STORE]
    records = [static_record(b) for b in settings.backends]
    if not records:
        yield
        return

    async def publish() -> None:
        for record in records:
            await store.put_backend(record, ttl_s=STATIC_RECORD_TTL_S)

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(STATIC_HEARTBEAT_S)
            try:
                await publish()
            except Exception as e:  # keep trying; the records outlive a short store outage
                reraise_if_cancelled()
                app[appkeys.STORE_HEALTH].failed(e)

    await publish()
    task = asyncio.create_task(heartbeat(), name="corral-static-backends")
    pending: set[asyncio.Task[None]] = set()

    def republish() -> None:  # the store is back (maybe empty): put the records there at once
        job = asyncio.create_task(publish())
        pending.add(job)
        job.add_done_callback(pending.discard)

    app[appkeys.STORE_HEALTH].on_recover.append(republish)
    yield
    for job in list(pending):
        job.cancel()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    # One session for every upstream call. No connection cap (streams are long; the backends'
    # own queues bound the work), bytes passed through undecoded, and no cookie jar: cookies a
    # backend sets belong to the client, not to the gateway.
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    session = aiohttp.ClientSession(
        connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
    )
    app[appkeys.SESSION] = session
    # Model calls (the hot path) go over the lean client; everything else over the session.
    upstream = UpstreamPool()
    app[appkeys.UPSTREAM] = upstream
    yield
    await upstream.close()
    await session.close()


async def _pool_and_poller(app: web.Application) -> AsyncIterator[None]:
    pool = app[appkeys.POOL]
    store_health = app[appkeys.STORE_HEALTH]
    in_flight = InFlight(app[appkeys.STORE], pool, store_health=store_health)
    app[appkeys.IN_FLIGHT] = in_flight
    poller = Poller(
        app[appkeys.SETTINGS],
        pool,
        app[appkeys.STORE],
        app[appkeys.SESSION],
        app[appkeys.METRICS],
        watch=app[appkeys.STORE_WATCH],
        store_health=store_health,
    )
    app[appkeys.POLLER] = poller
    await poller.start()
    yield
    await poller.stop()
    await in_flight.settle()


def create_app(
    settings: GatewaySettings,
    store: StateStore,
    *,
    keys: ApiKeys | None = None,
    listen: str | None = None,
    starting: bool = False,
    worker: str = "",
) -> web.Application:
    """The gateway as an aiohttp Application over `store` (MemoryStore, or a shared RedisStore).

    `keys`: the API keys; None reads them as configured (files and environment). `listen`: the
    address shown in /api/corral/status (default: settings.listen). `starting`: the backends are
    still being started (see ready.StartupGate; `corral up` ends it). The store is not closed by
    the app: whoever made it closes it. Backends from `settings.backends` are written into the
    store when the app starts. `worker`: "i/n" when this app is one of `corral gateway --workers
    n` (shown in the status document and /metrics; default "1/1").
    """
    keys = keys if keys is not None else load_keys(settings, os.environ)
    tracker = RequestTracker()
    listen = listen or settings.listen
    hosts = HostCheck.for_listen(listen.rpartition(":")[0].strip("[]"), settings.allowed_hosts)
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[front_middleware(settings, tracker, keys, hosts, OriginPolicy(settings.cors_origins))],
    )
    app.on_response_prepare.append(_on_prepare)
    # The re-check is a safety net: pool changes and finished requests already wake waiters.
    queues = WaitQueues(settings.queue_size, recheck_s=settings.poll_interval_s)
    app[appkeys.SETTINGS] = settings
    app[appkeys.STORE] = store
    app[appkeys.KEYS] = keys
    # With `corral gateway --workers n` a scrape reaches whichever worker the kernel picks; the
    # worker info says which one answered.
    metrics = Metrics(worker=worker or "1/1")
    app[appkeys.METRICS] = metrics
    app[appkeys.STORE_HEALTH] = StoreHealth("gateway")  # the gauge is StoreWatch's (poller)
    app[appkeys.QUEUES] = queues
    pool = BackendPool(settings, queue_depths=queues.depths, queue_depth=queues.depth)
    # The one place waiting requests are woken from: whatever changes in the pool (and the end of
    # `corral up`'s startup, which is a fleet change too).
    pool.subscribe(queues.on_change)
    app[appkeys.POOL] = pool
    app[appkeys.STARTUP] = StartupGate(starting)
    app[appkeys.STARTUP].on_end(lambda: queues.on_change(Change("fleet")))
    app[appkeys.STORE_WATCH] = StoreWatch()
    app[appkeys.POLICY] = make_policy(
        settings.policy,
        max_wait_s=settings.max_wait_s,
        spill=settings.spill,
        context_policy=settings.context_policy,
    )
    app[appkeys.TRACKER] = tracker
    app[appkeys.STARTED_AT] = time.time()
    app[appkeys.LISTEN] = listen
    app[appkeys.WORKER] = worker or "1/1"
    app[appkeys.ACTIVITY] = Activity()
    app.cleanup_ctx.extend([_fleet_gauges, _static_backends, _client_session, _pool_and_poller])
    _routes(app)
    return app
