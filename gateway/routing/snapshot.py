"""What the router sees: a picture of the fleet, built without I/O on the hot path.

The backend pool keeps these up to date from the backend records, the `/api/ps` poller, health
checks and what the gateway observes itself (in-flight counts, `load_duration`, tokens/s), and
hands `routing.choose()` a `Snapshot` per decision. Its shape (records, health, inventory,
residency) is frozen; the per-request counters in it are the pool's live maps, which the router
only reads, synchronously (gateway/fleet/pool.py). Everything here is plain data.
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

_LOAD_OPTION_SET = frozenset(LOAD_OPTION_KEYS)


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
        for key in _LOAD_OPTION_SET.intersection(options):
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
    # Ollama loads it with one slot whatever OLLAMA_NUM_PARALLEL says (embedding-only models and the
    # architectures server/sched.go lists; launcher.facts.catalog.forced_single_slot).
    single_slot: bool = False
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
    # The typical answer length (eval_count), for requests that do not set num_predict (0: unknown).
    answer_tokens: float = 0.0
    # The single-stream decode rate: tokens_per_s corrected for the sequences that were decoding
    # beside each sample (batched decode slows every stream a little; 0: unknown).
    solo_tokens_per_s: float = 0.0


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One request in flight on a backend, as the wait model needs it: how much of its answer is
    left. Durations are in the backend's clock (a time-scaled simulator's seconds), like every
    observed rate."""

    expected_tokens: int  # its num_predict, else the model's typical answer length
    relayed_tokens: int  # NDJSON lines / SSE events passed to the client so far (streams)
    elapsed_s: float  # since it was sent, in backend seconds
    stream: bool = True
    num_predict_known: bool = False  # expected_tokens is the request's own num_predict (a hard cap)


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
    # The same, for interactive-lane requests only: a batch request never evicts a model interactive
    # traffic used within the last minute.
    last_interactive: Mapping[str, float] = field(default_factory=dict)
    # This gateway's requests in flight here, per model (other gateways' are counted in `in_flight`
    # but not itemised: they are assumed half done).
    work: Mapping[str, tuple[WorkItem, ...]] = field(default_factory=dict)
    version: str = ""  # the backend's /api/version: which Ollama memory model it uses (launcher.facts.memory)

    @property
    def id(self) -> str:
        return self.record.id

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {r.name: r for r in self.resident})

    def resident_model(self, name: str) -> ResidentModel | None:
        by_name: dict[str, ResidentModel] = self._by_name  # type: ignore[attr-defined]
        return by_name.get(name)

    def total_in_flight(self) -> int:
        return sum(self.in_flight.values())


@dataclass(frozen=True)
class SnapshotIndex:
    """Candidates per model, built once per snapshot so a decision looks at the backends that may
    hold its model instead of every backend: `holders[model]` (installed, resident or planned
    there) and `unknown` (inventory not read yet: may hold anything). Both in id order."""

    holders: Mapping[str, tuple[BackendView, ...]]
    unknown: tuple[BackendView, ...]
    by_id: Mapping[str, BackendView]
    resident_copies: Mapping[str, int]  # per model: backends where it is loaded now
    # What the router works out from the shape alone (whether a model can ever fit a backend, a
    # model's size), kept for the next decisions over the same shape: the pool keeps an index until
    # the shape changes.
    memo: dict[tuple[object, ...], object] = field(default_factory=dict, compare=False)

    @classmethod
    def build(cls, backends: tuple[BackendView, ...]) -> SnapshotIndex:
        holders: dict[str, list[BackendView]] = {}
        unknown: list[BackendView] = []
        copies: dict[str, int] = {}
        for view in sorted(backends, key=lambda v: v.id):
            if not view.inventory_known:
                unknown.append(view)
            for r in view.resident:
                copies[r.name] = copies.get(r.name, 0) + 1
            names = set(view.installed)
            names.update(r.name for r in view.resident)
            names.update(view.record.planned_models)
            for name in names:
                holders.setdefault(name, []).append(view)
        return cls(
            holders={m: tuple(vs) for m, vs in holders.items()},
            unknown=tuple(unknown),
            by_id={v.id: v for v in backends},
            resident_copies=copies,
        )


@dataclass(frozen=True)
class Snapshot:
    backends: tuple[BackendView, ...]
    models: Mapping[str, ModelFacts]  # facts per model name, where known
    now: float  # epoch seconds when the snapshot was taken
    # Built from `backends` when not given; `dataclasses.replace` with a new `now` keeps it.
    index: SnapshotIndex | None = None

    def __post_init__(self) -> None:
        if self.index is None:
            object.__setattr__(self, "index", SnapshotIndex.build(self.backends))

    @property
    def idx(self) -> SnapshotIndex:
        assert self.index is not None  # set in __post_init__
        return self.index

    def backend(self, backend_id: str) -> BackendView | None:
        return self.idx.by_id.get(backend_id)

    def candidates(self, model: str) -> tuple[BackendView, ...]:
        """Backends that may hold `model` (id order): its holders plus those of unknown inventory."""
        idx = self.idx
        held = idx.holders.get(model, ())
        if not idx.unknown:
            return held
        extra = tuple(v for v in idx.unknown if v not in held)
        return tuple(sorted(held + extra, key=lambda v: v.id)) if extra else held
