"""What exact slots cost with a shared store: one reservation + one release per request, on Redis.

    .venv/bin/python -m bench.routing_slots [--redis redis://127.0.0.1:6379/0]

Side by side in one run: the in-memory store (one gateway) and Redis (several gateways). Each
round reserves a slot (one Lua script call) and releases it (one ZREM), as a request sent through a
gateway with `state = "redis"` does; reported as median and p99 microseconds per request.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.state.memory import MemoryStore  # noqa: E402 - the repo root must be importable first
from gateway.state.redis_store import RedisStore  # noqa: E402
from gateway.state.store import StateStore  # noqa: E402


async def rounds(store: StateStore, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        token = await store.reserve_slot("g0", "llama3.1:8b", 4)
        assert token is not None
        await store.release_slot("g0", "llama3.1:8b", token)
        samples.append((time.perf_counter() - t0) * 1e6)
    return sorted(samples)


async def main_async(redis_url: str, count: int) -> int:
    print("| store | reserve + release, median us | p99 us |")
    print("|---|---:|---:|")
    stores: list[tuple[str, StateStore]] = [("memory", MemoryStore())]
    redis = RedisStore.from_url(redis_url, prefix=f"corral-bench-{uuid.uuid4().hex}:")
    stores.append(("redis", redis))
    try:
        for name, store in stores:
            await rounds(store, 50)  # warm-up (script load, connection)
            samples = await rounds(store, count)
            print(f"| {name} | {statistics.median(samples):.0f} | {samples[int(0.99 * (len(samples) - 1))]:.0f} |")
    finally:
        await redis.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.routing_slots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args(argv)
    return asyncio.run(main_async(args.redis, args.rounds))


if __name__ == "__main__":
    sys.exit(main())
