"""The snapshot's view of one backend, built from the pool's bookkeeping once per change of the
fleet's shape (gateway/fleet/pool.py says which state is read live)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from gateway.fleet.live import LiveBackend
from gateway.routing.snapshot import BackendView, WorkItem


def backend_view(
    live: LiveBackend,
    in_flight: Mapping[str, int],
    queued: Mapping[str, int],
    work: Mapping[str, tuple[WorkItem, ...]],
) -> BackendView:
    """`live`'s view. The counters, the observed rates and the last-use times are the live maps
    themselves, not copies: a view is built once and read by many decisions."""
    resident = live.merged_resident()
    used = sum(r.size_vram_bytes for r in resident.values())
    return BackendView(
        record=live.record,
        healthy=live.healthy,
        installed=live.installed,
        resident=tuple(resident.values()),
        in_flight=in_flight,
        queued=queued,
        free_vram_bytes=max(live.record.vram_total_bytes - used, 0),
        loading=next(iter(live.loading), None),
        observed=live.observed,
        inventory_known=live.inventory_known,
        default_num_ctx=live.record.default_num_ctx,
        last_used=live.last_used,
        last_interactive=live.last_interactive,
        work=work,
        version=live.version,
    )


def shown_resident(live: LiveBackend | None, model: str) -> tuple[object, object]:
    """What a view shows of `model` resident on `live`, by identity (entries are replaced, never
    changed in place): what tells whether a reply changed it."""
    if live is None:
        return None, None
    seen = live.seen_resident.get(model)
    return live.resident.get(model), seen[0] if seen is not None else None


class QueuedHere(Mapping[str, int]):
    """A snapshot's `BackendView.queued`, live: the gateway's waiters per model, for the models
    installed on that backend. `depth` answers one model (what the router asks, per candidate);
    `depths` lists them all (for iteration: status pages)."""

    __slots__ = ("_depth", "_depths", "_installed")

    def __init__(
        self, depth: Callable[[str], int], depths: Callable[[], Mapping[str, int]], installed: frozenset[str]
    ) -> None:
        self._depth = depth
        self._depths = depths
        self._installed = installed

    def get(self, model: str, default: Any = None) -> Any:
        depth = self._depth(model) if model in self._installed else 0
        return depth if depth else default

    def __getitem__(self, model: str) -> int:
        depth = self.get(model, 0)
        if not depth:
            raise KeyError(model)
        return int(depth)

    def __iter__(self) -> Iterator[str]:
        return iter([m for m, d in self._depths().items() if d and m in self._installed])

    def __len__(self) -> int:
        return sum(1 for _ in self)
