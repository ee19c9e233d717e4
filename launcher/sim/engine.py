"""Continuous batching on one loaded model: the sequences decoding together slow each other down.

Each wake-up of the engine evaluates the prompts of newly joined sequences (compute bound, from
`launcher.facts.perf.prefill_s`), then runs decode steps that each give every active sequence one token;
a step's time comes from `launcher.facts.perf.decode_step_s` with the batch size and the mean context, so
four parallel requests each see a lower token rate than one alone, as on a real card. Waits are
simulated time (`Clock.sleep`). At high speed factors one wake-up covers several steps (enough to
last a couple of wall milliseconds), which keeps the event loop's overhead per token small without
changing any reported duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from launcher.sim.clock import Clock

WAKE_QUANTUM_WALL_S = 0.002


@dataclass(frozen=True)
class Progress:
    """What one wake-up gave a sequence: new tokens and the simulated time it took."""

    tokens: int
    prompt_eval_s: float  # this sequence's own prompt evaluation (first wake-up only)
    eval_s: float  # time spent in decode steps (shared with the rest of the batch)


class _Sequence:
    def __init__(self, prompt_tokens: int, max_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.remaining = max_tokens
        self.generated = 0
        self.prefilled = False
        self.queue: asyncio.Queue[Progress] = asyncio.Queue()


class DecodeEngine:
    """Runs the decode loop of one loaded model while any sequence is active."""

    def __init__(
        self,
        clock: Clock,
        *,
        step_s: Callable[[int, int], float],
        prefill_s: Callable[[int], float],
    ) -> None:
        self._clock = clock
        self._step_s = step_s  # (batch, mean context tokens) -> seconds per decode step
        self._prefill_s = prefill_s  # prompt tokens -> seconds
        self._sequences: list[_Sequence] = []
        self._task: asyncio.Task[None] | None = None
        self.steps = 0  # decode steps run so far (tests read it)
        self.max_batch = 0  # the largest batch seen (tests read it)
        self._closed = False

    @property
    def active(self) -> int:
        return len(self._sequences)

    async def generate(self, prompt_tokens: int, max_tokens: int) -> AsyncIterator[Progress]:
        """Evaluate a prompt and then produce `max_tokens` tokens, yielding progress as it comes.

        On a closed engine (the runner unloaded while the request waited for a slot) the only
        progress is the `tokens=-1` that says the runner is gone.
        """
        if self._closed:
            yield Progress(-1, 0.0, 0.0)
            return
        seq = _Sequence(prompt_tokens, max_tokens)
        self._sequences.append(seq)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="decode-engine")
        try:
            while True:
                progress = await seq.queue.get()
                yield progress
                if seq.remaining <= 0:
                    return
        finally:
            with contextlib.suppress(ValueError):
                self._sequences.remove(seq)

    async def close(self) -> None:
        """Stop the loop; sequences still running get a final `Progress` with tokens=-1 (runner gone)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for seq in self._sequences:
            seq.remaining = 0
            seq.queue.put_nowait(Progress(-1, 0.0, 0.0))
        self._sequences.clear()

    async def _loop(self) -> None:
        while True:
            joining = [s for s in self._sequences if not s.prefilled]
            decoding = [s for s in self._sequences if s.prefilled and s.remaining > 0]
            if not joining and not decoding:
                return  # finished sequences leave on their own; a new one restarts the loop
            prefill_each = {id(s): self._prefill_s(s.prompt_tokens) for s in joining}
            prefill_total = sum(prefill_each.values())
            batch = [s for s in (*decoding, *joining) if s.remaining > 0]
            steps, step_s = 0, 0.0
            if batch:
                mean_ctx = sum(s.prompt_tokens + s.generated for s in batch) // len(batch)
                step_s = self._step_s(len(batch), mean_ctx)
                wanted = WAKE_QUANTUM_WALL_S * self._clock.speed - prefill_total
                steps = max(1, math.ceil(wanted / step_s)) if step_s > 0 and wanted > 0 else 1
                steps = min(steps, min(s.remaining for s in batch))
            await self._clock.sleep(prefill_total + steps * step_s)
            self.steps += steps
            self.max_batch = max(self.max_batch, len(batch))
            for s in joining:
                s.prefilled = True
                n = steps if s in batch else 0
                s.remaining -= n
                s.generated += n
                s.queue.put_nowait(Progress(n, prefill_each[id(s)], n * step_s))
            for s in decoding:
                s.remaining -= steps
                s.generated += steps
                s.queue.put_nowait(Progress(steps, 0.0, prefill_total + steps * step_s))
