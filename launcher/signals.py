"""SIGTERM and SIGINT for the long-running commands (`corral up`, `corral gateway`, `corral-sim serve`).

Each installs the same pair on the running loop, calls back with the signal, and removes them on
the way out, so a second Ctrl-C after shutdown began reaches Python's default handler again.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def on_stop_signals(callback: Callable[[signal.Signals], None]) -> Iterator[None]:
    """Call `callback(sig)` on SIGTERM or SIGINT while the block runs. Needs a running loop."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in STOP_SIGNALS:
        with contextlib.suppress(NotImplementedError):  # not on this platform's loop
            loop.add_signal_handler(sig, callback, sig)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
