"""One suite over every StateStore: the in-memory one and Redis (the real server at 127.0.0.1:6379)."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gateway.record import BackendKind, BackendRecord, BackendState
from gateway.state.memory import MemoryStore
from gateway.state.redis_store import RedisStore
from gateway.state.store import StateStore, open_store
from launcher.facts.cards import find_card
from launcher.facts.gpuinfo import GpuInfo, PublishedGpu

REDIS_URL = os.environ.get("CORRAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


async def _redis_or_skip() -> None:
    probe = RedisStore.from_url(REDIS_URL)
    try:
        await asyncio.wait_for(probe.ping(), timeout=2)
    except Exception as e:  # any failure to reach it
        if os.environ.get("CI"):
            pytest.fail(f"Redis is required in CI at {REDIS_URL}: {e}")
        pytest.skip(f"no Redis at {REDIS_URL}: {e}")
    finally:
        await probe.close()


def _redis_factory(prefix: str) -> Callable[[], RedisStore]:
    return lambda: RedisStore.from_url(REDIS_URL, prefix=prefix, owner_ttl_s=1.0)


@pytest.fixture(params=["memory", "redis"])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[], StateStore]]:
    """A factory: several stores from one factory share state (like several gateways on one Redis)."""
    created: list[StateStore] = []
    if request.param == "redis":
        await _redis_or_skip()
        factory: Callable[[], StateStore] = _redis_factory(f"corral-test-{uuid.uuid4().hex}:")
    else:
        shared = MemoryStore()
        factory = lambda: shared  # noqa: E731 - one process has one memory store

    def make() -> StateStore:
        store = factory()
        created.append(store)
        return store

    yield make
    for store in {id(s): s for s in created}.values():
        await store.close()


def _record(backend_id: str, **kw: object) -> BackendRecord:
    return BackendRecord(
        id=backend_id,
        url=f"http://127.0.0.1:{11500 + len(backend_id)}",
        gpu_uuids=("GPU-a",),
        gpu_names=("RTX 4090",),
        kind=BackendKind.SINGLE,
        num_parallel=4,
        planned_models=("llama3.1:8b",),
        **kw,  # type: ignore[arg-type]
    )


async def _eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        await asyncio.sleep(0.05)


async def test_records_round_trip_and_update(make_store: Callable[[], StateStore]) -> None:
    store = make_store()
    await store.put_backend(_record("g0"))
    await store.put_backend(_record("g1", state=BackendState.STARTING))
    records = {r.id: r for r in await store.list_backends()}
    assert set(records) == {"g0", "g1"}
    assert records["g0"] == _record("g0", updated_at=records["g0"].updated_at)
    await store.put_backend(records["g1"].with_state(BackendState.READY))
    assert {r.id: r.state for r in await store.list_backends()}["g1"] is BackendState.READY
    await store.remove_backend("g0")
    assert [r.id for r in await store.list_backends()] == ["g1"]


async def test_a_record_without_heartbeat_expires(make_store: Callable[[], StateStore]) -> None:
    store = make_store()
    await store.put_backend(_record("kept"))
    await store.put_backend(_record("lapsing"), ttl_s=0.2)

    async def lapsed() -> bool:
        return [r.id for r in await store.list_backends()] == ["kept"]

    await _eventually(lapsed)


def _gpu(name: str, free_bytes: int = 0, backend: str = "", planned_bytes: int = 0) -> PublishedGpu:
    card = find_card(name)
    assert card is not None
    gpu = GpuInfo(0, f"GPU-{name}", name, card.vram_bytes, free_bytes, card.vram_bytes - free_bytes, card)
    return PublishedGpu(gpu, backend, planned_bytes)


async def test_gpu_lists_per_host(make_store: Callable[[], StateStore]) -> None:
    store = make_store()
    await store.put_gpus("box-a", [_gpu("RTX 4090", 1, backend="g0", planned_bytes=9 * 1024**3)])
    await store.put_gpus("box-b", [_gpu("H100 80GB", 2)], ttl_s=60)
    gpus = await store.list_gpus()
    # Typed, and back exactly as written (the plan's bytes on the card too).
    assert gpus["box-a"] == [_gpu("RTX 4090", 1, backend="g0", planned_bytes=9 * 1024**3)]
    assert gpus["box-b"][0].gpu.memory_free_bytes == 2


async def test_a_gpu_list_without_heartbeat_expires(make_store: Callable[[], StateStore]) -> None:
    store = make_store()
    await store.put_gpus("kept", [_gpu("RTX 4090")])
    await store.put_gpus("lapsing", [_gpu("RTX 3090")], ttl_s=0.2)
    assert set(await store.list_gpus()) == {"kept", "lapsing"}

    async def lapsed() -> bool:
        return set(await store.list_gpus()) == {"kept"}

    await _eventually(lapsed)


async def test_in_flight_counts_are_shared_and_never_negative(make_store: Callable[[], StateStore]) -> None:
    gateway_a, gateway_b = make_store(), make_store()
    await gateway_a.incr_in_flight("g0", "llama3.1:8b")
    await gateway_b.incr_in_flight("g0", "llama3.1:8b")
    await gateway_b.incr_in_flight("g1", "qwen2.5:7b")
    assert await gateway_a.in_flight() == {"g0": {"llama3.1:8b": 2}, "g1": {"qwen2.5:7b": 1}}
    await gateway_a.decr_in_flight("g0", "llama3.1:8b")
    await gateway_b.decr_in_flight("g1", "qwen2.5:7b")
    assert await gateway_b.in_flight() == {"g0": {"llama3.1:8b": 1}}
    await gateway_b.decr_in_flight("g0", "llama3.1:8b")
    assert await gateway_b.decr_in_flight("g0", "llama3.1:8b") == 0  # one too many: stays at zero
    assert await gateway_a.in_flight() == {}
    await gateway_a.incr_in_flight("g0", "llama3.1:8b")
    assert await gateway_a.in_flight() == {"g0": {"llama3.1:8b": 1}}


async def test_one_gateways_extra_decrement_does_not_eat_anothers_count() -> None:
    await _redis_or_skip()
    factory = _redis_factory(f"corral-test-{uuid.uuid4().hex}:")
    a, b = factory(), factory()
    try:
        await b.incr_in_flight("g0", "m")
        await a.decr_in_flight("g0", "m")  # a bug elsewhere in gateway a must not hide b's request
        assert await a.in_flight() == {"g0": {"m": 1}}
    finally:
        await a.close()
        await b.close()


async def test_concurrent_increments_are_atomic(make_store: Callable[[], StateStore]) -> None:
    stores = [make_store() for _ in range(3)]
    await asyncio.gather(*(s.incr_in_flight("g0", "m") for s in stores for _ in range(50)))
    assert (await stores[0].in_flight())["g0"]["m"] == 150
    await asyncio.gather(*(s.decr_in_flight("g0", "m") for s in stores for _ in range(50)))
    assert await stores[0].in_flight() == {}


async def test_a_dead_gateways_counts_expire_with_it() -> None:
    await _redis_or_skip()
    factory = _redis_factory(f"corral-test-{uuid.uuid4().hex}:")
    survivor, crashed = factory(), factory()
    try:
        await survivor.incr_in_flight("g0", "m")
        await crashed.incr_in_flight("g0", "m")
        assert (await survivor.in_flight())["g0"]["m"] == 2
        # A crash: its refresher stops and nobody decrements; its 1 s TTL lapses.
        assert crashed._refresher is not None
        crashed._refresher.cancel()

        async def only_survivor_counts() -> bool:
            return (await survivor.in_flight()).get("g0", {}).get("m") == 1

        await _eventually(only_survivor_counts)
    finally:
        await survivor.close()
        await crashed._redis.aclose()


async def test_an_unreadable_record_does_not_hide_the_other_backends() -> None:
    await _redis_or_skip()
    prefix = f"corral-test-{uuid.uuid4().hex}:"
    store = _redis_factory(prefix)()
    try:
        await store.put_backend(_record("g0"))
        # A record written by a newer launcher with a state this version does not know, and junk.
        newer = {**_record("g1").to_json(), "state": "hibernating"}
        await store._redis.set(f"{prefix}backend:g1", json.dumps(newer))
        await store._redis.set(f"{prefix}backend:g2", "{not json")
        await store._redis.sadd(f"{prefix}backends", "g1", "g2")
        assert [r.id for r in await store.list_backends()] == ["g0"]
    finally:
        await store.close()


async def test_a_gateway_counting_again_while_another_reads_stays_counted() -> None:
    # b's counters went to zero (its hash is gone); a reads the fleet's counters and, in between
    # its read and its cleanup of owners without counters, b counts a new request.
    await _redis_or_skip()
    factory = _redis_factory(f"corral-test-{uuid.uuid4().hex}:")
    a, b = factory(), factory()
    try:
        await b.incr_in_flight("g0", "m")
        await b.decr_in_flight("g0", "m")
        real_pipeline = a._redis.pipeline
        raced = False

        def racing_pipeline(*args: Any, **kwargs: Any) -> Any:
            pipe = real_pipeline(*args, **kwargs)
            real_execute = pipe.execute

            async def execute(*e_args: Any, **e_kwargs: Any) -> Any:
                nonlocal raced
                replies = await real_execute(*e_args, **e_kwargs)
                if not raced:
                    raced = True
                    await b.incr_in_flight("g0", "m")
                return replies

            pipe.execute = execute
            return pipe

        a._redis.pipeline = racing_pipeline  # type: ignore[method-assign]
        assert await a.in_flight() == {}  # a's read came before b's request
        assert raced
        assert await a.in_flight() == {"g0": {"m": 1}}
    finally:
        await a.close()
        await b.close()


async def test_open_store_by_name() -> None:
    assert isinstance(open_store("memory"), MemoryStore)
    with pytest.raises(ValueError, match="unknown state store"):
        open_store("etcd")
