"""Health checks, ejection and return; residency learned from polls and replies; the gateway queue;
/metrics and /api/corral/status after traffic."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.api.auth import ApiKeys
from gateway.api.status_doc import StatusDoc
from gateway.appkeys import POOL
from gateway.server import GatewayServer
from gateway.state.memory import MemoryStore
from gateway.state.redis_store import RedisStore
from tests.support.fakes import FakeOllama, MakeFake, fast_settings, wait_for
from tests.support.statusdoc import mismatches

GENERATE = {"model": "llama3.1:8b", "prompt": "hi", "stream": False}


def gateway(*backends: FakeOllama, vram_gb: float = 0.0, **overrides: Any) -> GatewayServer:
    settings = fast_settings(*(b.backend(vram_gb=vram_gb) for b in backends), **overrides)
    return GatewayServer(settings, MemoryStore(), keys=ApiKeys())


async def backend_of(http: aiohttp.ClientSession, gw: GatewayServer, payload: dict[str, Any] = GENERATE) -> str:
    async with http.post(gw.url + "/api/generate", json=payload) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
        return resp.headers["X-Corral-Backend"]


async def status_of(http: aiohttp.ClientSession, gw: GatewayServer) -> dict[str, Any]:
    async with http.get(gw.url + "/api/corral/status") as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


async def test_failing_health_checks_eject_a_backend_until_it_recovers(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    a = await fakes(name="a")
    b = await fakes(name="b")
    async with gateway(a, b, eject_after_failures=2, eject_for_s=0.3) as gw:
        pool = gw.app[POOL]
        assert await backend_of(http, gw) == "a"  # equal candidates: the first by id
        a.healthy = False
        await wait_for(lambda: not pool.backends["a"].healthy)
        assert await backend_of(http, gw) == "b"
        status = {s["id"]: s for s in (await status_of(http, gw))["backends"]}
        assert status["a"]["healthy"] is False and status["a"]["ejected_until"] is not None
        async with http.get(gw.url + "/metrics") as resp:
            text = await resp.text()
        assert 'corral_backend_up{backend="a"} 0.0' in text
        assert 'corral_ejections_total{backend="a"} 1.0' in text
        a.healthy = True
        await wait_for(lambda: pool.backends["a"].healthy)
        assert await backend_of(http, gw) == "a"
    # Health checks are GET /api/version only: no model call ever reached the backend from them.
    assert len(a.calls("/api/generate")) == 2


async def test_second_request_goes_where_the_model_is_resident(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    cold = await fakes(name="a-cold")
    warm = await fakes(name="b-warm", resident={"llama3.1:8b": 4096})
    async with gateway(cold, warm) as gw:
        assert [await backend_of(http, gw) for _ in range(3)] == ["b-warm"] * 3
    assert not cold.calls("/api/generate")


async def test_a_reply_with_a_long_load_makes_the_model_resident_there(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    # /api/ps is read once at start (nothing loaded) and not again during the test: residency can
    # only come from what the gateway sees in replies.
    a = await fakes(name="a", load_duration_ns=2_000_000_000)
    b = await fakes(name="b")
    async with gateway(a, b, poll_interval_s=60, cold_load_threshold_s=1.0) as gw:
        payload = {**GENERATE, "options": {"num_ctx": 2048}}
        assert await backend_of(http, gw, payload) == "a"
        resident = gw.app[POOL].backends["a"].merged_resident()["llama3.1:8b"]
        assert resident.loaded_with is not None and resident.loaded_with.num_ctx == 2048
        a.load_duration_ns = 1_000_000
        assert await backend_of(http, gw, payload) == "a"
        async with http.get(gw.url + "/metrics") as resp:
            text = await resp.text()
        assert 'corral_cold_loads_total{backend="a",model="llama3.1:8b"} 1.0' in text
        observed = {s["id"]: s for s in (await status_of(http, gw))["backends"]}["a"]["observed"]
        assert observed["llama3.1:8b"]["tokens_per_s"] == pytest.approx(100.0)  # 3 tokens in 30 ms


class ShowingFake(FakeOllama):
    """A backend holding a model the catalog does not know: its facts come from /api/show."""

    tags_served = 0

    async def api_tags(self, request: web.Request) -> web.Response:
        self.tags_served += 1
        return await super().api_tags(request)

    async def api_show(self, request: web.Request) -> web.Response:
        await self._record(request)
        info = {
            "general.architecture": "llama",
            "general.parameter_count": 3_200_000_000,
            "llama.block_count": 26,
            "llama.embedding_length": 3072,
            "llama.attention.head_count": 24,
            "llama.attention.head_count_kv": 8,
            "llama.context_length": 16384,
            "llama.vocab_size": 128256,
        }
        return web.json_response({"details": {"quantization_level": "Q4_K_M"}, "model_info": info})


async def test_facts_of_a_model_outside_the_catalog_come_from_show_once() -> None:
    fake = await ShowingFake(name="g0", models={"custom-llm:3b": 2_000_000_000}).start()
    try:
        async with gateway(fake) as gw:
            pool = gw.app[POOL]
            await wait_for(lambda: "custom-llm:3b" in pool.facts)
            facts = pool.facts["custom-llm:3b"]
            assert (facts.size_bytes, facts.context_length) == (2_000_000_000, 16384)
            # f16 K and V of 128-wide heads, 8 KV heads, 26 layers, per token of context.
            assert facts.kv_bytes_per_token == 26 * 8 * (128 + 128) * 2
            polls = fake.tags_served
            await wait_for(lambda: fake.tags_served >= polls + 3)
        assert len(fake.calls("/api/show")) == 1
    finally:
        await fake.stop()


async def _hold_a_stream(http: aiohttp.ClientSession, gw: GatewayServer, fake: FakeOllama) -> aiohttp.ClientResponse:
    """Start a streamed llama request that the fake keeps open (busy) until `fake.hold` is set."""
    resp = await http.post(gw.url + "/api/generate", json={"model": "llama3.1:8b", "prompt": "long"})
    assert json.loads(await resp.content.readline())["done"] is False
    return resp


async def test_a_busy_model_is_not_evicted_and_the_queue_bounds_the_wait(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    # One 8 GiB card: llama3.1:8b (4.9 GB) is loaded and busy; qwen2.5:7b would need it evicted.
    hold = asyncio.Event()
    fake = await fakes(
        name="g0",
        models={"llama3.1:8b": 4_920_000_000, "qwen2.5:7b": 4_680_000_000},
        resident={"llama3.1:8b": 4096},
        hold=hold,
    )
    async with gateway(fake, vram_gb=8, queue_size=1) as gw:
        busy = await _hold_a_stream(http, gw, fake)
        qwen = {"model": "qwen2.5:7b", "prompt": "hi", "stream": False}
        waiting = asyncio.create_task(backend_of(http, gw, qwen))
        await wait_for(lambda: gw.app[POOL].queue_depths().get("qwen2.5:7b") == 1)
        assert not fake.calls("/api/generate")[1:]  # nothing sent: it waits at the gateway
        async with http.post(gw.url + "/api/generate", json=qwen) as resp:
            assert resp.status == 503
            assert int(resp.headers["Retry-After"]) >= 1
            assert resp.headers["X-Corral-Error"] == "gateway"
            assert "server busy" in (await resp.json())["error"]
        hold.set()  # llama finishes: now it may be evicted, and the waiting request goes
        await busy.read()
        busy.release()
        assert await asyncio.wait_for(waiting, timeout=10) == "g0"


async def test_waiting_too_long_is_a_503(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    hold = asyncio.Event()
    fake = await fakes(
        name="g0",
        models={"llama3.1:8b": 4_920_000_000, "qwen2.5:7b": 4_680_000_000},
        resident={"llama3.1:8b": 4096},
        hold=hold,
    )
    async with gateway(fake, vram_gb=8, queue_timeout_s=0.2) as gw:
        busy = await _hold_a_stream(http, gw, fake)
        async with http.post(gw.url + "/api/generate", json={"model": "qwen2.5:7b", "prompt": "hi"}) as resp:
            assert resp.status == 503
            assert "Retry-After" in resp.headers
            assert "timed out" in (await resp.json())["error"]
        hold.set()
        await busy.read()
        busy.release()


async def test_metrics_and_status_after_traffic(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    bad = await fakes(name="a", fail_status=500)
    good = await fakes(name="b", resident={"llama3.1:8b": 4096})
    async with gateway(bad, good) as gw:
        # Make "a" the first choice once (nothing resident there, but equal otherwise) by asking
        # for options b's loaded copy does not match, so the request fails over from a to b.
        payload = {**GENERATE, "options": {"num_ctx": 2048}}
        assert await backend_of(http, gw, payload) == "b"
        async with http.post(gw.url + "/api/chat", json={"model": "llama3.1:8b", "messages": []}) as resp:
            await resp.read()
        async with http.get(gw.url + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        status = await status_of(http, gw)
    for name in (
        "corral_requests_total",
        "corral_request_duration_seconds",
        "corral_time_to_first_token_seconds",
        "corral_decode_tokens_per_second",
        "corral_in_flight_requests",
        "corral_queue_depth",
        "corral_routing_decisions_total",
        "corral_backend_up",
        "corral_cold_loads_total",
        "corral_retries_total",
        "corral_failovers_total",
        "corral_ejections_total",
        "corral_model_resident",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    assert 'corral_requests_total{backend="b",model="llama3.1:8b",status="200"}' in text
    assert 'corral_failovers_total{backend="a"} 1.0' in text
    assert 'corral_model_resident{backend="b",gpus="",model="llama3.1:8b"} 1.0' in text
    assert 'decision="send"' in text

    assert mismatches(status, StatusDoc) == []  # the document is exactly its declared shape
    assert {"version", "listen", "policy", "started_at", "uptime_s", "active_requests", "queue_depths"} <= set(
        status["gateway"]
    )
    assert status["gateway"]["policy"] == "residency"
    assert status["gateway"]["active_requests"] == 0  # an idle gateway, not counting the status call
    (row,) = [s for s in status["backends"] if s["id"] == "b"]
    for key in ("url", "state", "kind", "gpu_names", "started_at", "restarts", "last_error", "healthy", "in_flight"):
        assert key in row
    assert row["state"] == "ready" and row["healthy"] is True
    (resident,) = row["resident"]
    assert resident["name"] == "llama3.1:8b" and resident["size_vram_bytes"] > 0
    assert resident["context_length"] == 4096 and resident["expires_at"] > 0
    (model_row,) = [m for m in row["models"] if m["name"] == "llama3.1:8b"]
    assert model_row["resident"] is True and model_row["slots"] == row["num_parallel"]
    assert model_row["busy"] == row["in_flight"].get("llama3.1:8b", 0)  # released asynchronously: as counted
    # What this gateway saw: the answered requests per model, and the decisions behind them.
    (stats,) = [m for m in status["models"] if m["model"] == "llama3.1:8b"]
    assert stats["requests"] >= 2 and stats["requests_per_s"] > 0 and stats["ttft_p50_s"] is not None
    assert stats["ttft_p50_s"] <= stats["ttft_p95_s"]
    sends = [d for d in status["decisions"] if d["decision"] == "send"]
    assert sends and all(d["model"] == "llama3.1:8b" and d["backend"] in ("a", "b") for d in sends)
    assert status["decisions"][0]["at"] >= status["decisions"][-1]["at"]  # newest first
    assert status["warnings"] == [] and status["gateway"]["store_ok"] is True


@pytest.mark.parametrize(("max_wait_s", "waits_at_gateway"), [(0.0, True), (30.0, False)])
async def test_max_wait_decides_between_the_backends_queue_and_the_gateways(
    fakes: MakeFake, http: aiohttp.ClientSession, max_wait_s: float, waits_at_gateway: bool
) -> None:
    # One slot, busy: a second request for the same model either queues at the backend (a short
    # expected wait) or, past [gateway] max_wait_s, waits at the gateway for the slot to free.
    hold = asyncio.Event()
    fake = await fakes(name="g0", models={"llama3.1:8b": 4_920_000_000}, resident={"llama3.1:8b": 4096}, hold=hold)
    async with gateway(fake, vram_gb=24, max_wait_s=max_wait_s) as gw:
        busy = await _hold_a_stream(http, gw, fake)
        second = asyncio.create_task(backend_of(http, gw))
        if waits_at_gateway:
            await wait_for(lambda: gw.app[POOL].queue_depths().get("llama3.1:8b") == 1)
            assert len(fake.calls("/api/generate")) == 1  # only the busy stream reached the backend
        else:
            await wait_for(lambda: len(fake.calls("/api/generate")) == 2)
            assert not gw.app[POOL].queue_depths()
        hold.set()
        await busy.read()
        busy.release()
        assert await asyncio.wait_for(second, timeout=10) == "g0"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test's own, on a free port, for the test to stop."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield f"redis://127.0.0.1:{port}/0", server
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
async def test_status_warns_when_the_state_store_is_unreachable(
    fakes: MakeFake, http: aiohttp.ClientSession, own_redis: tuple[str, subprocess.Popen[bytes]]
) -> None:
    url, server = own_redis
    store = RedisStore.from_url(url, prefix=f"corral-test-{os.getpid()}-{id(server)}:")
    await wait_for_async(store.ping)
    fake = await fakes(name="g0")
    try:
        settings = fast_settings(fake.backend(), state="redis", redis_url=url)
        async with GatewayServer(settings, store, keys=ApiKeys()) as gw:
            assert (await status_of(http, gw))["warnings"] == []
            server.terminate()
            server.wait()
            status = await status_of(http, gw)  # still answers, with what it knows
        assert status["gateway"]["store_ok"] is False and status["gateway"]["store_error"]
        (warning,) = [w for w in status["warnings"] if w["kind"] == "store_unreachable"]
        assert warning["message"].startswith("state store (redis) unreachable: ")
        assert [b["id"] for b in status["backends"]] == ["g0"] and mismatches(status, StatusDoc) == []
    finally:
        await store.close()


async def wait_for_async(probe: Any, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await probe()
            return
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)
