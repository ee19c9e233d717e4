"""Late binding through real sockets: a backend never holds more of our requests than its slots;
the rest wait at the gateway and go wherever a slot frees first; planned models are protected;
context_policy; priority lanes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.api.auth import ApiKeys, load_keys
from gateway.appkeys import POOL
from gateway.record import BackendKind, BackendRecord
from gateway.server import GatewayServer
from gateway.state.memory import MemoryStore
from tests.support.fakes import FakeOllama, MakeFake, fast_settings, wait_for

GIB = 1024**3
LLAMA = "llama3.1:8b"
BIG = "llama3.3:70b"


def gateway(*backends: FakeOllama, **overrides: Any) -> GatewayServer:
    settings = fast_settings(*(b.backend(vram_gb=24) for b in backends), **overrides)
    return GatewayServer(settings, MemoryStore(), keys=ApiKeys())


async def generate(
    http: aiohttp.ClientSession, gw: GatewayServer, *, headers: dict[str, str] | None = None, **extra: Any
) -> tuple[str, aiohttp.ClientResponse]:
    payload = {"model": LLAMA, "prompt": "hello", **extra}
    resp = await http.post(gw.url + "/api/generate", json=payload, headers=headers)
    assert resp.status == 200, await resp.text()
    return resp.headers["X-Corral-Backend"], resp


async def finish(resp: aiohttp.ClientResponse) -> None:
    await resp.read()
    resp.release()


async def test_a_queued_request_goes_to_the_copy_that_frees_first(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    holds = {"a": asyncio.Event(), "b": asyncio.Event()}
    a = await fakes(name="a", resident={LLAMA: 4096}, hold=holds["a"])
    b = await fakes(name="b", resident={LLAMA: 4096}, hold=holds["b"])
    async with gateway(a, b) as gw:
        first, first_resp = await generate(http, gw)
        second, second_resp = await generate(http, gw)
        assert {first, second} == {"a", "b"}  # one per slot
        third = asyncio.create_task(generate(http, gw))
        await wait_for(lambda: gw.app[POOL].queue_depths().get(LLAMA) == 1)  # waits at the gateway
        holds[second].set()  # the copy that started second frees first
        await finish(second_resp)
        where, third_resp = await asyncio.wait_for(third, timeout=10)
        assert where == second
        holds[first].set()
        await finish(first_resp)
        await finish(third_resp)
    assert a.max_active == 1 and b.max_active == 1  # never more than its one slot


async def test_a_burst_never_puts_more_requests_on_a_backend_than_its_slots(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    a = await fakes(name="a", resident={LLAMA: 4096}, chunks=5, chunk_delay_s=0.01)
    b = await fakes(name="b", resident={LLAMA: 4096}, chunks=5, chunk_delay_s=0.01)
    async with gateway(a, b) as gw:

        async def one() -> str:
            where, resp = await generate(http, gw)
            await finish(resp)
            return where

        served = await asyncio.gather(*(one() for _ in range(12)))
    assert set(served) == {"a", "b"}
    assert a.max_active == 1 and b.max_active == 1


async def planned_rig(small: FakeOllama, split: FakeOllama) -> MemoryStore:
    """A 24 GiB card planned for the 8B (4 slots) and a 48 GiB split backend planned for the 70B."""
    store = MemoryStore()
    records = [
        BackendRecord(
            id="small",
            url=small.url,
            vram_total_bytes=24 * GIB,
            num_parallel=4,
            planned_models=(LLAMA,),
            gpu_names=("RTX 4090",),
        ),
        BackendRecord(
            id="split",
            url=split.url,
            kind=BackendKind.SPLIT,
            vram_total_bytes=48 * GIB,
            num_parallel=1,
            planned_models=(BIG,),
            gpu_names=("RTX 3090", "RTX 3090"),
        ),
    ]
    for record in records:
        await store.put_backend(record)
    return store


@pytest.mark.parametrize("policy", ["fit", "honor"])
async def test_a_huge_num_ctx_is_served_at_the_loaded_context_under_fit_and_evicts_under_honor(
    fakes: MakeFake, http: aiohttp.ClientSession, policy: str
) -> None:
    models = {LLAMA: 4_920_000_000, BIG: 42_500_000_000}
    small = await fakes(name="small", models=models, resident={LLAMA: 8192})
    split = await fakes(name="split", models=models, resident={BIG: 8192})
    settings = fast_settings(context_policy=policy)
    async with GatewayServer(settings, await planned_rig(small, split), keys=ApiKeys()) as gw:
        # llama-index and friends send the model's whole context by default.
        options = {"num_ctx": 131072, "num_predict": 100}
        async with http.post(
            gw.url + "/api/generate", json={"model": LLAMA, "prompt": "hi", "stream": False, "options": options}
        ) as resp:
            assert resp.status == 200
            where = resp.headers["X-Corral-Backend"]
            num_ctx_header = resp.headers.get("X-Corral-Num-Ctx")
            await resp.read()
        async with http.get(gw.url + "/metrics") as resp:
            metrics = await resp.text()
    if policy == "fit":
        assert where == "small" and num_ctx_header == "8192; requested=131072"
        assert small.calls("/api/generate")[-1].json()["options"]["num_ctx"] == 8192  # no reload there
        assert not split.calls("/api/generate")  # the planned 70B stays loaded
    else:
        # As asked, it fits only the split backend: the planned 70B is evicted, and that is counted.
        assert where == "split" and num_ctx_header is None
        assert split.calls("/api/generate")[-1].json()["options"]["num_ctx"] == 131072
        assert f'corral_planned_evictions_total{{backend="split",model="{BIG}"}} 1.0' in metrics


async def test_context_policy_reject_answers_400_with_the_limit(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    small = await fakes(name="a", resident={LLAMA: 8192})
    async with gateway(small, context_policy="reject") as gw:
        payload = {"model": LLAMA, "prompt": "hi", "options": {"num_ctx": 131072}}
        async with http.post(gw.url + "/api/generate", json=payload) as resp:
            assert resp.status == 400
            assert "8192" in (await resp.json())["error"]
    assert not small.calls("/api/generate")


async def test_batch_requests_yield_to_interactive_ones_and_a_batch_key_cannot_raise_itself(
    fakes: MakeFake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    hold = asyncio.Event()
    fake = await fakes(name="a", resident={LLAMA: 4096}, hold=hold)
    (tmp_path / "batch-keys").write_text("batch-key\n")
    settings = fast_settings(fake.backend(vram_gb=24), batch_keys_file=str(tmp_path / "batch-keys"))
    keys = load_keys(settings, {"CORRAL_API_KEYS": "user-key"})
    batch_key = {"Authorization": "Bearer batch-key"}
    user_key = {"Authorization": "Bearer user-key"}
    async with GatewayServer(settings, MemoryStore(), keys=keys) as gw:
        _, busy = await generate(http, gw, headers=user_key, prompt="busy")
        depth = gw.app[POOL].queue_depths

        async def ask(prompt: str, headers: dict[str, str]) -> None:
            _, resp = await generate(http, gw, headers=headers, prompt=prompt)
            await finish(resp)

        waiting = [asyncio.create_task(ask("batch-by-header", {**user_key, "X-Corral-Priority": "batch"}))]
        await wait_for(lambda: depth().get(LLAMA) == 1)
        # A batch key asking for interactive stays batch.
        waiting.append(asyncio.create_task(ask("batch-key", {**batch_key, "X-Corral-Priority": "interactive"})))
        await wait_for(lambda: depth().get(LLAMA) == 2)
        waiting.append(asyncio.create_task(ask("interactive", user_key)))
        await wait_for(lambda: depth().get(LLAMA) == 3)
        hold.set()
        await finish(busy)
        await asyncio.wait_for(asyncio.gather(*waiting), timeout=10)
        async with http.post(
            gw.url + "/api/generate", json={"model": LLAMA}, headers={**user_key, "X-Corral-Priority": "urgent"}
        ) as resp:
            assert resp.status == 400 and "X-Corral-Priority" in (await resp.json())["error"]
    order = [c.json()["prompt"] for c in fake.calls("/api/generate")]
    assert order == ["busy", "interactive", "batch-by-header", "batch-key"]
    assert all("X-Corral-Priority" not in c.headers for c in fake.calls("/api/generate"))  # not forwarded
    assert fake.max_active == 1


async def test_tokens_relayed_are_counted_for_the_wait_model(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    hold = asyncio.Event()
    fake = await fakes(name="a", resident={LLAMA: 4096}, hold=hold, chunks=4)
    async with gateway(fake) as gw:
        _, resp = await generate(http, gw, options={"num_predict": 50})
        assert json.loads(await resp.content.readline())["done"] is False
        view = gw.app[POOL].snapshot().backend("a")
        assert view is not None
        (item,) = view.work[LLAMA]
        assert (item.expected_tokens, item.num_predict_known, item.relayed_tokens) == (50, True, 1)
        hold.set()
        await finish(resp)
