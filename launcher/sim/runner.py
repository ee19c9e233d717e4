"""A loaded model (Ollama's runnerRef): where it lives, who uses it, when it expires.

The scheduler creates runners and decides their fate; this module holds their state and the small
rules that belong to one runner: whether a request's load-time options force a reload
(`needs_reload`, sched.go) and what /api/ps reports for it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

from launcher.facts.perf import Placement
from launcher.sim.clock import TimerHandle
from launcher.sim.engine import DecodeEngine
from launcher.sim.models import InstalledModel

# Go's time.Duration(math.MaxInt64): what "forever" keeps in expires_at (~292 years ahead).
FOREVER_NS = 2**63 - 1


@dataclass(frozen=True)
class RunnerOptions:
    """api.Runner: the options a model is loaded with. A change of any of them forces a reload."""

    num_ctx: int = 4096
    num_batch: int = 512
    num_gpu: int = -1  # layers to offload; -1 = as many as fit
    main_gpu: int | None = None
    use_mmap: bool | None = None
    num_thread: int = 0
    draft_num_predict: int = 0  # 0 unless asked for: no simulated model has a draft model


@dataclass(frozen=True)
class LoadKey:
    """A request's runner options with the facts `needs_reload` needs about where they came from."""

    opts: RunnerOptions
    num_ctx_auto: bool = False  # num_ctx came from the VRAM-tier default
    num_batch_auto: bool = True  # num_batch came from the default
    context_shift: bool = True  # llama-server's --context-shift: the request's `shift`, else the model's default


@dataclass
class Runner:
    """One model resident in this backend's (simulated) memory."""

    model: InstalledModel
    load: LoadKey  # as loaded, num_ctx capped to the model's context
    num_parallel: int
    placement: Placement
    card_bytes: dict[str, int]  # card UUID -> bytes this runner holds there
    engine: DecodeEngine
    session_s: float  # keep-alive; math.inf = forever, 0 = unload when idle
    loaded_at: float  # simulated clock
    ref_count: int = 0
    timer: TimerHandle | None = None
    expires_at: float | None = None  # Unix time, set when the runner goes idle
    unloaded: bool = False
    slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.num_parallel)

    @property
    def key(self) -> str:
        return self.model.key

    @property
    def context_length(self) -> int:
        """Per-slot context, as /api/ps reports it (not multiplied by num_parallel)."""
        return self.load.opts.num_ctx

    @property
    def size_bytes(self) -> int:
        return self.placement.total_bytes

    @property
    def size_vram_bytes(self) -> int:
        return self.placement.vram_bytes

    @property
    def cpu_bytes(self) -> int:
        return self.placement.cpu_bytes

    @property
    def idle(self) -> bool:
        return self.ref_count <= 0

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def eviction_order(self) -> tuple[float, str]:
        """ByDurationAndName: shortest keep-alive first ("forever", math.inf, last), then by model file."""
        return (self.session_s, self.key)

    def needs_reload(self, request: LoadKey) -> bool:
        """True when serving `request` needs this model loaded with other runner options (sched.go)."""
        if self.load.context_shift != request.context_shift:
            return True
        old, new = self.load.opts, request.opts
        new_ctx = min(new.num_ctx, self.model.spec.context_length) if self.model.spec.context_length else new.num_ctx
        if self.load.num_ctx_auto and request.num_ctx_auto:
            new_ctx = old.num_ctx
        new_batch = old.num_batch if self.load.num_batch_auto and request.num_batch_auto else new.num_batch
        old_gpu, new_gpu = (-1, -1) if new.num_gpu < 0 else (old.num_gpu, new.num_gpu)
        before = replace(old, num_gpu=old_gpu)
        after = replace(new, num_ctx=new_ctx, num_batch=new_batch, num_gpu=new_gpu)
        return before != after
