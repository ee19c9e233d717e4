"""The launcher side of a Redis outage: records re-published at once when Redis comes back empty,
one warning per outage. Redis is a redis-server of the test's own (never the shared one)."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import pytest

from gateway.state.redis_store import RedisStore
from launcher.supervise.supervisor import Supervisor
from tests.launcher.test_supervisor import FAST, WAIT_S, launch, planned
from tests.support.redisproc import RedisProcess

# Far longer than the test: a record back in Redis was re-published, not heartbeated by chance.
RECORD_TTL_S = 90.0


async def records_in(store: RedisStore) -> list[str]:
    try:
        return [r.id for r in await store.list_backends()]
    except Exception:
        return []


async def test_records_are_republished_at_once_when_redis_comes_back_empty(
    own_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.state.health")
    prefix = f"corral-test-{os.getpid()}-{time.monotonic_ns()}:"
    store = RedisStore.from_url(own_redis.url, prefix=prefix)
    reader = RedisStore.from_url(own_redis.url, prefix=prefix)
    try:
        async with Supervisor([launch(planned("g0"))], FAST, store=store, record_ttl_s=RECORD_TTL_S) as sup:
            assert await sup.start_all() == []
            assert await records_in(reader) == ["g0"]
            own_redis.kill()
            await asyncio.sleep(2.5)  # a few heartbeat ticks against a dead Redis
            own_redis.start()  # empty
            # Well within the record TTL (and any heartbeat): re-published on noticing the restart.
            async with asyncio.timeout(WAIT_S):
                while True:
                    if await records_in(reader) == ["g0"]:
                        break
                    await asyncio.sleep(0.1)
    finally:
        await reader.close()
        await store.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "unreachable" in r.getMessage()]
    assert len(warnings) == 1
