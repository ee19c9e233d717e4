"""The gateway in front of real child processes: simulated Ollama backends (`corral-sim serve`).

The rig: two single-card backends (RTX 4090) and, where a test needs it, a split backend over two
RTX 3090s, all on one shared model store, registered in the state store the way the launcher
registers them. The simulator runs at a high time factor so loads and generations take
milliseconds while keeping their proportions.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import openai
import pytest

from gateway.api.auth import ApiKeys
from gateway.record import BackendKind, BackendRecord
from gateway.server import GatewayServer
from gateway.state.memory import MemoryStore
from launcher.sim.harness import SimServer, install_models
from tests.support.fakes import fast_settings

GIB = 1024**3
SPEED = 200.0
STORE_ID = "test-host:/models"
SMALL = {"num_predict": 8}


async def start_sim(
    tmp_path: Path, name: str, gpus: list[str], env: Mapping[str, str] | None = None, speed: float = SPEED
) -> SimServer:
    return await asyncio.to_thread(
        SimServer.start,
        tmp_path,
        gpus=gpus,
        env=dict(env or {}),
        speed=speed,
        models_dir=tmp_path / "models",
        name=name,
    )


def record_for(sim: SimServer, name: str, gpus: list[str], vram_gib: float, **kwargs: Any) -> BackendRecord:
    return BackendRecord(
        id=name,
        url=sim.url,
        gpu_names=tuple(gpus),
        gpu_uuids=tuple(f"GPU-{name}-{i}" for i in range(len(gpus))),
        vram_total_bytes=int(vram_gib * GIB),
        store_id=STORE_ID,
        **kwargs,
    )


async def start_rig(tmp_path: Path, speed: float = SPEED) -> tuple[dict[str, SimServer], MemoryStore]:
    """Two RTX 4090 backends with llama3.1:8b and qwen2.5:7b installed, two slots each."""
    install_models(tmp_path / "models", "llama3.1:8b", "qwen2.5:7b")
    env = {"OLLAMA_NUM_PARALLEL": "2", "OLLAMA_CONTEXT_LENGTH": "8192"}
    sims = {name: await start_sim(tmp_path, name, ["RTX 4090"], env, speed) for name in ("g0", "g1")}
    store = MemoryStore()
    for name, sim in sims.items():
        await store.put_backend(record_for(sim, name, ["RTX 4090"], 24, num_parallel=2, default_num_ctx=8192))
    return sims, store


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[dict[str, SimServer], MemoryStore]]:
    sims, store = await start_rig(tmp_path)
    try:
        yield sims, store
    finally:
        for sim in sims.values():
            await asyncio.to_thread(sim.stop)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def gateway(store: MemoryStore) -> GatewayServer:
    return GatewayServer(fast_settings(), store, keys=ApiKeys())


async def where(http: aiohttp.ClientSession, gw: GatewayServer, model: str = "llama3.1:8b", **extra: Any) -> str:
    payload = {"model": model, "prompt": "hello", "stream": False, "options": SMALL, **extra}
    async with http.post(gw.url + "/api/generate", json=payload) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["done"] is True
        return resp.headers["X-Corral-Backend"]


async def test_requests_stick_to_the_resident_copy_and_survive_its_backend_dying(
    rig: tuple[dict[str, SimServer], MemoryStore], http: aiohttp.ClientSession
) -> None:
    sims, store = rig
    async with gateway(store) as gw:
        first = await where(http, gw)
        assert [await where(http, gw) for _ in range(3)] == [first] * 3
        other = next(name for name in sims if name != first)
        await asyncio.to_thread(sims[first].kill)
        # Nothing had started streaming: every request is retried on the other backend and served.
        served = await asyncio.gather(*(where(http, gw) for _ in range(4)))
        assert served == [other] * 4


async def test_a_backend_dying_mid_stream_ends_that_stream_and_the_rest_goes_on(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    # Slower time here: the 8192-token generation must still be running when its backend dies.
    sims, store = await start_rig(tmp_path, speed=20)
    try:
        async with gateway(store) as gw:
            payload = {"model": "llama3.1:8b", "prompt": "tell me everything", "options": {"num_predict": -1}}
            async with http.post(gw.url + "/api/generate", json=payload) as resp:
                victim = resp.headers["X-Corral-Backend"]
                assert json.loads(await resp.content.readline())["done"] is False
                await asyncio.to_thread(sims[victim].kill)
                lines = [json.loads(line) for line in (await resp.read()).splitlines() if line.strip()]
            assert "error" in lines[-1] and victim in lines[-1]["error"]
            survivor = next(name for name in sims if name != victim)
            assert await where(http, gw) == survivor
    finally:
        for sim in sims.values():
            await asyncio.to_thread(sim.stop)


async def test_official_clients_against_simulated_backends(
    rig: tuple[dict[str, SimServer], MemoryStore], http: aiohttp.ClientSession
) -> None:
    _, store = rig
    async with gateway(store) as gw:

        def sync_chat() -> str:
            with ollama.Client(host=gw.url) as client:
                reply = client.chat(model="llama3.1:8b", messages=[{"role": "user", "content": "hi"}], options=SMALL)
                return reply.message.content or ""

        assert await asyncio.to_thread(sync_chat)
        client = ollama.AsyncClient(host=gw.url)
        try:
            parts = [
                p async for p in await client.generate(model="qwen2.5:7b", prompt="hi", stream=True, options=SMALL)
            ]
            assert parts[-1].done and parts[-1].eval_count == 8
            assert "".join(p.response for p in parts)
            embedded = await client.list()
            assert {m.model for m in embedded.models} == {"llama3.1:8b", "qwen2.5:7b"}
            running = await client.ps()
            assert {m.model for m in running.models} == {"llama3.1:8b", "qwen2.5:7b"}
        finally:
            await client.close()
        oai = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        try:
            stream = await oai.chat.completions.create(
                model="llama3.1:8b", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=8
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text
        finally:
            await oai.close()
        async with http.get(gw.url + "/api/ps") as resp:
            rows = (await resp.json())["models"]
        copies = [c for r in rows for c in r["corral_copies"]]
        assert {c["backend"] for c in copies} <= {"g0", "g1"}
        assert all(c["gpus"] == ["RTX 4090"] for c in copies)


async def test_pull_through_the_gateway_on_a_shared_store(
    rig: tuple[dict[str, SimServer], MemoryStore], http: aiohttp.ClientSession
) -> None:
    sims, store = rig
    async with gateway(store) as gw:
        async with http.post(gw.url + "/api/pull", json={"model": "qwen2.5:0.5b"}) as resp:
            lines = [json.loads(line) for line in (await resp.read()).splitlines() if line.strip()]
        assert lines[0]["status"] == "pulling manifest" and lines[-1] == {"status": "success"}
        for sim in sims.values():  # one download, seen by both backends of the store
            assert "qwen2.5:0.5b" in {m["name"] for m in sim.json("GET", "/api/tags")["models"]}
        assert await where(http, gw, "qwen2.5:0.5b") in sims


async def test_a_model_too_large_for_one_card_goes_to_the_split_backend(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    install_models(tmp_path / "models", "llama3.3:70b", "llama3.1:8b")
    single = await start_sim(tmp_path, "g0", ["RTX 4090"], {"OLLAMA_CONTEXT_LENGTH": "8192"})
    split = await start_sim(
        tmp_path, "g12", ["RTX 3090", "RTX 3090"], {"OLLAMA_SCHED_SPREAD": "1", "OLLAMA_CONTEXT_LENGTH": "8192"}
    )
    store = MemoryStore()
    await store.put_backend(record_for(single, "g0", ["RTX 4090"], 24, default_num_ctx=8192))
    await store.put_backend(
        record_for(split, "g12", ["RTX 3090", "RTX 3090"], 48, kind=BackendKind.SPLIT, speed=0.9, default_num_ctx=8192)
    )
    try:
        async with gateway(store) as gw:
            assert await where(http, gw, "llama3.3:70b") == "g12"
            assert await where(http, gw, "llama3.1:8b") == "g0"
            placed = {m["name"]: m for m in split.ps()}
            assert placed["llama3.3:70b"]["size_vram"] > 24 * GIB
    finally:
        await asyncio.to_thread(single.stop)
        await asyncio.to_thread(split.stop)


async def test_six_long_generations_use_both_cards_instead_of_queueing_on_the_resident_one(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    # Two 1-slot RTX 4090s, llama3.1:8b loaded on g0 only. Six 1,500-token generations arrive at
    # once: the first takes g0's slot; the rest wait at the gateway, and since a cold load on g1
    # (~4.5 s) beats waiting for g0 (~15 s per answer), g1 loads a copy and serves too.
    install_models(tmp_path / "models", "llama3.1:8b")
    env = {"OLLAMA_NUM_PARALLEL": "1", "OLLAMA_CONTEXT_LENGTH": "8192"}
    long_answers = {"answer_tokens_min": 1500, "answer_tokens_max": 1500}
    sims = {}
    try:
        for name in ("g0", "g1"):
            sims[name] = await asyncio.to_thread(
                SimServer.start,
                tmp_path,
                gpus=["RTX 4090"],
                env=env,
                speed=50.0,
                models_dir=tmp_path / "models",
                name=name,
                sim=long_answers,
            )
        async with http.post(sims["g0"].url + "/api/generate", json={"model": "llama3.1:8b"}) as resp:
            assert resp.status == 200  # loaded on g0 (an empty prompt only loads)
        store = MemoryStore()
        for name, sim in sims.items():
            await store.put_backend(record_for(sim, name, ["RTX 4090"], 24, num_parallel=1, default_num_ctx=8192))
        async with gateway(store) as gw:

            async def long_generation() -> str:
                payload = {"model": "llama3.1:8b", "prompt": "write a long story", "options": {"num_predict": 1500}}
                async with http.post(gw.url + "/api/generate", json=payload) as resp:
                    assert resp.status == 200, await resp.text()
                    lines = (await resp.read()).splitlines()
                    assert json.loads(lines[-1])["eval_count"] == 1500
                    return resp.headers["X-Corral-Backend"]

            served = await asyncio.gather(*(long_generation() for _ in range(6)))
        assert set(served) == {"g0", "g1"}, served
    finally:
        for sim in sims.values():
            await asyncio.to_thread(sim.stop)
