"""Fault injection with real processes: Redis killed and restarted empty under load, a SIGSTOPped
backend. Every wait is bounded; the bounds under test are set small so the test stays short.

Redis here is a redis-server of the test's own on a free port (never the shared one on 6379).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.api.auth import ApiKeys
from gateway.appkeys import POOL
from gateway.config import StaticBackend
from gateway.record import BackendRecord
from gateway.server import GatewayServer
from gateway.state.memory import MemoryStore
from gateway.state.redis_store import RedisStore
from launcher.sim.harness import SimServer, free_port, install_models
from tests.gateway.test_over_sim import SMALL, start_rig
from tests.support.fakes import MakeFake, fast_settings, wait_for
from tests.support.redisproc import RedisProcess

GENERATE = {"model": "llama3.1:8b", "prompt": "hi", "stream": False}


async def metric(http: aiohttp.ClientSession, gw: GatewayServer, name: str) -> float:
    async with http.get(gw.url + "/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


async def test_redis_killed_and_restarted_empty_under_load_fails_no_request(
    fakes: MakeFake, http: aiohttp.ClientSession, own_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.state.health")
    backends = [await fakes(name=f"g{i}") for i in range(2)]
    store = RedisStore.from_url(own_redis.url, prefix=f"corral-test-{os.getpid()}-{time.monotonic_ns()}:")
    for b in backends:  # as a launcher writes them, with a TTL far longer than the test
        await store.put_backend(BackendRecord(id=b.name, url=b.url), ttl_s=120)
    settings = fast_settings(poll_interval_s=0.05, health_interval_s=0.2, state="redis")
    results: list[int] = []
    try:
        async with GatewayServer(settings, store, keys=ApiKeys()) as gw:
            stop = asyncio.Event()

            async def client() -> None:
                while not stop.is_set():
                    try:
                        async with http.post(gw.url + "/api/generate", json=GENERATE) as resp:
                            await resp.read()
                            results.append(resp.status)
                    except aiohttp.ClientError:
                        results.append(-1)

            clients = [asyncio.create_task(client()) for _ in range(8)]
            await wait_for(lambda: len(results) >= 50)
            own_redis.kill()
            await wait_for(lambda: len(results) >= 150)  # load while it is down
            down = await metric(http, gw, "corral_state_store_up")
            own_redis.start()  # back, and empty: no record at all
            served_before = len(results)
            await wait_for(lambda: len(results) >= served_before + 150, timeout_s=30)
            stop.set()
            await asyncio.gather(*clients)
            # The gateway noticed the outage and the recovery (on its own store reads).
            await wait_for(lambda: store_up_again(caplog), timeout_s=10)
            up = await metric(http, gw, "corral_state_store_up")
    finally:
        await store.close()
    assert results and all(status == 200 for status in results), {s: results.count(s) for s in set(results)}
    assert down == 0.0 and up == 1.0
    outage_warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "state store unreachable" in r.getMessage()
    ]
    assert len(outage_warnings) == 1  # one per outage, not one per request


def store_up_again(caplog: pytest.LogCaptureFixture) -> bool:
    return any("state store reachable again" in r.getMessage() for r in caplog.records)


async def test_a_slot_whose_release_failed_is_free_for_the_next_request(own_redis: RedisProcess) -> None:
    """After a Redis restart every pooled connection fails its next command once. A release lost
    that way kept the copy's only slot taken until its TTL (30 s): with one slot per copy the whole
    fleet looked busy and requests queued until they timed out."""
    store = RedisStore.from_url(own_redis.url, prefix=f"corral-test-{os.getpid()}-{time.monotonic_ns()}:")
    killer = aioredis.from_url(own_redis.url)
    try:
        token = await store.reserve_slot("g0", "llama3.1:8b", 1)
        assert token
        # Close the store's pooled connection from the server side, as a restart does.
        await killer.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        with pytest.raises(Exception):  # noqa: B017 - whichever error redis-py raises for it
            await store.release_slot("g0", "llama3.1:8b", token)
        assert await store.reserve_slot("g0", "llama3.1:8b", 1)  # the slot is free again
    finally:
        await killer.aclose()
        await store.close()


# -- a hung backend ------------------------------------------------------------------------------

FIRST_BYTE_FLOOR_S = 2.0
IDLE_S = 2.0
# A request sent to the hung backend waits its first-byte bound, then is served elsewhere: far
# below this (which only keeps a broken gateway from hanging the test).
WAIT_BOUND_S = FIRST_BYTE_FLOOR_S + 20.0


async def test_a_sigstopped_backend_bounds_its_requests_and_is_ejected(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    sims, store = await start_rig(tmp_path, speed=20)
    settings = fast_settings(
        policy="round-robin",
        first_byte_timeout_floor_s=FIRST_BYTE_FLOOR_S,
        first_byte_timeout_factor=1.0,
        stream_idle_timeout_s=IDLE_S,
        health_interval_s=1.0,
        health_timeout_s=0.5,
        eject_for_s=30.0,
    )
    stopped: SimServer | None = None
    try:
        async with GatewayServer(settings, store, keys=ApiKeys()) as gw:
            for _ in range(2):  # both warm, so what follows is not a cold load
                payload = {**GENERATE, "options": SMALL}
                async with http.post(gw.url + "/api/generate", json=payload) as resp:
                    assert resp.status == 200
            # A long stream, started before the hang.
            payload = {"model": "llama3.1:8b", "prompt": "tell me everything", "options": {"num_predict": -1}}
            async with http.post(gw.url + "/api/generate", json=payload) as stream:
                victim = stream.headers["X-Corral-Backend"]
                assert json.loads(await stream.content.readline())["done"] is False
                stopped = sims[victim]
                os.kill(stopped.pid, signal.SIGSTOP)
                hung_at = time.monotonic()

                async def timed_request() -> tuple[int, str, float]:
                    started = time.monotonic()
                    async with http.post(gw.url + "/api/generate", json={**GENERATE, "options": SMALL}) as resp:
                        await resp.read()
                        return resp.status, resp.headers.get("X-Corral-Backend", ""), time.monotonic() - started

                async with asyncio.timeout(WAIT_BOUND_S * 2):
                    replies = await asyncio.gather(*(timed_request() for _ in range(6)))
                    lines = [json.loads(line) for line in (await stream.read()).splitlines() if line.strip()]
            # The started stream ended with Ollama's error line instead of hanging.
            assert "error" in lines[-1] and victim in lines[-1]["error"]
            survivor = next(name for name in sims if name != victim)
            assert all(status == 200 and served_by == survivor for status, served_by, _ in replies), replies
            assert all(waited < WAIT_BOUND_S for _, _, waited in replies), replies
            # Ejected: within one interval plus two health timeouts, plus the test's slack.
            pool = gw.app[POOL]
            await wait_for(lambda: not pool.healthy(victim), timeout_s=10)
            assert time.monotonic() - hung_at < 10
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped.pid, signal.SIGCONT)
        for sim in sims.values():
            await asyncio.to_thread(sim.stop)


async def test_a_static_backend_down_at_start_is_in_soon_after_it_comes_up(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Not up at the gateway's first check: re-probed on a short backoff (from 0.2 s), not once per
    health interval (60 s here), and the ready route flips with it."""
    install_models(tmp_path / "models", "llama3.1:8b")
    port = free_port()
    backend = StaticBackend(url=f"http://127.0.0.1:{port}", id="late")
    async with GatewayServer(fast_settings(backend, health_interval_s=60.0), MemoryStore(), keys=ApiKeys()) as gw:
        async with http.get(gw.url + "/api/corral/ready") as resp:
            assert resp.status == 503
        sim = await asyncio.to_thread(
            SimServer.start, tmp_path, env={"OLLAMA_HOST": f"127.0.0.1:{port}"}, models_dir=tmp_path / "models"
        )
        try:
            pool = gw.app[POOL]
            await wait_for(lambda: pool.healthy("late"), timeout_s=20)
            async with http.get(gw.url + "/api/corral/ready") as resp:
                assert resp.status == 200
            async with http.post(gw.url + "/api/generate", json={**GENERATE, "options": SMALL}) as resp:
                assert resp.status == 200
        finally:
            await asyncio.to_thread(sim.stop)
