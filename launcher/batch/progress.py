"""What a running batch shows: a live rich progress bar on a terminal, one line every 10 s otherwise
(logs and CI capture stay readable)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from launcher.batch.stats import BatchStats

LOG_EVERY_S = 10.0
REFRESH_S = 0.25


def _update(progress: Progress, bar: TaskID, stats: BatchStats) -> None:
    progress.update(
        bar,
        completed=stats.done,
        rates=f"{stats.rate(stats.done):.1f} items/s {stats.rate(stats.output_tokens):.0f} tok/s",
        failed=f"{stats.failed} failed",
        backends=stats.backends_text(),
    )


@contextlib.asynccontextmanager
async def show_progress(stats: BatchStats, stream: TextIO, *, tty: bool | None = None) -> AsyncIterator[None]:
    """Show `stats` on `stream` while the body runs. `tty` None: ask the stream."""
    is_tty = stream.isatty() if tty is None else tty
    task = asyncio.create_task(_bar(stats, stream) if is_tty else _lines(stats, stream))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _lines(stats: BatchStats, stream: TextIO) -> None:
    while True:
        await asyncio.sleep(LOG_EVERY_S)
        print(stats.progress_line(), file=stream, flush=True)


async def _bar(stats: BatchStats, stream: TextIO) -> None:
    console = Console(file=stream, force_terminal=True)
    progress = Progress(
        TextColumn("batch"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rates]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[failed]}"),
        TextColumn("{task.fields[backends]}"),
        console=console,
        transient=False,
    )
    bar = progress.add_task("batch", total=stats.total or None, rates="", failed="", backends="")
    with progress:
        try:
            while True:
                _update(progress, bar, stats)
                await asyncio.sleep(REFRESH_S)
        finally:
            _update(progress, bar, stats)
