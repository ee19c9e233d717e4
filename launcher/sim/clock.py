"""Simulated time: everything the simulator waits for runs `speed` times faster than real time.

Durations the simulator *reports* (load, prompt eval, eval, keep-alive) are simulated seconds, what a
real GPU would have taken; the waits behind them last `simulated / speed` wall seconds. The scheduler
and the decode engine only talk to a `Clock`, so tests can substitute `ManualClock` and step time by
hand instead of sleeping.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """What the scheduler needs from time. All durations are simulated seconds."""

    speed: float

    def now(self) -> float:
        """Simulated seconds since an arbitrary origin (monotonic)."""
        ...

    def wall_time(self) -> float:
        """Real Unix time, for timestamps clients see (created_at)."""
        ...

    def wall_time_after(self, sim_s: float) -> float:
        """Real Unix time at which something `sim_s` simulated seconds from now happens."""
        ...

    async def sleep(self, sim_s: float) -> None: ...

    def call_later(self, sim_s: float, callback: Callable[[], None]) -> TimerHandle: ...


class SimClock:
    """Real time scaled by `speed` (50 = fifty times faster than real time).

    `now()` is the simulated clock the reported durations are read from. It runs `speed` times
    faster than real time while some simulated work is in progress (a `sleep`), and at real speed
    otherwise, so the simulator's own overhead (parsing a request while nothing else happens) is
    not inflated by the speed factor into seconds that a real server would not have spent.
    """

    def __init__(self, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self.speed = speed
        self._active = 0  # sleeps in progress
        self._sim_s = 0.0
        self._last_wall = time.monotonic()

    def _advance(self) -> None:
        wall = time.monotonic()
        self._sim_s += (wall - self._last_wall) * (self.speed if self._active else 1.0)
        self._last_wall = wall

    def now(self) -> float:
        self._advance()
        return self._sim_s

    def wall_time(self) -> float:
        return time.time()

    def wall_time_after(self, sim_s: float) -> float:
        return time.time() + sim_s / self.speed

    async def sleep(self, sim_s: float) -> None:
        self._advance()
        self._active += 1
        try:
            await asyncio.sleep(max(sim_s, 0.0) / self.speed)
        finally:
            self._advance()
            self._active -= 1

    def call_later(self, sim_s: float, callback: Callable[[], None]) -> TimerHandle:
        return asyncio.get_running_loop().call_later(max(sim_s, 0.0) / self.speed, callback)


class _ManualTimer:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock that only moves when `advance` is called (for deterministic scheduler tests).

    `sleep` and `call_later` register wake-ups; `advance(dt)` fires them in time order, letting the
    event loop run after each one so woken tasks can react before time moves on.
    """

    def __init__(self, start_wall: float = 1_750_000_000.0) -> None:
        self.speed = 1.0
        self._now = 0.0
        self._start_wall = start_wall
        self._seq = itertools.count()
        self._events: list[tuple[float, int, Callable[[], None], _ManualTimer]] = []

    def now(self) -> float:
        return self._now

    def wall_time(self) -> float:
        return self._start_wall + self._now

    def wall_time_after(self, sim_s: float) -> float:
        return self._start_wall + self._now + sim_s

    def call_later(self, sim_s: float, callback: Callable[[], None]) -> TimerHandle:
        handle = _ManualTimer()
        heapq.heappush(self._events, (self._now + max(sim_s, 0.0), next(self._seq), callback, handle))
        return handle

    async def sleep(self, sim_s: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        handle = self.call_later(sim_s, wake)
        try:
            await fut
        finally:
            handle.cancel()

    @property
    def pending(self) -> int:
        return sum(1 for e in self._events if not e[3].cancelled)

    async def settle(self) -> None:
        """Let every runnable task run until none is left runnable (a few loop turns)."""
        for _ in range(20):
            await asyncio.sleep(0)

    async def advance(self, sim_s: float) -> None:
        """Move time forward by `sim_s`, firing due timers in order."""
        target = self._now + sim_s
        await self.settle()
        while self._events and self._events[0][0] <= target:
            when, _, callback, handle = heapq.heappop(self._events)
            if handle.cancelled:
                continue
            self._now = max(self._now, when)
            callback()
            await self.settle()
        self._now = target
        await self.settle()
