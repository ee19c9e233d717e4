"""The event loop a gateway process runs on: uvloop when it is installed (`[gateway] event_loop`).

Why uvloop: on the model-call path a gateway's own cost is mostly per-request work on the event
loop and its transports, which uvloop runs in C (bench/overhead.py measures both loops side by side
in one run). It stays optional (`pip install 'corral[fast]'`): the standard loop behaves the same,
only slower.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")
EventLoopChoice = Literal["auto", "asyncio", "uvloop"]


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def loop_factory(choice: EventLoopChoice) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory for `asyncio.Runner` (None: the standard loop). RuntimeError for "uvloop" when it
    is not installed."""
    if choice == "asyncio" or (choice == "auto" and not uvloop_available()):
        return None
    try:
        import uvloop
    except ImportError as e:
        message = "[gateway] event_loop = \"uvloop\" but uvloop is not installed (pip install 'corral[fast]')"
        raise RuntimeError(message) from e
    return uvloop.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T], choice: EventLoopChoice) -> T:
    """`asyncio.run(main)` on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
