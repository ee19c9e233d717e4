"""The backend record: the one contract between the launcher and the gateway.

The launcher writes one record per backend it supervises (in-process, or through the state store
when gateways run elsewhere); the gateway routes over the records it sees. A static backend from
`[[gateway.backends]]` is turned into the same record, with what the config does not say left at
its defaults.
"""

from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any


class BackendKind(enum.StrEnum):
    SINGLE = "single"  # one GPU
    SPLIT = "split"  # a GPU group, OLLAMA_SCHED_SPREAD=1
    CPU = "cpu"  # partial or full CPU offload


class BackendState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass(frozen=True)
class BackendRecord:
    """One `ollama serve` (or simulated) process, as the gateway needs to know it."""

    id: str
    url: str  # e.g. http://127.0.0.1:11500
    host: str = ""  # the machine it runs on (hostname), for several-host fleets
    gpu_uuids: tuple[str, ...] = ()
    gpu_names: tuple[str, ...] = ()
    kind: BackendKind = BackendKind.SINGLE
    num_parallel: int = 1
    max_loaded_models: int = 0  # 0 = Ollama's default (3 per GPU)
    vram_total_bytes: int = 0
    speed: float = 1.0  # relative decode speed (memory bandwidth / 1 TB/s)
    planned_models: tuple[str, ...] = ()
    # The context each planned model is preloaded with, parallel to planned_models (0: the backend's
    # default); for the live views, which show planned models before they are resident.
    planned_num_ctx: tuple[int, ...] = ()
    # Backends with the same non-empty store_id share one model store (OLLAMA_MODELS on one host):
    # a pull, delete or copy on one of them is seen by all, so the gateway does it once.
    store_id: str = ""
    # OLLAMA_CONTEXT_LENGTH the backend runs with: the context a request without num_ctx gets there.
    # 0 = not set (Ollama's VRAM-tier default applies).
    default_num_ctx: int = 0
    state: BackendState = BackendState.READY
    updated_at: float = field(default_factory=time.time)
    # Supervision facts for `corral status`; a static backend leaves them at their defaults.
    started_at: float = 0.0  # epoch seconds the current process became ready
    restarts: int = 0
    last_error: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["gpu_uuids"] = list(self.gpu_uuids)
        data["gpu_names"] = list(self.gpu_names)
        data["planned_models"] = list(self.planned_models)
        data["planned_num_ctx"] = list(self.planned_num_ctx)
        data["kind"] = str(self.kind)
        data["state"] = str(self.state)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BackendRecord:
        """Inverse of `to_json`; unknown keys are ignored so newer writers do not break older readers."""
        return cls(
            id=str(data["id"]),
            url=str(data["url"]),
            host=str(data.get("host", "")),
            gpu_uuids=tuple(data.get("gpu_uuids", ())),
            gpu_names=tuple(data.get("gpu_names", ())),
            kind=BackendKind(data.get("kind", "single")),
            num_parallel=int(data.get("num_parallel", 1)),
            max_loaded_models=int(data.get("max_loaded_models", 0)),
            vram_total_bytes=int(data.get("vram_total_bytes", 0)),
            speed=float(data.get("speed", 1.0)),
            planned_models=tuple(data.get("planned_models", ())),
            planned_num_ctx=tuple(int(n) for n in data.get("planned_num_ctx", ())),
            store_id=str(data.get("store_id", "")),
            default_num_ctx=int(data.get("default_num_ctx", 0)),
            state=BackendState(data.get("state", "ready")),
            updated_at=float(data.get("updated_at", 0.0)),
            started_at=float(data.get("started_at", 0.0)),
            restarts=int(data.get("restarts", 0)),
            last_error=str(data.get("last_error", "")),
        )

    @property
    def gpu_count(self) -> int:
        """Cards in the GPU group, at least 1. The launcher lists each card's UUID and name; a static
        backend may give only names (`gpus = ["RTX 3090", "RTX 3090"]`) or only UUIDs."""
        return max(len(self.gpu_uuids), len(self.gpu_names), 1)

    def with_state(self, state: BackendState) -> BackendRecord:
        return replace(self, state=state, updated_at=time.time())
