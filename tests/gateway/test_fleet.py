"""Fleet-wide calls: merged listings, pull fan-out with one progress stream, once-per-store management."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import Any

import aiohttp
import ollama
import pytest
from aiohttp import web

from gateway.api import progress
from gateway.api.auth import ApiKeys
from gateway.app import create_app
from gateway.appkeys import TRACKER
from gateway.record import BackendRecord
from gateway.routing.snapshot import BackendView
from gateway.server import GatewayServer
from gateway.state.memory import MemoryStore
from tests.support.fakes import FakeOllama, MakeFake, fast_settings, wait_for


def gateway(*backends: FakeOllama, gpus: dict[str, tuple[str, ...]] | None = None) -> GatewayServer:
    settings = fast_settings(*(b.backend(gpus=(gpus or {}).get(b.name, ())) for b in backends))
    return GatewayServer(settings, MemoryStore(), keys=ApiKeys())


async def shared_store_gateway(*backends: FakeOllama, store_id: str) -> GatewayServer:
    """A gateway whose backends come from records (as a launcher writes them) sharing one store;
    static config cannot say that two backends share a store."""
    store = MemoryStore()
    for b in backends:
        await store.put_backend(BackendRecord(id=b.name, url=b.url, store_id=store_id))
    return GatewayServer(fast_settings(), store, keys=ApiKeys())


async def test_tags_and_openai_models_list_the_union_once(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    a = await fakes(name="a", models={"llama3.1:8b": 1, "qwen2.5:7b": 2})
    b = await fakes(name="b", models={"llama3.1:8b": 1, "nomic-embed-text:latest": 3})
    async with gateway(a, b) as gw:
        async with http.get(gw.url + "/api/tags") as resp:
            names = sorted(m["name"] for m in (await resp.json())["models"])
        assert names == ["llama3.1:8b", "nomic-embed-text:latest", "qwen2.5:7b"]
        async with http.get(gw.url + "/v1/models") as resp:
            body = await resp.json()
        assert body["object"] == "list"
        assert sorted(m["id"] for m in body["data"]) == names
        async with http.head(gw.url + "/api/tags") as resp:
            assert resp.status == 200


async def test_ps_lists_a_model_once_with_every_copy_and_the_official_client_parses_it(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    a = await fakes(name="a", resident={"llama3.1:8b": 4096})
    b = await fakes(name="b", resident={"llama3.1:8b": 8192})
    gw = gateway(a, b, gpus={"a": ("GPU-aaaa",), "b": ("RTX 4090",)})
    async with gw:
        async with http.get(gw.url + "/api/ps") as resp:
            rows = (await resp.json())["models"]
        async with http.get(a.url + "/api/ps") as resp:
            one = (await resp.json())["models"][0]
        client = ollama.AsyncClient(host=gw.url)
        try:
            listed = await client.ps()
        finally:
            await client.close()
    assert [r["name"] for r in rows] == ["llama3.1:8b"]  # once, like Ollama
    row = rows[0]
    copies = {c["backend"]: c for c in row["corral_copies"]}
    assert set(copies) == {"a", "b"}
    assert copies["a"]["gpu_uuids"] == ["GPU-aaaa"] and copies["b"]["gpus"] == ["RTX 4090"]
    assert row["context_length"] == 8192  # the largest
    assert row["size"] == sum(c["size"] for c in copies.values()) and row["size"] > one["size"]
    assert [m.model for m in listed.models] == ["llama3.1:8b"]  # what ollama-python reads


def _lines(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in body.splitlines() if line.strip()]


async def test_pull_fans_out_to_every_store_with_one_merged_stream(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    a = await fakes(name="a")
    b = await fakes(name="b")
    async with gateway(a, b) as gw:
        async with http.post(gw.url + "/api/pull", json={"model": "gemma3:4b"}) as resp:
            assert resp.status == 200
            lines = _lines(await resp.read())
        assert len(a.calls("/api/pull")) == 1 and len(b.calls("/api/pull")) == 1
        assert lines[0] == {"status": "pulling manifest"}
        assert lines[-1] == {"status": "success"}
        assert sum(1 for line in lines if line.get("status") == "success") == 1
        # Layer progress is summed over both downloads: 2 x 100 bytes per layer when both are done.
        layer = [line for line in lines if line.get("digest") == f"sha256:{0:064x}"]
        assert layer[-1]["total"] == 200 and layer[-1]["completed"] == 200
        # The pulled model is routable at once: the gateway re-read the inventories.
        async with http.post(
            gw.url + "/api/generate", json={"model": "gemma3:4b", "prompt": "hi", "stream": False}
        ) as resp:
            assert resp.status == 200


async def test_pull_on_a_shared_store_downloads_once(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    a = await fakes(name="a")
    b = await fakes(name="b")
    gw = await shared_store_gateway(a, b, store_id="host1:/models")
    async with gw, http.post(gw.url + "/api/pull", json={"model": "gemma3:4b", "stream": False}) as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "success"}
    assert len(a.calls("/api/pull")) + len(b.calls("/api/pull")) == 1


async def test_pull_error_is_the_backends_own(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    a = await fakes(name="a")
    async with gateway(a) as gw, http.post(gw.url + "/api/pull", json={"model": "no-such-model"}) as resp:
        assert resp.status == 500
        assert "file does not exist" in (await resp.json())["error"]


async def test_delete_and_copy_act_once_per_store(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    a = await fakes(name="a", models={"llama3.1:8b": 1})
    b = await fakes(name="b", models={"llama3.1:8b": 1})
    c = await fakes(name="c", models={"qwen2.5:7b": 1})
    async with await shared_store_gateway(a, b, store_id="shared") as gw:
        async with http.post(gw.url + "/api/copy", json={"source": "llama3.1:8b", "destination": "mine:1"}) as resp:
            assert resp.status == 200
        assert len(a.calls("/api/copy")) + len(b.calls("/api/copy")) == 1
        async with http.delete(gw.url + "/api/delete", json={"model": "llama3.1:8b"}) as resp:
            assert resp.status == 200
            assert await resp.read() == b""
        assert len(a.calls("/api/delete")) + len(b.calls("/api/delete")) == 1
    async with gateway(c) as gw, http.delete(gw.url + "/api/delete", json={"model": "llama3.1:8b"}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "model 'llama3.1:8b' not found"


async def test_blobs_go_to_every_distinct_store(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    a = await fakes(name="a")
    b = await fakes(name="b")
    digest = "sha256:" + "ab" * 32
    blob = bytes(range(256)) * 8192  # 2 MiB: more than one chunk
    async with gateway(a, b) as gw:
        async with http.head(gw.url + f"/api/blobs/{digest}") as resp:
            assert resp.status == 404
        async with http.post(gw.url + f"/api/blobs/{digest}", data=io.BytesIO(blob)) as resp:
            assert resp.status == 201
        async with http.head(gw.url + f"/api/blobs/{digest}") as resp:
            assert resp.status == 200
    for fake in (a, b):
        (upload,) = [r for r in fake.received if r.method == "POST" and r.path.startswith("/api/blobs/")]
        assert upload.body == blob


async def test_create_and_push_reach_the_fleet(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    a = await fakes(name="a")
    b = await fakes(name="b")
    async with gateway(a, b) as gw:
        async with http.post(gw.url + "/api/create", json={"model": "mine:1", "from": "llama3.1:8b"}) as resp:
            assert _lines(await resp.read())[-1] == {"status": "success"}
        assert "mine:1" in a.models and "mine:1" in b.models
        async with http.post(gw.url + "/api/push", json={"model": "mine:1", "stream": False}) as resp:
            assert resp.status == 200
        assert len(a.calls("/api/push")) + len(b.calls("/api/push")) == 1


async def test_a_pull_stream_that_nobody_reads_any_more_stops_when_cancelled(fakes: MakeFake) -> None:
    """The merge stops reading when the client hangs up; each backend's reader must then end at
    once, even with the queue between them full, or the request would never finish."""
    fake = await fakes(name="a", pull_layers=20)
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=2)
    backend = BackendView(record=BackendRecord(id="a", url=fake.url), healthy=True, installed=frozenset())
    async with aiohttp.ClientSession() as session:
        pump = asyncio.create_task(
            progress._pump(session, backend, "/api/pull", b'{"model": "m:1"}', aiohttp.ClientTimeout(), queue)
        )
        await wait_for(queue.full)
        pump.cancel()
        done, _ = await asyncio.wait([pump], timeout=5)
        while not pump.done():  # without the fix: unblock it, so the test fails instead of hanging
            queue.get_nowait()
            await asyncio.sleep(0.01)
    assert done, "a cancelled pump stayed blocked on a queue nobody reads"


async def test_a_client_hanging_up_on_a_push_is_not_a_gateway_error(
    fakes: MakeFake, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    hold = asyncio.Event()
    fake = await fakes(name="a", hold=hold)
    app = create_app(fast_settings(fake.backend()), MemoryStore(), keys=ApiKeys())
    # Without handler cancellation the hang-up shows as a failed write, the case under test.
    runner = web.AppRunner(app, handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        resp = await http.post(f"http://127.0.0.1:{port}/api/push", json={"model": "llama3.1:8b"})
        assert json.loads(await resp.content.readline()) == {"status": "retrieving manifest"}
        resp.close()
        assert runner.server is not None
        server = runner.server
        await wait_for(lambda: all(c.transport is None for c in server.connections))  # it saw the hang-up
        with caplog.at_level(logging.ERROR, logger="gateway"):
            hold.set()
            await wait_for(lambda: app[TRACKER].active == 0)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        await runner.cleanup()
