"""Publishing the launcher's GPU inventory, with live free memory, into the state store.

`corral status` and the gateway read the inventory from the store (`list_gpus()`, keyed by host).
Free memory is refreshed on a timer: on a real rig from NVML (in a worker thread, since NVML calls
block), on the simulated rig from each simulated backend's `GET /corral-sim/gpus`, which reports
the cards that backend sees with the memory its resident models take.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import aiohttp

from gateway.state.store import StateStore
from launcher.facts.gpuinfo import GpuInfo, PublishedGpu

log = logging.getLogger("launcher.gpus.publish")

Refresh = Callable[[], Awaitable[Sequence[GpuInfo]]]
_SIM_TIMEOUT = aiohttp.ClientTimeout(total=5.0)


def gpu_rows(
    gpus: Sequence[GpuInfo], backend_of: Mapping[str, str], planned_of: Mapping[str, int] | None = None
) -> list[PublishedGpu]:
    """The inventory as published: each card with the id of the backend using it and the bytes the
    plan puts on it."""
    planned = planned_of or {}
    return [PublishedGpu(gpu, backend_of.get(gpu.uuid, ""), int(planned.get(gpu.uuid, 0))) for gpu in gpus]


def merge_memory(gpus: Sequence[GpuInfo], fresh: Sequence[GpuInfo]) -> list[GpuInfo]:
    """`gpus` with total/free/used memory (and live sensors) taken from `fresh`, matched by UUID.
    Cards missing from `fresh` keep their last known values."""
    by_uuid = {g.uuid: g for g in fresh}
    merged = []
    for gpu in gpus:
        now = by_uuid.get(gpu.uuid)
        if now is None:
            merged.append(gpu)
            continue
        merged.append(
            replace(
                gpu,
                memory_total_bytes=now.memory_total_bytes or gpu.memory_total_bytes,
                memory_free_bytes=now.memory_free_bytes,
                memory_used_bytes=now.memory_used_bytes,
                temperature_c=now.temperature_c,
                power_w=now.power_w,
                utilization_pct=now.utilization_pct,
            )
        )
    return merged


def _rows_from_sim(body: Any) -> list[dict[str, Any]]:
    rows = body.get("gpus") if isinstance(body, dict) else body
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _field(row: Mapping[str, Any], name: str) -> Any:
    """`name` in bytes, as the simulator writes it (`memory_used`) or as GpuInfo does (`..._bytes`)."""
    return row.get(name, row.get(f"{name}_bytes"))


def sim_refresh(session: aiohttp.ClientSession, urls: Sequence[str], gpus: Sequence[GpuInfo]) -> Refresh:
    """A refresh that asks every simulated backend for the memory of the cards it sees."""

    async def one(url: str) -> list[dict[str, Any]]:
        try:
            async with session.get(url + "/corral-sim/gpus", timeout=_SIM_TIMEOUT) as resp:
                if resp.status != 200:
                    return []
                return _rows_from_sim(await resp.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return []  # a backend that is restarting: keep the last known numbers

    async def refresh() -> list[GpuInfo]:
        by_uuid = {g.uuid: g for g in gpus}
        fresh = []
        for rows in await asyncio.gather(*(one(u) for u in urls)):
            for row in rows:
                gpu = by_uuid.get(str(row.get("uuid", "")))
                if gpu is None:
                    continue
                total = int(_field(row, "memory_total") or gpu.memory_total_bytes)
                used = int(_field(row, "memory_used") or 0)
                free = int(_field(row, "memory_free") or max(total - used, 0))
                fresh.append(replace(gpu, memory_total_bytes=total, memory_free_bytes=free, memory_used_bytes=used))
        return fresh

    return refresh


def nvml_refresh(visible_devices: str | None = None) -> Refresh:
    """A refresh that reads NVML again (in a thread: NVML calls block)."""

    async def refresh() -> list[GpuInfo]:
        from launcher.gpus.discovery import discover  # the only pynvml user; imported where it is needed

        return await asyncio.to_thread(discover, visible_devices)

    return refresh


class GpuPublisher:
    """Keeps `store.put_gpus(host, rows)` current. Start with `start()`, stop with `close()`."""

    def __init__(
        self,
        store: StateStore,
        host_name: str,
        gpus: Sequence[GpuInfo],
        *,
        backend_of: Mapping[str, str],
        planned_of: Mapping[str, int] | None = None,
        refresh: Refresh | None = None,
        interval_s: float = 2.0,
        ttl_s: float | None = None,
    ) -> None:
        self.store = store
        self.host_name = host_name
        self.gpus = list(gpus)
        self.backend_of = dict(backend_of)
        self.planned_of = dict(planned_of or {})
        self._refresh = refresh
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self._task: asyncio.Task[None] | None = None

    async def publish_once(self) -> None:
        if self._refresh is not None:
            try:
                self.gpus = merge_memory(self.gpus, await self._refresh())
            except Exception as e:  # a flaky NVML read must not stop publishing the rest
                log.warning("GPU refresh failed: %s", e)
        await self.store.put_gpus(
            self.host_name, gpu_rows(self.gpus, self.backend_of, self.planned_of), ttl_s=self.ttl_s
        )

    async def start(self) -> None:
        await self.publish_once()
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.publish_once()
            except Exception:
                log.exception("publishing the GPU inventory failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
