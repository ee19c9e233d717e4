"""Shared state behind one interface: in-memory for one gateway, Redis for several.

What is shared: the backend records (written by launchers, with a TTL so a dead launcher's
backends disappear), the GPU inventory each launcher saw, and the in-flight counters that keep
several gateways from piling onto the same backend. The in-memory store (memory.py) is the
reference implementation; every store passes the same test suite.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Protocol

from gateway.record import BackendRecord
from launcher.facts.gpuinfo import PublishedGpu


class StateStore(Protocol):
    """The gateway's and launcher's shared state. All methods are coroutine-safe.

    Atomicity: `incr_in_flight` and `decr_in_flight` are atomic per (backend, model) and never drop
    below zero. Records and GPU lists expire `ttl_s` after their last write unless rewritten
    (launchers heartbeat them); `ttl_s=None` keeps them until removed.
    """

    async def put_backend(self, record: BackendRecord, ttl_s: float | None = None) -> None: ...

    async def remove_backend(self, backend_id: str) -> None: ...

    async def list_backends(self) -> list[BackendRecord]: ...

    async def put_gpus(self, host: str, gpus: Sequence[PublishedGpu], ttl_s: float | None = None) -> None: ...

    async def list_gpus(self) -> dict[str, list[PublishedGpu]]: ...

    async def incr_in_flight(self, backend_id: str, model: str) -> int: ...

    async def decr_in_flight(self, backend_id: str, model: str) -> int: ...

    async def in_flight(self) -> dict[str, dict[str, int]]: ...

    async def put_own_in_flight(self, counts: Mapping[str, Mapping[str, int]]) -> None:
        """Replace the counters this gateway owns with `counts` (per backend and model): how a
        gateway repairs them after an increment or a decrement whose outcome it could not know."""
        ...

    async def reserve_slot(self, backend_id: str, model: str, slots: int) -> str | None:
        """Take one of the `slots` slots of the model's copy on the backend, atomically across every
        gateway of the store: a token to release it with, or None when all are taken. A gateway that
        dies without releasing loses its reservations after the store's TTL."""
        ...

    async def release_slot(self, backend_id: str, model: str, token: str) -> None: ...

    async def ping(self) -> None:
        """Returns when the store answers; raises when it cannot be reached (a shared store)."""
        ...

    async def generation(self) -> str:
        """An id that changes when the store lost its contents (a Redis restarted empty): readers
        then treat missing records as not yet re-published rather than removed."""
        ...

    async def close(self) -> None: ...



def open_store(kind: str, redis_url: str = "", *, prefix: str = "corral:") -> StateStore:
    """The store the config asks for: "memory" (one gateway) or "redis" (several; needs redis_url)."""
    if kind == "memory":
        from gateway.state.memory import MemoryStore

        return MemoryStore()
    if kind == "redis":
        # Imported here so a memory-only deployment never needs the redis client at import time.
        from gateway.state.redis_store import RedisStore

        return RedisStore.from_url(redis_url, prefix=prefix)
    raise ValueError(f"unknown state store {kind!r} (allowed: memory, redis)")


class StoreUnreachable(Exception):
    """The shared state store does not answer; `str()` is the line to print."""


STORE_PING_TIMEOUT_S = 10.0


async def open_checked_store(kind: str, redis_url: str = "", *, timeout_s: float = STORE_PING_TIMEOUT_S) -> StateStore:
    """`open_store`, then one ping, so an unreachable shared store is one clear line before anything
    starts instead of a traceback from its first use. Raises StoreUnreachable (the store closed)."""
    store = open_store(kind, redis_url)
    try:
        await asyncio.wait_for(store.ping(), timeout_s)
    except BaseException as e:
        await store.close()
        if not isinstance(e, Exception):
            raise  # cancelled: a stop signal came first
        reason = str(e) or f"no answer within {timeout_s:g}s"
        raise StoreUnreachable(f"cannot reach the state store at {redis_url}: {reason}") from None
    return store
