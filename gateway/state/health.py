"""Whether the state store answers, as the gateway and the launcher see it: one warning per outage.

Redis is an accelerator, not a single point of failure: while it is unreachable the gateway keeps
routing on the records and residency it last saw plus its own health checks, and the launcher keeps
its backends running and re-publishes their records the moment the store answers again. Without
this tracker every failed store call logged its own warning (2,727 lines in 12 s of one outage).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# A store that fails again within this long of the last warning is logged at info, not warned
# about again: a flapping Redis is one outage to whoever reads the log.
REWARN_AFTER_S = 60.0


class StoreHealth:
    """Up/down state of the store, fed by the callers' own store calls.

    `failed()` logs a warning only when the store goes down, `succeeded()` an info line when it
    comes back, and then runs the `on_recover` callbacks (re-publish records at once). `on_change`
    receives 1.0 / 0.0 for a gauge."""

    def __init__(self, who: str, on_change: Callable[[float], None] = lambda _up: None) -> None:
        self.who = who
        self.up = True
        self._down_since = 0.0
        self._warned_at = -REWARN_AFTER_S
        self._on_change = on_change
        self.on_recover: list[Callable[[], None]] = []
        on_change(1.0)

    def failed(self, error: BaseException | str) -> None:
        if not self.up:
            log.debug("%s: state store still unreachable: %s", self.who, error)
            return
        now = time.monotonic()
        self.up = False
        self._on_change(0.0)
        if now - self._warned_at < REWARN_AFTER_S:  # a relapse right after a recovery: same outage
            log.info("%s: state store unreachable again (%s)", self.who, error)
        else:
            log.warning("%s: state store unreachable (%s); going on with what was last seen", self.who, error)
            self._warned_at = now
        self._down_since = now

    def succeeded(self) -> bool:
        """Note a successful call. Returns True when this ended an outage."""
        if self.up:
            return False
        self.up = True
        self._on_change(1.0)
        log.info("%s: state store reachable again after %.1fs", self.who, time.monotonic() - self._down_since)
        for callback in list(self.on_recover):
            callback()
        return True


def reraise_if_cancelled() -> None:
    """Call in an `except Exception` around a store call inside a loop: redis-py can turn the
    CancelledError of a task being stopped into a connection error, and a loop that swallowed it
    would go on forever while its owner waits for it to end."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
