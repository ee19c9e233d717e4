"""The simulated scheduler's rules (Ollama's server/sched.go), driven by a hand-stepped clock."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from launcher.config import SimGpu
from launcher.facts.names import ModelName
from launcher.gpus.discovery import simulated_inventory
from launcher.models.gguf import encode_gguf_metadata
from launcher.models.store import MEDIA_TYPE_CONFIG, MEDIA_TYPE_MODEL, Layer, ModelStore
from launcher.sim.clock import ManualClock
from launcher.sim.engine import DecodeEngine
from launcher.sim.handlers_infer import load_key_for
from launcher.sim.harness import install_models
from launcher.sim.inference import RunnerStopped, embed_inputs
from launcher.sim.models import InstalledModel, load_installed
from launcher.sim.options import parse_options
from launcher.sim.pull import PullManager
from launcher.sim.runner import LoadKey, RunnerOptions
from launcher.sim.scheduler import Lease, LoadFailed, QueueFull, Scheduler, SchedulerSettings

LOAD_S = 1.0  # with load_gbps this high, a load is the runner start (0.6 s) plus a little


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    root = tmp_path_factory.mktemp("models")
    install_models(root, "llama3.1:8b", "qwen2.5:7b", "mistral:7b", "nomic-embed-text", "llama3.3:70b")
    return ModelStore(root)


def model(store: ModelStore, name: str) -> InstalledModel:
    m = load_installed(store, name)
    assert m is not None
    return m


def key(num_ctx: int = 4096, num_gpu: int = -1) -> LoadKey:
    return LoadKey(RunnerOptions(num_ctx=num_ctx, num_gpu=num_gpu))


async def make(cards: list[str], **settings: Any) -> tuple[Scheduler, ManualClock]:
    clock = ManualClock()
    inventory = tuple(simulated_inventory([SimGpu(c) for c in cards]))
    options: dict[str, Any] = {"load_gbps": 1e6, "default_keep_alive_s": 300.0} | settings
    sched = Scheduler(SchedulerSettings(cards=inventory, **options), clock)
    sched.start()
    return sched, clock


Pair = tuple[Scheduler, ManualClock]


@pytest.fixture
async def one_4090() -> AsyncIterator[Pair]:
    sched, clock = await make(["RTX 4090"])
    yield sched, clock
    await sched.close()


async def acquire(
    sched: Scheduler, clock: ManualClock, m: InstalledModel, k: LoadKey | None = None, keep_alive_s: float | None = None
) -> Lease:
    """Ask for a runner and let the (short) load happen."""
    task = asyncio.create_task(sched.acquire(m, k or key(), keep_alive_s=keep_alive_s))
    await clock.advance(LOAD_S)
    return await asyncio.wait_for(task, 1)


async def test_second_request_attaches_to_the_loaded_runner(store: ModelStore, one_4090: Pair) -> None:
    sched, clock = one_4090
    llama = model(store, "llama3.1:8b")
    first = await acquire(sched, clock, llama)
    second = await sched.acquire(llama, key(), keep_alive_s=None)  # no clock advance needed: no queue
    assert first.runner is second.runner
    assert first.loaded_now and not second.queued
    assert sched.loads == 1 and first.runner.ref_count == 2


async def test_keep_alive_timer_starts_when_idle(store: ModelStore, one_4090: Pair) -> None:
    sched, clock = one_4090
    lease = await acquire(sched, clock, model(store, "llama3.1:8b"), keep_alive_s=60.0)
    await clock.advance(120)  # busy: no expiry however long it runs
    assert sched.loaded
    lease.release()
    assert lease.runner.expires_at == pytest.approx(clock.wall_time() + 60)
    await clock.advance(59)
    assert sched.loaded
    await clock.advance(2)
    assert not sched.loaded


async def test_keep_alive_zero_and_forever(store: ModelStore, one_4090: Pair) -> None:
    sched, clock = one_4090
    lease = await acquire(sched, clock, model(store, "llama3.1:8b"), keep_alive_s=0.0)
    lease.release()
    await clock.settle()
    assert not sched.loaded
    lease = await acquire(sched, clock, model(store, "llama3.1:8b"), keep_alive_s=math.inf)
    lease.release()
    await clock.advance(10**7)
    assert sched.loaded


async def test_each_request_overwrites_the_keep_alive(store: ModelStore, one_4090: Pair) -> None:
    sched, clock = one_4090
    llama = model(store, "llama3.1:8b")
    (await acquire(sched, clock, llama, keep_alive_s=math.inf)).release()
    (await sched.acquire(llama, key(), keep_alive_s=5.0)).release()
    await clock.advance(6)
    assert not sched.loaded


async def test_expire_runner_waits_for_the_request_in_flight(store: ModelStore, one_4090: Pair) -> None:
    sched, clock = one_4090
    llama = model(store, "llama3.1:8b")
    lease = await acquire(sched, clock, llama)
    sched.expire_runner(llama)
    await clock.settle()
    assert sched.loaded  # never cut off mid-request
    lease.release()
    await clock.settle()
    assert not sched.loaded


async def test_a_model_that_does_not_fit_evicts_the_idle_one(store: ModelStore, one_4090: Pair) -> None:
    sched, clock = one_4090
    # llama3.1:8b at 128K holds ~21 GiB of the 24 GiB card; qwen2.5:7b at 32K is predicted at ~7 GiB
    # (file + f16 KV + 768 MiB surcharge), over 80 % of what is left.
    (await acquire(sched, clock, model(store, "llama3.1:8b"), key(num_ctx=131072))).release()
    lease = await acquire(sched, clock, model(store, "qwen2.5:7b"), key(num_ctx=32768))
    assert [r.model.name for r in sched.loaded.values()] == ["qwen2.5:7b"]
    assert sched.evictions == 1
    lease.release()


async def test_small_models_share_the_card(store: ModelStore, one_4090: Pair) -> None:
    sched, clock = one_4090
    (await acquire(sched, clock, model(store, "llama3.1:8b"))).release()
    (await acquire(sched, clock, model(store, "qwen2.5:7b"))).release()
    assert len(sched.loaded) == 2 and sched.evictions == 0
    used = sched.card_used_bytes()["GPU-sim-0000"]
    assert used == sum(r.size_vram_bytes for r in sched.loaded.values())


async def test_a_busy_model_is_not_evicted_until_its_request_ends(store: ModelStore, one_4090: Pair) -> None:
    sched, clock = one_4090
    busy = await acquire(sched, clock, model(store, "llama3.1:8b"), key(num_ctx=131072))
    waiting = asyncio.create_task(sched.acquire(model(store, "qwen2.5:7b"), key(num_ctx=32768), keep_alive_s=None))
    await clock.advance(100)
    assert not waiting.done()
    assert [r.model.name for r in sched.loaded.values()] == ["llama3.1:8b"]
    busy.release()
    await clock.advance(LOAD_S)
    lease = await asyncio.wait_for(waiting, 1)
    assert lease.runner.model.name == "qwen2.5:7b" and lease.queued


async def test_victim_is_the_shortest_keep_alive(store: ModelStore) -> None:
    sched, clock = await make(["RTX 4090"], max_runners=2)
    try:
        (await acquire(sched, clock, model(store, "llama3.1:8b"), keep_alive_s=600.0)).release()
        (await acquire(sched, clock, model(store, "qwen2.5:7b"), keep_alive_s=60.0)).release()
        (await acquire(sched, clock, model(store, "mistral:7b"))).release()  # max 2 loaded: one must go
        assert sorted(r.model.name for r in sched.loaded.values()) == ["llama3.1:8b", "mistral:7b"]
    finally:
        await sched.close()


async def test_max_loaded_models(store: ModelStore) -> None:
    sched, clock = await make(["RTX 4090"], max_runners=1)
    try:
        (await acquire(sched, clock, model(store, "llama3.1:8b"))).release()
        (await acquire(sched, clock, model(store, "nomic-embed-text"))).release()  # fits, but the limit is 1
        assert [r.model.name for r in sched.loaded.values()] == ["nomic-embed-text:latest"]
    finally:
        await sched.close()


async def test_queue_full_is_refused(store: ModelStore) -> None:
    sched, clock = await make(["RTX 4090"], max_queue=1, load_gbps=0.001)  # loads take a long while
    try:
        llama, qwen, embed = model(store, "llama3.1:8b"), model(store, "qwen2.5:7b"), model(store, "nomic-embed-text")
        first = asyncio.create_task(sched.acquire(embed, key(), keep_alive_s=None))
        await clock.advance(1000)
        (await asyncio.wait_for(first, 1)).release()
        loading = asyncio.create_task(sched.acquire(llama, key(), keep_alive_s=None))
        await clock.settle()  # the scheduler took it from the queue and is loading
        queued = asyncio.create_task(sched.acquire(qwen, key(), keep_alive_s=None))
        await clock.settle()
        with pytest.raises(QueueFull) as full:
            await sched.acquire(qwen, key(), keep_alive_s=None)
        assert str(full.value) == "server busy, please try again.  maximum pending requests exceeded"
        # A request for a model already loaded never queues: it only waits for a slot.
        warm = await asyncio.wait_for(sched.acquire(embed, key(), keep_alive_s=None), 1)
        assert not warm.queued
        warm.release()
        loading.cancel()
        queued.cancel()
    finally:
        await sched.close()


async def test_changed_load_options_force_a_reload(store: ModelStore, one_4090: Pair) -> None:
    sched, clock = one_4090
    llama = model(store, "llama3.1:8b")
    first = await acquire(sched, clock, llama, key(num_ctx=4096))
    first.release()
    same = await sched.acquire(llama, key(num_ctx=4096, num_gpu=-1), keep_alive_s=None)
    same.release()
    assert sched.loads == 1
    second = await acquire(sched, clock, llama, key(num_ctx=8192))
    assert sched.loads == 2 and first.runner.unloaded
    assert second.runner.context_length == 8192
    second.release()
    # The context is capped to what the model was trained for, so a larger ask does not reload again.
    assert not second.runner.needs_reload(key(num_ctx=8192))


async def test_num_ctx_is_capped_to_the_model(store: ModelStore, one_4090: Pair) -> None:
    sched, clock = one_4090
    lease = await acquire(sched, clock, model(store, "nomic-embed-text"), key(num_ctx=32768))
    assert lease.runner.context_length == 2048
    assert lease.runner.num_parallel == 1
    lease.release()


async def test_a_model_larger_than_one_card_is_split(store: ModelStore) -> None:
    sched, clock = await make(["RTX 4090", "RTX 3090"], sched_spread=True)
    try:
        lease = await acquire(sched, clock, model(store, "llama3.3:70b"), key(num_ctx=8192))
        runner = lease.runner
        assert set(runner.card_bytes) == {"GPU-sim-0000", "GPU-sim-0001"}
        assert runner.size_vram_bytes == runner.size_bytes  # fully on the GPUs
        assert runner.placement.is_split
        lease.release()
    finally:
        await sched.close()


async def test_alone_a_too_large_model_offloads_to_cpu(store: ModelStore, one_4090: Pair) -> None:
    sched, clock = one_4090
    lease = await acquire(sched, clock, model(store, "llama3.3:70b"), key(num_ctx=8192))
    assert 0 < lease.runner.size_vram_bytes < lease.runner.size_bytes
    lease.release()


async def test_cpu_only_backend_holds_everything_in_host_memory(store: ModelStore) -> None:
    sched, clock = await make([])
    try:
        lease = await acquire(sched, clock, model(store, "llama3.1:8b"))
        assert lease.runner.size_vram_bytes == 0 and lease.runner.size_bytes > 4_900_000_000
        lease.release()
    finally:
        await sched.close()


async def test_a_model_too_large_for_host_memory_fails(store: ModelStore) -> None:
    sched, clock = await make(["RTX 3060"], host_mem_bytes=8 * 1024**3)
    try:
        with pytest.raises(LoadFailed, match="failed to allocate buffer of size"):
            await acquire(sched, clock, model(store, "llama3.3:70b"))
    finally:
        await sched.close()


async def test_a_client_that_gives_up_while_queued_is_skipped(store: ModelStore) -> None:
    sched, clock = await make(["RTX 4090"], load_gbps=0.01)
    try:
        task = asyncio.create_task(sched.acquire(model(store, "llama3.1:8b"), key(), keep_alive_s=None))
        await clock.advance(1)
        task.cancel()
        await clock.advance(10_000)
        assert not sched.loaded and sched.loads == 0  # the abandoned load did not complete
    finally:
        await sched.close()


def test_installed_models_know_their_facts(store: ModelStore) -> None:
    llama = model(store, "llama3.1:8b")
    assert llama.capabilities == ("completion", "tools")
    assert llama.spec.block_count == 32 and llama.spec.context_length == 131072
    assert llama.details()["parameter_size"] == "8.0B"
    embed = model(store, "nomic-embed-text")
    assert embed.capabilities == ("embedding",)
    assert embed.num_parallel_cap == 1
    assert Path(store.blob_path(llama.key)).stat().st_size < 10_000  # a metadata-only stand-in


async def test_queue_capacity_counts_like_ollamas_channel(store: ModelStore) -> None:
    """OLLAMA_MAX_QUEUE is a buffered channel whose idle reader takes the first request at once: with
    room for one, a burst of three arriving together gets one loading, one queued, one refused."""
    sched, clock = await make(["RTX 4090"], max_queue=1, load_gbps=0.001)
    try:
        names = ("llama3.1:8b", "qwen2.5:7b", "mistral:7b")
        burst = [asyncio.create_task(sched.acquire(model(store, n), key(), keep_alive_s=None)) for n in names]
        await clock.settle()
        assert [t.done() for t in burst] == [False, False, True]
        assert isinstance(burst[2].exception(), QueueFull)
        for task in burst[:2]:
            task.cancel()
    finally:
        await sched.close()


async def test_cpu_only_models_load_side_by_side(store: ModelStore) -> None:
    """Ollama's pre-flight eviction check weighs GPU memory only (len(loadGpus) > 0): on the CPU a second
    model loads beside the first while host memory holds both, and one is evicted once it does not."""
    sched, clock = await make([], host_mem_bytes=12 * 1024**3)  # each of these needs ~4.6-5.1 GiB
    try:
        (await acquire(sched, clock, model(store, "llama3.1:8b"))).release()
        (await acquire(sched, clock, model(store, "qwen2.5:7b"))).release()
        assert len(sched.loaded) == 2 and sched.evictions == 0
        (await acquire(sched, clock, model(store, "mistral:7b"))).release()  # a third would need ~14 GiB
        assert len(sched.loaded) == 2 and sched.evictions == 1
        assert "mistral:7b" in [r.model.name for r in sched.loaded.values()]
    finally:
        await sched.close()


def _install_gguf(store: ModelStore, name: str, metadata: dict[str, object]) -> InstalledModel:
    blob = store.write_blob(encode_gguf_metadata(metadata))
    config = store.write_blob(b"{}")
    store.write_manifest(name, Layer(MEDIA_TYPE_CONFIG, config, 2), [Layer(MEDIA_TYPE_MODEL, blob, 2 * 10**9)])
    return model(store, name)


def _llama_header(**extra: object) -> dict[str, object]:
    return {
        "general.architecture": "llama",
        "general.file_type": 15,
        "llama.block_count": 32,
        "llama.context_length": 131072,
        "llama.embedding_length": 4096,
        "llama.attention.head_count": 32,
        "llama.attention.head_count_kv": 8,
        **extra,
    }


async def test_vision_models_are_recognised_and_get_at_least_2048_context(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    # Ollama reads these through f.KeyValue, which prefixes the architecture.
    seeing = _install_gguf(store, "seeing:1b", _llama_header(**{"llama.vision.block_count": 24}))
    hearing = _install_gguf(store, "hearing:1b", _llama_header(**{"llama.audio.block_count": 12}))
    assert seeing.capabilities == ("completion", "vision")
    assert hearing.capabilities == ("completion", "audio")
    sched, clock = await make(["RTX 4090"])
    try:
        lease = await acquire(sched, clock, seeing, key(num_ctx=1024))
        assert lease.runner.context_length == 2048  # multimodal models require at least 2048
        lease.release()
    finally:
        await sched.close()


def _opts(request: dict[str, Any], *, shift: bool | None = None, m: InstalledModel | None = None) -> LoadKey:
    parsed = parse_options({}, request, default_num_ctx=4096, env_context_length=0)
    return parsed.load_key if m is None else load_key_for(m, parsed, shift)


async def test_every_runner_option_ollama_compares_forces_a_reload(store: ModelStore, one_4090: Pair) -> None:
    sched, clock = one_4090
    llama = model(store, "llama3.1:8b")
    lease = await acquire(sched, clock, llama, _opts({}, m=llama))
    runner = lease.runner
    lease.release()
    assert not runner.needs_reload(_opts({"num_gpu": -1, "temperature": 0.1}, m=llama))
    assert runner.needs_reload(_opts({"draft_num_predict": 4}, m=llama))
    assert runner.needs_reload(_opts({}, shift=False, m=llama))  # the context-shift flag is a launch argument
    assert not runner.needs_reload(_opts({}, shift=True, m=llama))


async def test_num_ctx_zero_is_clamped_not_defaulted(store: ModelStore, one_4090: Pair) -> None:
    sched, clock = one_4090
    lease = await acquire(sched, clock, model(store, "llama3.1:8b"), _opts({"num_ctx": 0}))
    assert lease.runner.context_length == 4  # getRunner: opts.NumCtx < 4 -> 4
    lease.release()


async def test_a_closed_engine_produces_nothing() -> None:
    """A request that was still waiting for a slot when its runner unloaded must not decode on it."""
    clock = ManualClock()
    engine = DecodeEngine(clock, step_s=lambda batch, ctx: 0.01, prefill_s=lambda n: 0.01)
    await engine.close()

    async def tokens() -> list[int]:
        return [p.tokens async for p in engine.generate(10, 5)]

    assert await asyncio.wait_for(tokens(), 1) == [-1]
    assert engine.steps == 0


async def test_embedding_on_a_runner_that_went_away_is_an_error(store: ModelStore) -> None:
    sched, clock = await make(["RTX 4090"])
    embed = model(store, "nomic-embed-text")
    lease = await acquire(sched, clock, embed)
    await sched.close()  # the server stops while the request holds its runner
    service = SimpleNamespace(clock=clock)
    with pytest.raises(RunnerStopped):
        await asyncio.wait_for(embed_inputs(service, lease, embed, ["some text"]), 1)  # type: ignore[arg-type]


async def test_closing_mid_load_leaves_no_timer_behind(store: ModelStore) -> None:
    sched, clock = await make(["RTX 4090"], load_gbps=0.01)
    task = asyncio.create_task(sched.acquire(model(store, "llama3.1:8b"), key(), keep_alive_s=None))
    await clock.advance(1)
    assert clock.pending == 1  # the load's simulated wait
    await sched.close()
    await clock.settle()
    assert clock.pending == 0
    assert task.cancelled()


async def test_closing_mid_download_leaves_no_timer_behind(tmp_path: Path) -> None:
    clock = ManualClock()
    pulls = PullManager(ModelStore(tmp_path), clock, download_mbps=1.0)
    progress = pulls.pull(ModelName.parse("qwen2.5:0.5b"))
    assert await progress.__anext__() == {"status": "pulling manifest"}
    first = await asyncio.wait_for(progress.__anext__(), 5)  # the model blob, 0 bytes in
    assert first["status"].startswith("pulling ") and clock.pending == 1
    await pulls.close()
    await progress.aclose()
    await clock.settle()
    assert clock.pending == 0
