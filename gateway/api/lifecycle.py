"""Counting the requests being served, so a shutdown can wait for them to finish (drain)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Hashable


class RequestTracker:
    """How many requests are inside a handler right now, and on which connections; `wait_idle`
    waits for none."""

    def __init__(self) -> None:
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy: Counter[Hashable] = Counter()  # connection -> its requests inside a handler

    def enter(self, connection: Hashable | None = None) -> None:
        self.active += 1
        self._idle.clear()
        if connection is not None:
            self._busy[connection] += 1

    def leave(self, connection: Hashable | None = None) -> None:
        self.active -= 1
        if self.active <= 0:
            self.active = 0
            self._idle.set()
        if connection is not None:
            self._busy[connection] -= 1
            if self._busy[connection] <= 0:
                del self._busy[connection]

    def is_busy(self, connection: Hashable) -> bool:
        """Whether a request on this connection (an aiohttp RequestHandler) is being served."""
        return connection in self._busy

    async def wait_idle(self, timeout_s: float) -> bool:
        """True when no request is active (now or within `timeout_s`), False on timeout."""
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                await self._idle.wait()
        except TimeoutError:
            return self.active == 0
        return True
