"""/metrics series that deploy/prometheus alerts on, and the readiness route probes use."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gateway.api.auth import ApiKeys
from gateway.record import BackendRecord
from gateway.server import GatewayServer
from gateway.state.memory import MemoryStore
from gateway.state.redis_store import RedisStore
from launcher.facts.cards import find_card
from launcher.facts.gpuinfo import GpuInfo, PublishedGpu
from tests.support.fakes import MakeFake, fast_settings
from tests.support.redisproc import RedisProcess

GIB = 1024**3


async def scrape(http: aiohttp.ClientSession, gw: GatewayServer, headers: dict[str, str] | None = None) -> str:
    async with http.get(gw.url + "/metrics", headers=headers) as resp:
        assert resp.status == 200
        return await resp.text()


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of `name` (a sample name: `x_total`, not the family `x`), by sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                found[tuple(sorted(s.labels.items()))] = s.value
    return found


async def test_ready_is_503_until_a_backend_is_ready_and_open_without_a_key(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    a = await fakes(name="a", healthy=False)
    keys = ApiKeys(api=("user-key",), admin=("admin-key",))
    async with GatewayServer(fast_settings(a.backend()), MemoryStore(), keys=keys) as gw:
        async with http.get(gw.url + "/api/corral/ready") as resp:
            assert resp.status == 503
            assert "error" in await resp.json()
        a.healthy = True

        async def is_ready() -> bool:
            async with http.get(gw.url + "/api/corral/ready") as resp:
                return resp.status == 200

        for _ in range(200):
            if await is_ready():
                break
            await asyncio.sleep(0.05)
        async with http.get(gw.url + "/api/corral/ready") as resp:
            assert resp.status == 200
            assert (await resp.json())["ready_backends"] == 1
        # The rest of the gateway's own routes still need a key.
        async with http.get(gw.url + "/api/corral/status") as resp:
            assert resp.status == 401
    # The probe never reached a backend: only health checks and polls did.
    assert {r.path for r in a.received} <= {"/api/version", "/api/tags", "/api/ps", "/api/show"}


async def test_restarts_offload_and_gpu_memory_come_from_records_ps_and_the_inventory(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    size = 40 * GIB
    # A quarter of the model in system memory, as /api/ps shows a partial offload (size > size_vram).
    model = "llama3.3:70b"
    a = await fakes(name="a", models={model: size}, resident={model: 4096}, vram={model: size - size // 4})
    store = MemoryStore()
    await store.put_backend(
        BackendRecord(
            id="a", url=a.url, host="gpu-host-1", gpu_uuids=("GPU-aaaa",), gpu_names=("RTX 4090",), restarts=3
        )
    )
    card = find_card("RTX 4090")
    assert card is not None
    gpu = GpuInfo(0, "GPU-aaaa", "RTX 4090", 24 * GIB, 4 * GIB, 20 * GIB, card)
    await store.put_gpus("gpu-host-1", [PublishedGpu(gpu, "a")])
    async with GatewayServer(fast_settings(), store, keys=ApiKeys()) as gw:
        text = await scrape(http, gw)
        for _ in range(100):
            if samples(text, "corral_model_cpu_offload_ratio"):
                break
            await asyncio.sleep(0.05)
            text = await scrape(http, gw)
        assert samples(text, "corral_backend_restarts_total") == {(("backend", "a"),): 3.0}
        assert samples(text, "corral_model_cpu_offload_ratio") == {(("backend", "a"), ("model", model)): 0.25}
        used = samples(text, "corral_gpu_memory_used_bytes")
        key = (("backend", "a"), ("gpu", "GPU-aaaa"), ("host", "gpu-host-1"), ("name", "RTX 4090"))
        assert used == {key: float(20 * GIB)}
        assert samples(text, "corral_gpu_memory_total_bytes") == {key: float(24 * GIB)}
        assert samples(text, "corral_state_store_up") == {(): 1.0}

        # The launcher publishes new memory numbers: the next polls carry them to /metrics.
        fuller = replace(gpu, memory_used_bytes=22 * GIB, memory_free_bytes=2 * GIB)
        await store.put_gpus("gpu-host-1", [PublishedGpu(fuller, "a")])
        for _ in range(100):
            if samples(await scrape(http, gw), "corral_gpu_memory_used_bytes") == {key: float(22 * GIB)}:
                break
            await asyncio.sleep(0.05)
        assert samples(await scrape(http, gw), "corral_gpu_memory_used_bytes") == {key: float(22 * GIB)}


async def test_state_store_up_follows_redis_going_away_and_coming_back(
    fakes: MakeFake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    a = await fakes(name="a")
    redis = RedisProcess(tmp_path / "redis")
    redis.start()
    store = RedisStore.from_url(redis.url, prefix="corral-metrics-test:")
    try:
        async with GatewayServer(fast_settings(a.backend()), store, keys=ApiKeys()) as gw:

            async def store_up_is(value: float) -> bool:
                for _ in range(400):
                    if samples(await scrape(http, gw), "corral_state_store_up") == {(): value}:
                        return True
                    await asyncio.sleep(0.05)
                return False

            assert await store_up_is(1.0)
            await asyncio.to_thread(redis.stop)
            assert await store_up_is(0.0)
            # The gateway keeps serving from what it knew.
            payload = {"model": "llama3.1:8b", "prompt": "hi", "stream": False}
            async with http.post(gw.url + "/api/generate", json=payload) as resp:
                assert resp.status == 200
            await asyncio.to_thread(redis.start)
            assert await store_up_is(1.0)
    finally:
        await store.close()
        await asyncio.to_thread(redis.stop)
