"""Shared state behind one interface: in-memory for one gateway, Redis for several.

What is shared: the backend records (written by launchers, with a TTL so a dead launcher's
backends disappear), the GPU inventory each launcher saw, and the in-flight counters that keep
several gateways from piling onto the same backend. The in-memory store is the reference
implementation; every store passes the same test suite.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

from gateway.record import BackendRecord


class StateStore(Protocol):
    """The gateway's and launcher's shared state. All methods are coroutine-safe.

    Atomicity: `incr_in_flight` and `decr_in_flight` are atomic per (backend, model) and never drop
    below zero. Records and GPU lists expire `ttl_s` after their last write unless rewritten
    (launchers heartbeat them); `ttl_s=None` keeps them until removed.
    """

    async def put_backend(self, record: BackendRecord, ttl_s: float | None = None) -> None: ...

    async def remove_backend(self, backend_id: str) -> None: ...

    async def list_backends(self) -> list[BackendRecord]: ...

    async def put_gpus(self, host: str, gpus: Sequence[dict[str, Any]], ttl_s: float | None = None) -> None: ...

    async def list_gpus(self) -> dict[str, list[dict[str, Any]]]: ...

    async def incr_in_flight(self, backend_id: str, model: str) -> int: ...

    async def decr_in_flight(self, backend_id: str, model: str) -> int: ...

    async def in_flight(self) -> dict[str, dict[str, int]]: ...

    async def generation(self) -> str:
        """An id that changes when the store lost its contents (a Redis restarted empty): readers
        then treat missing records as not yet re-published rather than removed."""
        ...

    async def close(self) -> None: ...


class MemoryStore:
    """StateStore for one process. Coroutine-safe because it never awaits between read and write."""

    def __init__(self, clock: Any = time.time) -> None:
        self._clock = clock
        self._backends: dict[str, tuple[BackendRecord, float | None]] = {}
        self._gpus: dict[str, tuple[list[dict[str, Any]], float | None]] = {}
        self._in_flight: dict[str, dict[str, int]] = {}

    def _alive(self, expires_at: float | None) -> bool:
        return expires_at is None or expires_at > self._clock()

    def _expiry(self, ttl_s: float | None) -> float | None:
        return None if ttl_s is None else self._clock() + ttl_s

    async def put_backend(self, record: BackendRecord, ttl_s: float | None = None) -> None:
        self._backends[record.id] = (record, self._expiry(ttl_s))

    async def remove_backend(self, backend_id: str) -> None:
        self._backends.pop(backend_id, None)
        self._in_flight.pop(backend_id, None)

    async def list_backends(self) -> list[BackendRecord]:
        for backend_id in [k for k, (_, exp) in self._backends.items() if not self._alive(exp)]:
            del self._backends[backend_id]
        return [rec for rec, _ in self._backends.values()]

    async def put_gpus(self, host: str, gpus: Sequence[dict[str, Any]], ttl_s: float | None = None) -> None:
        self._gpus[host] = ([dict(g) for g in gpus], self._expiry(ttl_s))

    async def list_gpus(self) -> dict[str, list[dict[str, Any]]]:
        for host in [h for h, (_, exp) in self._gpus.items() if not self._alive(exp)]:
            del self._gpus[host]  # a host gone for good leaves nothing behind
        return {host: [dict(g) for g in gpus] for host, (gpus, _) in self._gpus.items()}

    async def incr_in_flight(self, backend_id: str, model: str) -> int:
        per_model = self._in_flight.setdefault(backend_id, {})
        per_model[model] = per_model.get(model, 0) + 1
        return per_model[model]

    async def decr_in_flight(self, backend_id: str, model: str) -> int:
        per_model = self._in_flight.setdefault(backend_id, {})
        value = max(per_model.get(model, 0) - 1, 0)
        if value:
            per_model[model] = value
        else:
            per_model.pop(model, None)
        return value

    async def in_flight(self) -> dict[str, dict[str, int]]:
        return {b: dict(m) for b, m in self._in_flight.items() if m}

    async def generation(self) -> str:
        return "memory"  # lives and dies with its process: never loses its contents under a reader

    async def close(self) -> None:
        return None


def open_store(kind: str, redis_url: str = "", *, prefix: str = "corral:") -> StateStore:
    """The store the config asks for: "memory" (one gateway) or "redis" (several; needs redis_url)."""
    if kind == "memory":
        return MemoryStore()
    if kind == "redis":
        # Imported here so a memory-only deployment never needs the redis client at import time.
        from gateway.state.redis_store import RedisStore

        return RedisStore.from_url(redis_url, prefix=prefix)
    raise ValueError(f"unknown state store {kind!r} (allowed: memory, redis)")
