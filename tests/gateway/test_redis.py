"""Two gateways sharing one Redis: each sees the requests the other has in flight."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.api.auth import ApiKeys
from gateway.appkeys import POOL
from gateway.fleet.inflight import InFlight
from gateway.fleet.pool import BackendPool
from gateway.record import BackendRecord
from gateway.server import GatewayServer
from gateway.state.redis_store import RedisStore
from tests.support.fakes import FakeOllama, fast_settings, wait_for

REDIS_URL = os.environ.get("CORRAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

pytestmark = pytest.mark.redis


@pytest.fixture
async def stores() -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    prefix = f"corral-gw-test-{uuid.uuid4().hex}:"
    first, second = (RedisStore.from_url(REDIS_URL, prefix=prefix, owner_ttl_s=5.0) for _ in range(2))
    try:
        await asyncio.wait_for(first.ping(), timeout=2)
    except Exception as e:
        await first.close()
        await second.close()
        if os.environ.get("CI"):
            pytest.fail(f"Redis is required in CI at {REDIS_URL}: {e}")
        pytest.skip(f"no Redis at {REDIS_URL}: {e}")
    yield first, second
    await first.close()
    await second.close()


async def test_gateways_on_one_redis_agree_on_in_flight_requests(stores: tuple[RedisStore, RedisStore]) -> None:
    hold = asyncio.Event()
    fake = await FakeOllama(name="g0", hold=hold).start()
    settings = fast_settings(fake.backend())
    try:
        async with (
            GatewayServer(settings, stores[0], keys=ApiKeys()) as one,
            GatewayServer(settings, stores[1], keys=ApiKeys()) as two,
            aiohttp.ClientSession() as http,
        ):
            resp = await http.post(one.url + "/api/generate", json={"model": "llama3.1:8b", "prompt": "hi"})
            assert json.loads(await resp.content.readline())["done"] is False
            # The other gateway never saw this request, yet counts it (from the shared counters).
            await wait_for(lambda: two.app[POOL].in_flight_counts().get("g0", {}).get("llama3.1:8b") == 1)
            async with http.get(two.url + "/api/corral/status") as status:
                (row,) = (await status.json())["backends"]
            assert row["in_flight"] == {"llama3.1:8b": 1}
            hold.set()
            await resp.read()
            resp.release()
            await wait_for(lambda: not two.app[POOL].in_flight_counts().get("g0"))
    finally:
        hold.set()
        await fake.stop()


async def test_a_gateways_own_requests_do_not_hide_the_others_from_its_router(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    # Redis answers an increment with this gateway's own count; the router's view must keep the
    # other gateway's request that the last poll brought in.
    one, two = stores
    pool = BackendPool(fast_settings())
    pool.sync_records([BackendRecord(id="g0", url="http://127.0.0.1:1")])
    await two.incr_in_flight("g0", "llama3.1:8b")  # a request through the other gateway
    pool.replace_in_flight(await one.in_flight())
    assert pool.in_flight_counts() == {"g0": {"llama3.1:8b": 1}}
    in_flight = InFlight(one, pool)
    async with in_flight.hold("g0", "llama3.1:8b"):
        assert pool.in_flight_counts() == {"g0": {"llama3.1:8b": 2}}
    await in_flight.settle()
    assert pool.in_flight_counts() == {"g0": {"llama3.1:8b": 1}}
    assert await one.in_flight() == {"g0": {"llama3.1:8b": 1}}


async def test_two_gateways_never_put_more_requests_on_a_backend_than_its_slots(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    # One 1-slot backend behind two gateways: each reserves the slot in Redis before sending, so
    # however the requests are split between them, the backend runs one at a time.
    fake = await FakeOllama(name="g0", resident={"llama3.1:8b": 4096}, chunks=4, chunk_delay_s=0.01).start()
    settings = fast_settings(fake.backend(vram_gb=24), state="redis")
    try:
        async with (
            GatewayServer(settings, stores[0], keys=ApiKeys()) as one,
            GatewayServer(settings, stores[1], keys=ApiKeys()) as two,
            aiohttp.ClientSession() as http,
        ):

            async def ask(gw: GatewayServer) -> int:
                payload = {"model": "llama3.1:8b", "prompt": "hi"}
                async with http.post(gw.url + "/api/generate", json=payload) as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(ask(gw) for gw in (one, two) * 4))
        assert statuses == [200] * 8
        assert fake.max_active == 1
    finally:
        await fake.stop()


async def test_a_slot_reservation_is_exact_and_a_dead_gateways_expires(stores: tuple[RedisStore, RedisStore]) -> None:
    one, two = stores
    token = await one.reserve_slot("g0", "m", 1)
    assert token and await two.reserve_slot("g0", "m", 1) is None  # the last slot is taken
    await one.release_slot("g0", "m", token)
    again = await two.reserve_slot("g0", "m", 1)
    assert again is not None
    # A gateway that dies keeps nothing: its reservations carry a TTL that only it refreshes.
    prefix = f"corral-gw-test-{uuid.uuid4().hex}:"
    short = RedisStore.from_url(REDIS_URL, prefix=prefix, owner_ttl_s=1.0)
    other = RedisStore.from_url(REDIS_URL, prefix=prefix, owner_ttl_s=1.0)
    try:
        assert await short.reserve_slot("g0", "m", 1)
        short._held_slots.clear()  # as if the process died: nothing refreshes it any more
        assert short._refresher is not None
        short._refresher.cancel()
        await wait_for_async(lambda: other.reserve_slot("g0", "m", 1), timeout_s=10)
    finally:
        await short.close()
        await other.close()


async def wait_for_async(attempt: Any, timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await attempt():
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.1)


class LossyStore(RedisStore):
    """A Redis store whose next in-flight call fails, before or after Redis carried it out (a
    connection lost on the way there, or the reply lost on the way back)."""

    fail_next: str = ""  # "incr-after", "decr-before" or "decr-after"

    async def incr_in_flight(self, backend_id: str, model: str) -> int:
        if self.fail_next == "incr-after":
            self.fail_next = ""
            await super().incr_in_flight(backend_id, model)
            raise ConnectionError("reply lost")
        return await super().incr_in_flight(backend_id, model)

    async def decr_in_flight(self, backend_id: str, model: str) -> int:
        mode, self.fail_next = self.fail_next, ""
        if mode == "decr-before":
            raise ConnectionError("connection lost")
        value = await super().decr_in_flight(backend_id, model)
        if mode == "decr-after":
            raise ConnectionError("reply lost")
        return value


@pytest.mark.parametrize("failure", ["incr-after", "decr-before", "decr-after"])
async def test_a_count_whose_outcome_was_lost_is_repaired_in_the_store(
    stores: tuple[RedisStore, RedisStore], failure: str
) -> None:
    # Another gateway must not go on seeing a request that ended here (a slot taken for as long as
    # this gateway runs), nor stop seeing one still running.
    _, other = stores
    store = LossyStore.from_url(REDIS_URL, prefix=other._prefix, owner_ttl_s=5.0)
    assert isinstance(store, LossyStore)
    pool = BackendPool(fast_settings())
    pool.sync_records([BackendRecord(id="g0", url="http://127.0.0.1:1")])
    in_flight = InFlight(store, pool)
    try:
        async with in_flight.hold("g0", "m"):  # stays in flight throughout
            store.fail_next = failure
            async with in_flight.hold("g0", "m"):
                pass
            await wait_for(lambda: not in_flight._pending)
            # Within a repair round the store counts exactly the one still running.
            await _eventually_equal(other.in_flight, {"g0": {"m": 1}})
        await in_flight.settle()
        await _eventually_equal(other.in_flight, {})
    finally:
        await store.close()


async def _eventually_equal(read: Any, expected: object, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (value := await read()) != expected:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"store says {value}, expected {expected}")
        await asyncio.sleep(0.05)
