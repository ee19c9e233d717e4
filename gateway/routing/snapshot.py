"""What the router sees: an immutable picture of the fleet, built without I/O on the hot path.

The backend pool keeps these up to date from the backend records, the `/api/ps` poller, health
checks and what the gateway observes itself (in-flight counts, `load_duration`, tokens/s), and
hands `routing.choose()` a fresh `Snapshot` per decision. Everything here is plain data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.record import BackendRecord

# Runner options that decide how Ollama loads a model; a request that changes one of them makes
# Ollama reload the model (server/sched.go needsReload). `num_gpu` < 0 matches anything.
LOAD_OPTION_KEYS: tuple[str, ...] = (
    "num_ctx",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "use_mmap",
    "num_thread",
    "draft_num_predict",
)


@dataclass(frozen=True)
class LoadOptions:
    """The load-time options a request asks for (None: not given, the backend's default applies)."""

    num_ctx: int | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    use_mmap: bool | None = None
    num_thread: int | None = None
    draft_num_predict: int | None = None

    @classmethod
    def from_request_options(cls, options: Mapping[str, object] | None) -> LoadOptions:
        """Pick the load-time keys out of a request's `options`; values of the wrong type are ignored
        here (the backend answers them with its own error)."""
        if not options:
            return cls()
        values: dict[str, object] = {}
        for key in LOAD_OPTION_KEYS:
            v = options.get(key)
            if key == "use_mmap":
                if isinstance(v, bool):
                    values[key] = v
            elif isinstance(v, int) and not isinstance(v, bool):
                values[key] = v
            elif isinstance(v, float) and v.is_integer():
                values[key] = int(v)
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ResidentModel:
    """One model loaded in one backend (a row of its `/api/ps`, plus what the gateway saw)."""

    name: str
    size_bytes: int
    size_vram_bytes: int
    context_length: int  # per slot, as /api/ps reports it
    expires_at: float | None  # epoch seconds; None when unknown
    # The options of the request that loaded it, when the gateway saw that load; None otherwise.
    loaded_with: LoadOptions | None = None


@dataclass(frozen=True)
class ModelFacts:
    """What the router needs to know about a model to cost a cold load on a backend."""

    name: str
    size_bytes: int  # file size in the store (what a load streams into memory)
    kv_bytes_per_token: int  # KV cache per token of context, all layers, f16
    overhead_bytes: int  # per-card compute buffer at the default context (HEAD)
    context_length: int  # the model's trained context
    embedding_only: bool = False
    overhead_bytes_era_a: int = 0  # per-card graph + minimum for Ollama <= 0.29; 0: unknown, overhead_bytes


@dataclass(frozen=True)
class ObservedStats:
    """Rates the gateway measured for one model on one backend (exponentially averaged)."""

    tokens_per_s: float = 0.0  # decode rate from final chunks' eval_count / eval_duration
    load_s: float = 0.0  # cold-load time from load_duration
    service_s: float = 0.0  # time one request holds a slot (prompt eval + decode, as the backend reports)
    samples: int = 0
    # Prompt evaluation rate from final chunks' prompt_eval_count / prompt_eval_duration (0: unknown).
    prefill_tokens_per_s: float = 0.0


@dataclass(frozen=True)
class BackendView:
    """One backend as the router sees it right now."""

    record: BackendRecord
    healthy: bool
    installed: frozenset[str]  # models in this backend's store (normalized names)
    resident: tuple[ResidentModel, ...] = ()
    in_flight: Mapping[str, int] = field(default_factory=dict)  # per model, sent by this gateway fleet
    queued: Mapping[str, int] = field(default_factory=dict)  # per model, waiting at the gateway for it
    free_vram_bytes: int = 0
    loading: str | None = None  # a model this backend is loading now (Ollama loads one at a time)
    observed: Mapping[str, ObservedStats] = field(default_factory=dict)
    # False until the backend's /api/tags has been read once: `installed` is then not to be trusted
    # (the router may still send there; the backend answers an unknown model itself).
    inventory_known: bool = True
    # The context a request without num_ctx gets here (OLLAMA_CONTEXT_LENGTH); 0: unknown, the router
    # then applies Ollama's VRAM-tier default to vram_total_bytes.
    default_num_ctx: int = 0
    # Epoch seconds of the last request this gateway fleet saw finish (or start) per model here; the
    # router uses it to tell hot resident models (expensive to evict) from cold ones.
    last_used: Mapping[str, float] = field(default_factory=dict)
    version: str = ""  # the backend's /api/version: which Ollama memory model it uses (launcher.facts.memory)

    @property
    def id(self) -> str:
        return self.record.id

    def resident_model(self, name: str) -> ResidentModel | None:
        for r in self.resident:
            if r.name == name:
                return r
        return None

    def total_in_flight(self) -> int:
        return sum(self.in_flight.values())


@dataclass(frozen=True)
class Snapshot:
    backends: tuple[BackendView, ...]
    models: Mapping[str, ModelFacts]  # facts per model name, where known
    now: float  # epoch seconds when the snapshot was taken

    def backend(self, backend_id: str) -> BackendView | None:
        for b in self.backends:
            if b.id == backend_id:
                return b
        return None
