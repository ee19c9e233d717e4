"""The in-memory `StateStore` (gateway/state/store.py): one gateway, one process."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.record import BackendRecord
from launcher.facts.gpuinfo import PublishedGpu


class MemoryStore:
    """StateStore for one process. Coroutine-safe because it never awaits between read and write."""

    def __init__(self, clock: Any = time.time) -> None:
        self._clock = clock
        self._backends: dict[str, tuple[BackendRecord, float | None]] = {}
        self._gpus: dict[str, tuple[list[PublishedGpu], float | None]] = {}
        self._in_flight: dict[str, dict[str, int]] = {}
        self._slots: dict[tuple[str, str], set[str]] = {}
        self._next_token = 0

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

    async def put_gpus(self, host: str, gpus: Sequence[PublishedGpu], ttl_s: float | None = None) -> None:
        self._gpus[host] = (list(gpus), self._expiry(ttl_s))

    async def list_gpus(self) -> dict[str, list[PublishedGpu]]:
        for host in [h for h, (_, exp) in self._gpus.items() if not self._alive(exp)]:
            del self._gpus[host]  # a host gone for good leaves nothing behind
        return {host: list(gpus) for host, (gpus, _) in self._gpus.items()}

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

    async def put_own_in_flight(self, counts: Mapping[str, Mapping[str, int]]) -> None:
        # In-process calls cannot lose their outcome, so there is nothing to repair; and the counts
        # here are every gateway's of this process together, not one owner's to replace.
        return None

    async def reserve_slot(self, backend_id: str, model: str, slots: int) -> str | None:
        held = self._slots.setdefault((backend_id, model), set())
        if len(held) >= slots:
            return None
        self._next_token += 1
        token = str(self._next_token)
        held.add(token)
        return token

    async def release_slot(self, backend_id: str, model: str, token: str) -> None:
        held = self._slots.get((backend_id, model))
        if held is not None:
            held.discard(token)
            if not held:
                del self._slots[(backend_id, model)]

    async def ping(self) -> None:
        return None

    async def generation(self) -> str:
        return "memory"  # lives and dies with its process: never loses its contents under a reader

    async def close(self) -> None:
        return None
