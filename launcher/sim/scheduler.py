"""Ollama's scheduler (server/sched.go, HEAD) over simulated cards.

The rules, in the order Ollama applies them (OLLAMA_FACTS.md sections 2.2 and 7):

* A request for a loaded model whose runner options are unchanged attaches at once and later waits
  on that model's NUM_PARALLEL slots, with no depth limit. Everything else goes through one pending
  FIFO of OLLAMA_MAX_QUEUE entries; a full FIFO is a 503 (`QueueFull`).
* One pending request is handled at a time, so loads are serial. For it: a loaded copy with other
  options is expired and reloaded; at MAX_LOADED_MODELS a runner is evicted; otherwise it is placed
  on the visible cards' free memory (`launcher.facts.perf.ollama_placement`). With nothing else loaded it
  always loads (partly on the CPU if need be); with other models loaded it must fit fully, within
  80 % of the free memory it would use, or a runner is evicted.
* The victim is the idle runner with the shortest keep-alive (ties by model file); when none is idle
  the scheduler waits for the chosen one to finish its requests. It is never cut off mid-request.
* Memory is HEAD's (launcher.facts.memory): the pre-flight check is PredictServerVRAM + surcharge
  against 80 % of free; the load places buffers as llama-server --fit does. An out-of-memory load
  (llm/status.go patterns) is retried once: an automatic context at the next lower tier, evicting
  all others when some are loaded; else, with others loaded, after evicting them all.
* When a runner's last request ends its keep-alive timer starts (0 = unload now, forever = never).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from launcher.facts import memory
from launcher.facts.faults import is_out_of_memory
from launcher.facts.ollama import next_lower_auto_num_ctx
from launcher.facts.perf import (
    SINGLE_CARD_FIT_FRACTION,
    LoadOptions,
    Placement,
    decode_step_s,
    load_time_s,
    ollama_placement,
    prefill_s,
)
from launcher.gpus.discovery import GpuInfo
from launcher.sim.clock import Clock
from launcher.sim.engine import DecodeEngine
from launcher.sim.models import InstalledModel
from launcher.sim.runner import LoadKey, Runner

log = logging.getLogger("corral.sim.sched")

# The text and status Ollama answers with (sched.go ErrMaxQueue; two spaces after the period).
MAX_QUEUE_ERROR = "server busy, please try again.  maximum pending requests exceeded"
# What llama-server dies with when even host memory cannot hold the model (ggml's CPU buffer
# allocation failing: "failed to allocate" is one of Ollama's out-of-memory patterns).
HOST_OOM_ERROR = (
    "llama runner process has terminated: ggml_backend_cpu_buffer_type_alloc_buffer: "
    "failed to allocate buffer of size {size} bytes: out of memory"
)


class QueueFull(Exception):
    def __init__(self) -> None:
        super().__init__(MAX_QUEUE_ERROR)


class LoadFailed(Exception):
    """The model cannot be loaded at all (Ollama: 500 with the runner's error)."""


@dataclass(frozen=True)
class SchedulerSettings:
    cards: tuple[GpuInfo, ...]
    num_parallel: int = 1
    max_runners: int = 3
    max_queue: int = 512
    sched_spread: bool = False
    kv_cache_type: str = "f16"
    default_keep_alive_s: float = 300.0
    load_gbps: float = 3.0
    host_mem_bytes: int = 64 * 1024**3
    host_mem_bw_gbps: float = 60.0


class Lease:
    """A request's hold on a runner (refCount). Release exactly once, when the request ends."""

    def __init__(self, scheduler: Scheduler, runner: Runner, *, loaded_now: bool, queued: bool) -> None:
        self.runner = runner
        self.loaded_now = loaded_now  # this request waited for its model to load
        self.queued = queued  # this request went through the pending queue (a load, reload or eviction)
        self._scheduler = scheduler
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._scheduler._finished(self.runner)


@dataclass
class _Pending:
    model: InstalledModel
    key: LoadKey
    keep_alive_s: float | None
    future: asyncio.Future[Lease]
    oom_retried: bool = False  # sched.go oomRetryAttempted: one retry after an out-of-memory load


class Scheduler:
    """Admits requests to runners, loads and evicts them. Run `start()` inside the event loop."""

    def __init__(self, settings: SchedulerSettings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.loaded: dict[str, Runner] = {}
        self._pending: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._unloaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._busy = False
        self._current: _Pending | None = None
        # A stable identity per visible card, so placements can be mapped back to cards.
        self._cards = [replace(c.card) for c in settings.cards]
        self.loads = 0  # loads done so far
        self.evictions = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._process_pending(), name="sim-scheduler")

    async def close(self) -> None:
        """Stop scheduling; fail what is pending; unload everything."""
        current = self._current
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if current is not None and not current.future.done():
            current.future.cancel()
        while self._pending:
            p = self._pending.popleft()
            if not p.future.done():
                p.future.cancel()
        for runner in list(self.loaded.values()):
            await self._unload(runner)

    # -- admission (getRunner) ------------------------------------------------------------------

    async def acquire(self, model: InstalledModel, key: LoadKey, *, keep_alive_s: float | None) -> Lease:
        """Get a runner for `model` (loading it if needed). Raises QueueFull or LoadFailed."""
        # getRunner's floors: any context of at least 4 tokens, and 2048 for multimodal models.
        floor = 2048 if "vision" in model.capabilities else 4
        if key.opts.num_ctx < floor:
            key = replace(key, opts=replace(key.opts, num_ctx=floor))
        runner = self.loaded.get(model.key)
        if runner is not None and not runner.needs_reload(key):
            return self._use(runner, keep_alive_s, queued=False)
        if not self._queue_has_room():
            raise QueueFull
        future: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(model, key, keep_alive_s, future))
        log.debug("queued a request for %s (%d pending)", model.name, len(self._pending))
        self._wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().release()
            raise

    def _queue_has_room(self) -> bool:
        """Whether Ollama's non-blocking send into pendingReqCh (capacity OLLAMA_MAX_QUEUE) would succeed.

        An idle processPending is parked on the channel and takes a request the moment it is sent, so
        the head of `_pending` is not in the channel while the loop is idle (it only has not run yet).
        """
        if not self._busy and not self._pending:
            return True  # the reader is waiting: even an unbuffered channel accepts
        in_channel = len(self._pending) - (0 if self._busy else 1)
        return in_channel < self.settings.max_queue

    def _use(self, runner: Runner, keep_alive_s: float | None, *, queued: bool) -> Lease:
        """useLoadedRunner: one more reference, timer stopped, keep-alive overwritten."""
        runner.ref_count += 1
        runner.cancel_timer()
        if keep_alive_s is not None:
            runner.session_s = keep_alive_s
        return Lease(self, runner, loaded_now=False, queued=queued)

    def _finished(self, runner: Runner) -> None:
        """processCompleted: a request ended; an idle runner starts its keep-alive or unloads."""
        runner.ref_count -= 1
        if runner.ref_count > 0 or runner.unloaded:
            return
        if runner.session_s <= 0:
            runner.cancel_timer()
            self._expire(runner)
            return
        runner.cancel_timer()
        if math.isinf(runner.session_s):
            runner.expires_at = self.clock.wall_time() + (2**63 - 1) / 1e9
            return
        runner.timer = self.clock.call_later(runner.session_s, lambda: self._expire(runner))
        runner.expires_at = self.clock.wall_time_after(runner.session_s)

    def expire_runner(self, model: InstalledModel) -> None:
        """keep_alive 0 with an empty prompt: unload now, or as soon as the runner is idle."""
        runner = self.loaded.get(model.key)
        if runner is None:
            return
        runner.expires_at = self.clock.wall_time()
        runner.cancel_timer()
        runner.session_s = 0
        if runner.idle:
            self._expire(runner)

    def _expire(self, runner: Runner) -> None:
        runner.timer = None
        if runner.unloaded or not runner.idle:
            return  # a busy runner unloads when its last request ends (session_s is 0 by then)
        asyncio.get_running_loop().create_task(self._unload(runner))

    async def _unload(self, runner: Runner) -> None:
        if runner.unloaded:
            return
        runner.unloaded = True
        runner.cancel_timer()
        if self.loaded.get(runner.key) is runner:
            del self.loaded[runner.key]
        log.info("unloaded %s", runner.model.name)
        await runner.engine.close()
        self._unloaded.set()

    # -- the pending loop (processPending) ------------------------------------------------------

    async def _process_pending(self) -> None:
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            pending = self._pending.popleft()
            if pending.future.done():
                continue  # the client went away while queued
            self._busy, self._current = True, pending
            try:
                await self._schedule(pending)
            except Exception as e:
                if not pending.future.done():
                    pending.future.set_exception(e)
            finally:
                self._busy, self._current = False, None

    async def _schedule(self, pending: _Pending) -> None:
        while not pending.future.done():
            runner = self.loaded.get(pending.model.key)
            victim: Runner | None = None
            if runner is not None:
                if not runner.needs_reload(pending.key):
                    pending.future.set_result(self._use(runner, pending.keep_alive_s, queued=True))
                    return
                victim = runner
            elif len(self.loaded) >= self.settings.max_runners:
                victim = self._find_runner_to_unload()
            else:
                try:
                    placement = self._fit(pending, require_full=bool(self.loaded))
                except LoadFailed as e:
                    if not self._retry_after_oom(pending, str(e)):
                        raise
                    for other in list(self.loaded.values()):  # evictAllAndWait
                        await self._evict(other)
                    continue
                if placement is not None:
                    await self._load(pending, placement)
                    return
                victim = self._find_runner_to_unload()
            if victim is None:
                await asyncio.sleep(0)
                continue
            await self._evict(victim)

    def _retry_after_oom(self, pending: _Pending, error: str) -> bool:
        """sched.go after a failed load: once, and only for an out-of-memory error, retry an automatic
        context at the next lower tier; else, with other models loaded, retry after evicting them."""
        if pending.oom_retried or not is_out_of_memory(error):
            return False
        opts = pending.key.opts
        effective = min(opts.num_ctx, pending.model.spec.context_length or opts.num_ctx)
        lower = next_lower_auto_num_ctx(effective) if pending.key.num_ctx_auto else None
        if lower is not None and lower < opts.num_ctx:
            log.warning("load of %s ran out of memory; retrying once at num_ctx %d", pending.model.name, lower)
            pending.key = replace(pending.key, opts=replace(opts, num_ctx=lower))
        elif not self.loaded:
            return False
        else:
            log.warning("load of %s ran out of memory; evicting all other models and retrying", pending.model.name)
        pending.oom_retried = True
        return True

    async def _evict(self, victim: Runner) -> None:
        """Expire `victim` now or when its requests end, and wait until it is gone."""
        self.evictions += 1
        victim.cancel_timer()
        victim.session_s = 0
        log.info("evicting %s (%d requests in flight)", victim.model.name, victim.ref_count)
        if victim.idle:
            await self._unload(victim)
        while not victim.unloaded:
            self._unloaded.clear()
            await self._unloaded.wait()

    def _find_runner_to_unload(self) -> Runner | None:
        runners = sorted(self.loaded.values(), key=Runner.eviction_order)
        for runner in runners:
            if runner.idle:
                return runner
        return runners[0] if runners else None

    # -- placement (load's pre-flight check) ----------------------------------------------------

    def card_free_bytes(self) -> list[int]:
        """Free memory per visible card: total minus what loaded runners hold there."""
        used = self.card_used_bytes()
        return [max(c.memory_total_bytes - used.get(c.uuid, 0), 0) for c in self.settings.cards]

    def card_used_bytes(self) -> dict[str, int]:
        used: dict[str, int] = {}
        for runner in self.loaded.values():
            for uuid, n in runner.card_bytes.items():
                used[uuid] = used.get(uuid, 0) + n
        return used

    def num_parallel_for(self, model: InstalledModel) -> int:
        return model.num_parallel_cap or max(self.settings.num_parallel, 1)

    def load_options(self, model: InstalledModel, key: LoadKey, available: int = 0) -> LoadOptions:
        """The options llama-server starts with; an automatic num_batch is Ollama's for the total
        context and the `available` memory (sched.go automaticGenerationBatch)."""
        parallel = self.num_parallel_for(model)
        batch = key.opts.num_batch
        if key.num_batch_auto and "completion" in model.capabilities:
            predicted = memory.predict_server_vram(model.spec, key.opts.num_ctx, parallel)
            total = memory.server_context(model.spec, key.opts.num_ctx, parallel)
            batch = memory.automatic_num_batch(total, predicted, available)
        return LoadOptions(
            num_ctx=key.opts.num_ctx,
            num_parallel=parallel,
            kv_cache_type=self.settings.kv_cache_type,
            num_batch=batch,
            num_gpu=key.opts.num_gpu,
        )


    def _fit(self, pending: _Pending, *, require_full: bool) -> Placement | None:
        """Where the model would go now; None when something must be evicted first. Raises LoadFailed."""
        free = self.card_free_bytes()
        spec, opts = pending.model.spec, self.load_options(pending.model, pending.key, sum(free))
        candidates = list(zip(self._cards, free, strict=True))
        main_gpu = pending.key.opts.main_gpu
        if opts.num_gpu == 0:
            candidates = []
        elif main_gpu is not None and 0 <= main_gpu < len(candidates):
            candidates = [candidates[main_gpu]]
        loaded_cpu = sum(r.cpu_bytes for r in self.loaded.values())
        host_free = self.settings.host_mem_bytes - loaded_cpu
        if not require_full or not candidates:
            # Alone, Ollama always starts the runner and lets llama.cpp offload what does not fit. On the
            # CPU (no card visible, or num_gpu 0) its pre-flight check is skipped (len(loadGpus) > 0), so
            # a model loads beside the others as long as host memory holds it; otherwise one is evicted.
            placement = ollama_placement(spec, opts, candidates, spread=self.settings.sched_spread, allow_cpu=True)
            fits = placement is not None and placement.cpu_bytes <= host_free
            if not require_full and not fits:
                raise LoadFailed(HOST_OOM_ERROR.format(size=placement.cpu_bytes if placement else 0))
            return placement if fits else None
        placement = ollama_placement(spec, opts, candidates, spread=self.settings.sched_spread, allow_cpu=False)
        if placement is None:
            return None
        explicit_partial = 0 < opts.num_gpu < spec.block_count + 1
        if candidates and placement.shares and not explicit_partial:
            used_free = sum(f for _, f in candidates) if placement.is_split else max(f for _, f in candidates)
            predicted = memory.predicted_for_load(spec, opts.num_ctx, opts.num_parallel, opts.num_batch)
            if predicted > SINGLE_CARD_FIT_FRACTION * used_free:
                return None
        if placement.cpu_bytes > host_free:
            return None
        return placement

    def _card_bytes(self, placement: Placement) -> dict[str, int]:
        by_identity = {id(card): gpu.uuid for card, gpu in zip(self._cards, self.settings.cards, strict=True)}
        out: dict[str, int] = {}
        for share in placement.shares:
            uuid = by_identity[id(share.card)]
            out[uuid] = out.get(uuid, 0) + share.vram_bytes
        return out

    async def _load(self, pending: _Pending, placement: Placement) -> None:
        model, key = pending.model, pending.key
        opts = self.load_options(model, key)
        spec = model.spec
        host_bw = self.settings.host_mem_bw_gbps
        kv_type = self.settings.kv_cache_type
        engine = DecodeEngine(
            self.clock,
            step_s=lambda batch, ctx: decode_step_s(
                spec, placement, batch=batch, context_tokens=ctx, kv_cache_type=kv_type, host_mem_bw_gbps=host_bw
            ),
            prefill_s=lambda n: prefill_s(spec, placement, n, host_mem_bw_gbps=host_bw),
        )
        effective = replace(key, opts=replace(key.opts, num_ctx=opts.effective_ctx(spec)))
        seconds = load_time_s(placement, self.settings.load_gbps)
        log.info(
            "loading %s: %.1f GiB (%.1f GiB VRAM on %d card(s)), ctx %d x %d, %.2fs",
            model.name,
            placement.total_bytes / 1024**3,
            placement.vram_bytes / 1024**3,
            len(placement.shares),
            effective.opts.num_ctx,
            opts.num_parallel,
            seconds,
        )
        sleeper: asyncio.Future[None] = asyncio.ensure_future(self.clock.sleep(seconds))
        try:
            waiting: set[asyncio.Future[Any]] = {sleeper, pending.future}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:  # the client went away (Ollama's load aborts with its context), or the scheduler stops
            if not sleeper.done():
                sleeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sleeper
        if pending.future.done():
            return
        keep_alive = pending.keep_alive_s if pending.keep_alive_s is not None else self.settings.default_keep_alive_s
        runner = Runner(
            model=model,
            load=effective,
            num_parallel=opts.num_parallel,
            placement=placement,
            card_bytes=self._card_bytes(placement),
            engine=engine,
            session_s=keep_alive,
            loaded_at=self.clock.now(),
        )
        self.loaded[model.key] = runner
        self.loads += 1
        runner.ref_count = 1
        pending.future.set_result(Lease(self, runner, loaded_now=True, queued=True))
