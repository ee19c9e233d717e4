"""How many requests a batch keeps in flight: additive increase, multiplicative decrease.

With a target from the fleet (the gateway's capacity route: slots for the model), the limit sits at
the target and backs off below it when the fleet answers 503 (queue full, nothing healthy), then
climbs back one step per window of successes. Without a target (a plain Ollama server) it starts
small and climbs until the server pushes back, the way TCP finds a link's capacity.
A fixed `--concurrency N` is a limit that never moves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Aimd:
    """The in-flight limit. Not thread-safe (one event loop owns it)."""

    limit: float
    floor: int = 1
    ceiling: int = 256
    fixed: bool = False
    # After a decrease, further overloads within this many seconds are the same congestion event
    # (every request in flight at that moment sees the same full queue) and do not halve again.
    cooldown_s: float = 1.0
    _last_decrease: float = -1e9

    @classmethod
    def fixed_at(cls, n: int) -> Aimd:
        return cls(limit=float(n), floor=n, ceiling=n, fixed=True)

    @property
    def current(self) -> int:
        return max(self.floor, min(self.ceiling, int(self.limit)))

    def set_target(self, slots: int) -> None:
        """The fleet says it has `slots` for the model now: aim there (cards came or went)."""
        if self.fixed:
            return
        self.ceiling = max(self.floor, slots)
        if self.limit > self.ceiling or time.monotonic() - self._last_decrease > 10 * self.cooldown_s:
            self.limit = float(self.ceiling)

    def on_success(self) -> None:
        if not self.fixed:
            # +1 per `limit` successes: one step per round of the whole window.
            self.limit = min(float(self.ceiling), self.limit + 1.0 / max(self.limit, 1.0))

    def on_overload(self) -> None:
        if self.fixed:
            return
        now = time.monotonic()
        if now - self._last_decrease < self.cooldown_s:
            return
        self._last_decrease = now
        self.limit = max(float(self.floor), self.limit / 2)
