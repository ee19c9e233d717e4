"""The status document: the one shape of `GET /api/corral/status`, for its producer and its readers.

The gateway builds it (`gateway.api.status`); `corral status`, `corral top` and the fleet page at
`/corral/` read it. Every key is listed here, so a change to the document is a change to this
module, seen by mypy on both sides (the page's JavaScript reads the same names; its test drives it
against a live gateway). Readers should still tolerate missing keys: a newer `corral status` may
talk to an older gateway.

Units live in the names (`_bytes`, `_s`); times are epoch seconds unless they end in `_s`.
"""

from __future__ import annotations

from typing import Literal, TypedDict

# One word per backend for the views: `ready` routable; `down` not serving because something went
# wrong (failing its health checks or ejected, its process exited and waits to be restarted or is
# being restarted, or its first start failed: `state` and `last_error` say which); `starting` the
# first start; `draining` stopping on purpose.
BackendStatusWord = Literal["ready", "down", "starting", "draining"]

WarningKind = Literal["backend_down", "restart_loop", "cpu_offload", "store_unreachable"]

DecisionKind = Literal["send", "wait", "reject"]


class GatewayDoc(TypedDict):
    version: str
    listen: str
    policy: str
    started_at: float
    uptime_s: float
    now: float  # the gateway's clock when the document was made (expiries are relative to it)
    active_requests: int
    queue_depths: dict[str, int]  # model -> requests waiting at the gateway
    queue_size: int
    health_interval_s: float
    poll_interval_s: float
    store: str  # "memory" | "redis"
    store_ok: bool
    store_error: str
    stats_window_s: float  # the window the per-model numbers cover
    worker: str  # "i/n": which of `corral gateway --workers n` answered ("1/1" for a single gateway)
    pid: int  # that worker's process id


class GpuDoc(TypedDict):
    """One card as the launcher on its host published it, with live memory (and sensors, when NVML
    gives them: None otherwise)."""

    index: int
    uuid: str
    name: str
    backend: str  # the backend using the card ("" when none)
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    memory_planned_bytes: int  # what the plan puts on this card (0 when unknown)
    utilization_pct: int | None
    temperature_c: int | None
    power_w: float | None
    simulated: bool


class ResidentDoc(TypedDict):
    """A row of the backend's /api/ps (or a load the gateway saw in a reply)."""

    name: str
    size_bytes: int
    size_vram_bytes: int
    context_length: int
    expires_at: float | None
    loaded_with: dict[str, int | bool] | None  # the load-time options of the request that loaded it


class BackendModelDoc(TypedDict):
    """A model on a backend as the views show it: resident, planned, or both."""

    name: str
    resident: bool
    planned: bool
    loading: bool  # the gateway sent a request that is loading it now
    context_length: int  # resident: as loaded; planned only: the planned context (0 = the default)
    size_vram_bytes: int
    cpu_bytes: int  # the part of a resident model held in system memory (partial CPU offload)
    expires_at: float | None
    busy: int  # requests this gateway fleet has in flight for it there
    slots: int  # requests the backend serves at once per model (OLLAMA_NUM_PARALLEL)
    queued: int  # requests waiting at the gateway for this model


class ObservedDoc(TypedDict):
    tokens_per_s: float
    load_s: float
    service_s: float
    samples: int
    prefill_tokens_per_s: float


class BackendDoc(TypedDict):
    # The backend record (gateway.record.BackendRecord), as the launcher published it.
    id: str
    url: str
    host: str
    gpu_uuids: list[str]
    gpu_names: list[str]
    kind: str
    num_parallel: int
    max_loaded_models: int
    vram_total_bytes: int
    speed: float
    planned_models: list[str]
    planned_num_ctx: list[int]  # parallel to planned_models; 0 = the backend's default context
    store_id: str
    default_num_ctx: int
    state: str
    updated_at: float
    started_at: float
    restarts: int
    last_error: str
    # What this gateway sees of it.
    status: BackendStatusWord
    uptime_s: float | None  # None unless ready
    healthy: bool
    ejected_until: float | None
    consecutive_failures: int
    health_error: str
    ollama_version: str
    installed: list[str]
    resident: list[ResidentDoc]
    models: list[BackendModelDoc]
    in_flight: dict[str, int]
    queued: dict[str, int]
    free_vram_bytes: int
    observed: dict[str, ObservedDoc]


class ModelStatsDoc(TypedDict):
    """Traffic for one model as this gateway saw it over the last `stats_window_s` seconds."""

    model: str
    requests: int
    errors: int  # answered with a status >= 400, or cut mid-stream
    requests_per_s: float
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    tokens_per_s: float  # generated tokens per second of wall time, all requests together
    in_flight: int
    queued: int


class DecisionDoc(TypedDict):
    at: float
    model: str
    decision: DecisionKind
    reason: str  # one of gateway.routing.policy.REASONS
    backend: str  # "" unless sent
    expected_ttft_s: float | None


class WarningDoc(TypedDict):
    kind: WarningKind
    subject: str  # the backend id or model concerned ("" for the gateway itself)
    message: str


class StatusDoc(TypedDict):
    gateway: GatewayDoc
    gpus: dict[str, list[GpuDoc]]  # host -> cards
    backends: list[BackendDoc]
    models: list[ModelStatsDoc]
    decisions: list[DecisionDoc]  # newest first
    warnings: list[WarningDoc]
