"""Routing decisions seen end to end through the gateway (fake upstreams; X-Corral-Backend tells
where each request went): spill past a saturated slow card, the split backend for a model no
single card holds, and records that are not ready getting no new requests."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import aiohttp

from gateway.api.auth import ApiKeys
from gateway.appkeys import POLICY, POOL
from gateway.record import BackendKind, BackendRecord, BackendState
from gateway.routing.policy import RouteRequest, Send, choose
from gateway.server import GatewayServer
from gateway.state.memory import MemoryStore
from tests.support.fakes import MakeFake, fast_settings, wait_for

GIB = 1024**3


async def where(http: aiohttp.ClientSession, gw: GatewayServer, model: str = "llama3.1:8b") -> str:
    async with http.post(gw.url + "/api/generate", json={"model": model, "prompt": "hi", "stream": False}) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["X-Corral-Backend"]


async def test_a_saturated_slow_card_spills_to_a_cold_load_elsewhere(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    hold = asyncio.Event()
    slow = await fakes(name="a-slow", resident={"llama3.1:8b": 4096}, hold=hold)
    fast = await fakes(name="b-fast")
    settings = fast_settings(
        slow.backend(num_parallel=1, speed=0.05, vram_gb=24), fast.backend(num_parallel=1, speed=1.0, vram_gb=24)
    )
    async with GatewayServer(settings, MemoryStore(), keys=ApiKeys()) as gw:
        # Idle, the resident copy wins even on the slow card (asked of the router directly, so that
        # no request teaches the gateway this fake's instant service time).
        idle = choose(RouteRequest("llama3.1:8b"), gw.app[POOL].snapshot(), gw.app[POLICY])
        assert isinstance(idle, Send) and idle.backend_id == "a-slow"
        # Its one slot busy with a long request: waiting there would take longer than loading on b.
        busy = await http.post(gw.url + "/api/generate", json={"model": "llama3.1:8b", "prompt": "long"})
        assert json.loads(await busy.content.readline())["done"] is False
        assert await where(http, gw) == "b-fast"
        hold.set()
        await busy.read()
        busy.release()


async def test_a_model_larger_than_any_card_goes_to_the_split_backend(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    big = {"llama3.3:70b": 42_500_000_000, "llama3.1:8b": 4_920_000_000}
    g0 = await fakes(name="g0", models=dict(big))
    g1 = await fakes(name="g1", models=dict(big))
    g23 = await fakes(name="g23", models=dict(big))
    settings = fast_settings(
        g0.backend(vram_gb=24, speed=1.0),
        g1.backend(vram_gb=24, speed=1.0),
        g23.backend(vram_gb=48, speed=0.9, kind="split", gpus=("GPU-2", "GPU-3")),
    )
    async with GatewayServer(settings, MemoryStore(), keys=ApiKeys()) as gw:
        assert await where(http, gw, "llama3.3:70b") == "g23"
        assert await where(http, gw, "llama3.3:70b") == "g23"
        async with http.get(gw.url + "/metrics") as resp:
            assert 'reason="split_required"' in await resp.text()
    assert not g0.calls("/api/generate") and not g1.calls("/api/generate")


async def test_backends_not_ready_get_no_new_requests(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    a = await fakes(name="a")
    b = await fakes(name="b")
    store = MemoryStore()
    records = {f.name: BackendRecord(id=f.name, url=f.url, kind=BackendKind.SINGLE) for f in (a, b)}
    for record in records.values():
        await store.put_backend(record)
    async with GatewayServer(fast_settings(), store, keys=ApiKeys()) as gw:
        pool = gw.app[POOL]
        assert await where(http, gw) == "a"
        for state in (BackendState.DRAINING, BackendState.STARTING, BackendState.FAILED):
            await store.put_backend(replace(records["a"], state=state))
            await wait_for(lambda state=state: getattr(pool.record("a"), "state", None) == state)  # type: ignore[misc]
            assert await where(http, gw) == "b"
        await store.remove_backend("b")
        await store.put_backend(records["a"])
        await wait_for(lambda: "b" not in pool.ids() and getattr(pool.record("a"), "state", None) == BackendState.READY)
        assert await where(http, gw) == "a"
