"""The startup gate of `corral up`, which listens at once (while models are still pulled and loaded).

"The port answers" no longer means "ready": GET /api/corral/ready (status.ready) does. Meanwhile
model calls wait in the gateway's queue as "starting" instead of getting 503 or 404.
"""

from __future__ import annotations

from collections.abc import Callable


class StartupGate:
    """Set while the launcher that runs this gateway (`corral up`) is still starting its backends:
    a model call that no backend could take yet waits in the queue as "starting" (bounded by
    queue_timeout_s) instead of getting 503 or, for a model still being pulled, 404."""

    def __init__(self, active: bool = False) -> None:
        self.active = active
        self._on_end: list[Callable[[], object]] = []

    def on_end(self, callback: Callable[[], object]) -> None:
        self._on_end.append(callback)

    def end(self) -> None:
        """Startup is over: waiting requests decide again, and now get the fleet's real answer."""
        if not self.active:
            return
        self.active = False
        for callback in self._on_end:
            callback()
