"""The planner's output: which backends to start, on which cards, holding which models, and why.

`launcher.planner.plan()` produces a `Plan`; `corral plan` prints it; `corral up` starts one
backend per `PlannedBackend`. Kept apart from the planner so the supervisor depends on the shape,
not on how it was decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.record import BackendKind


@dataclass(frozen=True)
class PlannedModel:
    """One model on one backend."""

    name: str
    num_ctx: int
    vram_bytes: int  # what it takes on this backend's cards at num_ctx x num_parallel
    expected_tokens_per_s: float  # single-stream decode rate on this backend
    num_gpu: int = -1  # layers on GPU (Ollama's num_gpu); -1: all of them
    reason: str = ""
    card_vram_bytes: tuple[int, ...] = ()  # vram_bytes on each card, in the backend's gpu_indices order
    card_layers: tuple[int, ...] = ()  # layers on each card (the output layer counts on the last)


@dataclass(frozen=True)
class PlannedBackend:
    """One `ollama serve` to start."""

    id: str  # "g0", "g2+g3", "cpu"
    kind: BackendKind
    port: int
    gpu_indices: tuple[int, ...]  # strongest first: this is CUDA_VISIBLE_DEVICES order
    gpu_uuids: tuple[str, ...]
    gpu_names: tuple[str, ...]
    vram_total_bytes: int
    vram_planned_bytes: int
    num_parallel: int
    max_loaded_models: int
    speed: float  # relative decode speed, for the gateway's tie-breaks
    models: tuple[PlannedModel, ...] = ()
    reason: str = ""

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)


@dataclass(frozen=True)
class Rejection:
    """A candidate the planner turned down, kept so `corral plan` can explain itself."""

    model: str
    candidate: str  # e.g. "g1 (RTX 3090)" or "g0+g1"
    reason: str


@dataclass(frozen=True)
class Plan:
    backends: tuple[PlannedBackend, ...]
    rejections: tuple[Rejection, ...] = ()
    warnings: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()  # models that fit nowhere: `corral up` refuses to start
    notes: dict[str, str] = field(default_factory=dict)  # model -> one-line summary of its placement

    @property
    def ok(self) -> bool:
        return not self.errors
