"""A real gateway over fake Ollama backends, driven through the requests a fleet sees, so /metrics
shows the series dashboards and alerts use: requests, streams, embeddings, /v1, a cold load, a
request in flight, a queue rejection, backend records with restarts and a GPU inventory."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.api.auth import ApiKeys
from gateway.appkeys import POOL
from gateway.record import BackendRecord
from gateway.server import GatewayServer
from gateway.state.memory import MemoryStore
from launcher.facts.cards import find_card
from launcher.facts.gpuinfo import GpuInfo, PublishedGpu
from tests.support.fakes import FakeOllama, fast_settings, wait_for

GIB = 1024**3
REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def promtool() -> str:
    """The promtool binary; CI installs it (Debian package `prometheus`), elsewhere the test skips."""
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required in CI (.ci/run installs the Debian package prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


async def exposition_under_traffic() -> str:
    """/metrics of a gateway while a stream is in flight, after a mix of traffic."""
    backend = await FakeOllama(
        name="g0",
        models={"llama3.1:8b": 5 * GIB, "nomic-embed-text": GIB // 4, "llama3.3:70b": 40 * GIB},
        resident={"llama3.3:70b": 8192},
        vram={"llama3.3:70b": 32 * GIB},
        load_duration_ns=2_000_000_000,  # above cold_load_threshold_s: every reply counts as a load
        chunks=4,
    ).start()
    store = MemoryStore()
    await store.put_backend(
        BackendRecord(
            id="g0",
            url=backend.url,
            host="gpu-host-1",
            gpu_uuids=("GPU-0000",),
            gpu_names=("RTX 4090",),
            num_parallel=1,
            vram_total_bytes=24 * GIB,
            planned_models=("llama3.1:8b",),
            restarts=1,
        )
    )
    card = find_card("RTX 4090")
    assert card is not None
    gpu = GpuInfo(0, "GPU-0000", "RTX 4090", 24 * GIB, 18 * GIB, 6 * GIB, card)
    await store.put_gpus("gpu-host-1", [PublishedGpu(gpu, "g0")])
    # No waiting at a busy backend and no room in the gateway queue: a request finding no free slot
    # is refused at once.
    settings = fast_settings(queue_size=0, queue_timeout_s=1.0, max_wait_s=0.0)
    try:
        async with GatewayServer(settings, store, keys=ApiKeys()) as gw, aiohttp.ClientSession() as http:
            url = gw.url
            pool = gw.app[POOL]

            async def settled() -> None:
                # A finished request frees its slot a moment after its last byte: wait for it, or the
                # next request finds the only slot taken and (with no queue room) gets a 503.
                await wait_for(lambda: not any(sum(v.in_flight.values()) for v in pool.views()))

            gen = {"model": "llama3.1:8b", "prompt": "hi", "stream": False}
            for _ in range(2):
                async with http.post(url + "/api/generate", json=gen) as resp:
                    assert resp.status == 200, await resp.text()
                await settled()
            chat = {"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]}
            async with http.post(url + "/api/chat", json=chat) as resp:
                assert resp.status == 200
                await resp.read()
            await settled()
            async with http.post(url + "/api/embed", json={"model": "nomic-embed-text", "input": "hi"}) as resp:
                assert resp.status == 200
            await settled()
            v1 = {"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]}
            async with http.post(url + "/v1/chat/completions", json=v1) as resp:
                assert resp.status == 200
            await settled()
            async with http.get(url + "/api/tags") as resp:
                assert resp.status == 200

            # One stream held open on the only slot; the next request for the model finds no slot
            # and, with no queue room, is refused with 503.
            backend.hold = asyncio.Event()
            backend.stream_started.clear()
            held = asyncio.ensure_future(_read_all(http, url + "/api/chat", chat))
            await asyncio.wait_for(backend.stream_started.wait(), 10)
            async with http.post(url + "/api/generate", json=gen) as resp:
                assert resp.status == 503, await resp.text()
            async with http.get(url + "/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
            backend.hold.set()
            await asyncio.wait_for(held, 10)
            return text
    finally:
        if backend.hold is not None:
            backend.hold.set()
        await backend.stop()


async def _read_all(http: aiohttp.ClientSession, url: str, payload: dict[str, object]) -> bytes:
    async with http.post(url, json=payload) as resp:
        return await resp.read()


def exported_names(text: str) -> set[str]:
    """Every name a PromQL query can select from this exposition: sample names, plus the names a
    family declares (a counter `x` is queried as `x_total`, a histogram as `x_bucket` ...)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def queried_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\bcorral_[a-z0-9_]+", expr))
